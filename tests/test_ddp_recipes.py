"""Every loss recipe is DDP-exact: 2 CPU processes (gloo) holding half a batch each compute the
loss and gradients of one process holding the whole batch (issue: DDP-correct normalisers).

With ``YOLOLoss``'s normaliser (summed over processes, divided by the world size) the mean of the
per-process losses equals the single-process loss, and each process's gradient on its own
outputs equals ``world_size ×`` the single-process gradient on those outputs, so DDP's gradient
averaging gives exactly the single-process parameter gradients.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from detector.losses import load_recipe

WORLD = 2
RECIPES = sorted(Path(__file__).resolve().parents[1].glob("configs/losses/*.yaml"))
ANCHORS = (
    torch.tensor([[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]])
    / 3.0
)
STRIDES = [8, 16, 32]


def _batch(step: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """4 images at 128 px, 5 classes; image 3 has no ground truth."""
    g = torch.Generator().manual_seed(100 + step)
    outs = [torch.randn(4, 3, s, s, 10, generator=g) for s in (16, 8, 4)]
    for o in outs:
        o[..., 4] -= 2.0  # a realistic share of confident negatives, some above ISR-N's score floor
    targets = []
    for n in (3, 1, 4, 0):
        xy = torch.rand(n, 2, generator=g) * 90
        wh = torch.rand(n, 2, generator=g) * 35 + 4
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 5, (n,), generator=g)})
    return outs, targets


def _run(images: slice) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for recipe in RECIPES:
        loss_fn = load_recipe(recipe)
        for step in range(2):  # GHM-C's second step uses the momentum of the first
            outs, targets = _batch(step)
            outs = [o[images].clone().requires_grad_() for o in outs]
            out = loss_fn(outs, targets[images], ANCHORS, STRIDES)
            out["loss"].backward()
            results[f"{recipe.stem}/{step}"] = {
                "loss": out["loss"].detach(),
                "grads": torch.cat([o.grad.reshape(o.shape[0], -1) for o in outs], 1),
            }
    return results


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_run(slice(2 * rank, 2 * rank + 2)), f"{path}/rank{rank}.pt")
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
    assert (
        names["mse_obj"] == "MSEObjectness"
        and names["darknet"] == "BCEObjectness"
        and names["focal"] == "FocalLoss"
        and names["pisa"] == "ISR"
    )


@pytest.mark.timeout(300)
def test_every_recipe_is_ddp_exact(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run(slice(None))
    for key, ref in single.items():
        mean = torch.stack([p[key]["loss"] for p in parts]).mean()
        torch.testing.assert_close(mean, ref["loss"], rtol=1e-5, atol=1e-5, msg=f"{key}: loss")
        grads = torch.cat([p[key]["grads"] for p in parts]) / WORLD
        torch.testing.assert_close(grads, ref["grads"], rtol=1e-5, atol=1e-5, msg=f"{key}: gradients")
        assert ref["grads"].abs().sum() > 0
