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
