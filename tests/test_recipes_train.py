"""Every loss recipe trains: a few SGD steps of the nano model with finite losses that go down."""

from pathlib import Path

import pytest
import torch

from detector.losses import load_recipe
from detector.models import YOLOv3

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("configs/losses/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_a_few_steps(recipe: Path) -> None:
    torch.manual_seed(0)
    model = YOLOv3(num_classes=3, preset="nano")
    loss_fn = load_recipe(recipe)
    images = torch.rand(2, 3, 96, 96)
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 40.0, 90.0, 70.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[20.0, 20.0, 80.0, 76.0]]), "labels": torch.tensor([1])},
    ]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    for _ in range(6):
        out = loss_fn(model(images), targets, model.anchors, model.strides)
        assert all(torch.isfinite(v) for v in out.values()), out
        opt.zero_grad()
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses


NORMALISERS = {  # recipe -> normalize of (objectness, classification, box), as each header states and why
    "paper": ("batch",) * 3,
    "darknet": ("batch",) * 3,
    "mse_obj": ("batch",) * 3,
    "softmax": ("batch",) * 3,
    "giou": ("batch",) * 3,
    "ciou": ("batch",) * 3,
    "focal": ("num_pos",) * 3,
    "pisa": ("num_pos",) * 3,
    "ghm": ("valid", "valid", "num_pos"),
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_source_and_normaliser(recipe: Path) -> None:
    header = "".join(line[1:] for line in recipe.read_text().splitlines() if line.startswith("#"))
    assert "Normaliser:" in header, f"{recipe.name}: the header must name the normaliser and why"
    assert "arXiv" in header or "darknet" in header, f"{recipe.name}: the header must name its source"
    loss = load_recipe(recipe)
    stated = header.split("Normaliser:")[1].split()[0].strip(",.")
    assert stated in {"batch", "num_pos", "num_anchors", "valid", "GHM-C's"}, f"{recipe.name}: {stated}"
    if recipe.stem in NORMALISERS:  # the shipped recipes: their sources' normalisers and ignore thresholds
        assert loss.modes == NORMALISERS[recipe.stem]
        assert stated == loss.modes[0] or (stated == "GHM-C's" and loss.modes[0] == "valid")
        assert loss.ignore_thresh == (0.7 if recipe.stem in ("darknet", "mse_obj") else 0.5)  # yolov3.cfg / paper


def test_default_config_is_the_paper_recipe() -> None:
    default, paper = load_recipe(RECIPES[0].parents[1] / "default.yaml"), load_recipe(RECIPES[0].parent / "paper.yaml")
    assert repr(default) == repr(paper)
    assert (default.modes, default.ignore_thresh, default.weights) == (paper.modes, paper.ignore_thresh, paper.weights)
