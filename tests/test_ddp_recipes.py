"""Every loss recipe and every normaliser is DDP-exact with uneven processes: 2 CPU processes (gloo),
rank 0 holding 3 images with many boxes and rank 1 one image with one box, compute the loss and
gradients of one process holding the whole batch.

With ``YOLOLoss``'s normaliser (counts summed over processes, divided by the world size) the mean of
the per-process losses equals the single-process loss, and each process's gradient on its own
outputs equals ``world_size ×`` the single-process gradient on those outputs, so DDP's gradient
averaging gives exactly the single-process parameter gradients. A per-process count would only pass
if every process held the same number of images, positives and valid anchors; here none of them is.
One spawn runs every check.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from detector.losses import YOLOLoss, load_recipe

WORLD = 2
RECIPES = sorted(Path(__file__).resolve().parents[1].glob("configs/losses/*.yaml"))
ANCHORS = (
    torch.tensor([[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]])
    / 3.0
)
STRIDES = [8, 16, 32]
BOXES_PER_IMAGE = (6, 4, 5, 1)  # rank 0: images 0-2 (15 boxes); rank 1: image 3 (1 box)
SPLIT = {0: slice(0, 3), 1: slice(3, 4)}
MODES = [
    "batch",
    "num_pos",
    "num_anchors",
    "valid",
    {"objectness": "valid", "classification": "batch", "box": "num_pos"},
]


def _batch(step: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """4 images at 96 px, 5 classes; boxes near anchor shapes so that the ignore mask is active."""
    g = torch.Generator().manual_seed(100 + step)
    outs = [torch.randn(4, 3, s, s, 10, generator=g) * 0.7 for s in (12, 6, 3)]
    for o in outs:
        o[..., 4] -= 2.0  # a realistic share of confident negatives, some above ISR-N's score floor
    targets = []
    for n in BOXES_PER_IMAGE:
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 30 + 4
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 5, (n,), generator=g)})
    return outs, targets


def _losses() -> dict[str, YOLOLoss]:
    losses = {recipe.stem: load_recipe(recipe) for recipe in RECIPES}
    for mode in MODES:
        losses[f"paper/{mode}"] = YOLOLoss(normalize=mode)  # type: ignore[arg-type]
    return losses


def _run(images: slice) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for name, loss_fn in _losses().items():
        for step in range(2 if name == "ghm" else 1):  # GHM-C's second step uses the momentum of the first
            outs, targets = _batch(step)
            outs = [o[images].clone().requires_grad_() for o in outs]
            out = loss_fn(outs, targets[images], ANCHORS, STRIDES)
            out["loss"].backward()
            results[f"{name}/{step}"] = {
                "loss": out["loss"].detach(),
                "parts": torch.stack([out[k] for k in ("loss_obj", "loss_cls", "loss_box")]),
                "num_pos": out["num_pos"],
                "grads": torch.cat([o.grad.reshape(o.shape[0], -1) for o in outs], 1),
            }
    return results


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_run(SPLIT[rank]), f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_recipe_file_builds() -> None:
    assert {r.stem for r in RECIPES} >= {
        "darknet",
        "mse_obj",
        "paper",
        "focal",
        "ghm",
        "pisa",
        "softmax",
        "giou",
        "ciou",
    }
    names = {r.stem: type(load_recipe(r).objectness).__name__ for r in RECIPES}
    assert names["mse_obj"] == "MSEObjectness" and names["darknet"] == "BCEObjectness"
    assert names["focal"] == "FocalLoss" and names["pisa"] == "ISR" and names["ghm"] == "GHMC"


@pytest.mark.timeout(300)
def test_every_recipe_and_normaliser_is_ddp_exact_with_uneven_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run(slice(None))
    assert len(single) == len(RECIPES) + len(MODES) + 1
    wrong = []  # every (configuration, quantity) that differs, so a failure names them all
    for key, ref in single.items():
        pos = [int(p[key]["num_pos"]) for p in parts]
        assert pos[0] >= 5 * pos[1] >= 5, f"{key}: positives per process {pos} are not uneven"
        assert ref["grads"].abs().sum() > 0
        checks = {
            "loss": (torch.stack([p[key]["loss"] for p in parts]).mean(), ref["loss"]),
            "parts": (torch.stack([p[key]["parts"] for p in parts]).mean(0), ref["parts"]),
            "grads": (torch.cat([p[key]["grads"] for p in parts]) / WORLD, ref["grads"]),
        }
        for what, (ddp, one) in checks.items():
            if not torch.allclose(ddp, one, rtol=1e-5, atol=1e-6):
                wrong.append(f"{key} {what}: max diff {(ddp - one).abs().max():.2e}")
    assert not wrong, "DDP differs from one process:\n" + "\n".join(wrong)
