"""DDP exactness of the batch-coupled losses (GHM-C, ISR, CARL) with 2 CPU processes (gloo).

Each process holds part of the batch (whole images, 3 on one process and 1 on the other) and normalises its summed loss by a count
all-reduced over processes; the per-process values must add up to the single-process value
on the whole batch (so their mean times the world size does), and the gradients on each
process's rows must equal the corresponding rows of the single-process gradients.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from detector.distributed import all_reduce_sum
from detector.losses import BCE, CARL, GHMC, ISR, BoxSet, GIoULoss, SampleInfo

WORLD = 2
IMAGES, ROWS_PER_IMAGE = 4, 9  # uneven: rank 0 holds images 0-2, rank 1 image 3


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """One global batch: objectness-like rows of 4 images, positives and clustered negatives."""
    g = torch.Generator().manual_seed(seed)
    n = IMAGES * ROWS_PER_IMAGE
    image_ids = torch.arange(IMAGES).repeat_interleave(ROWS_PER_IMAGE)
    centres = torch.rand(IMAGES, 3, 2, generator=g) * 0.6 + 0.2  # 3 clusters per image
    pick = torch.randint(0, 3, (n,), generator=g)
    ctr = centres[image_ids, pick] + torch.randn(n, 2, generator=g) * 0.02
    size = 0.1 + torch.rand(n, 2, generator=g) * 0.05
    gt_ids = torch.where(torch.rand(n, generator=g) < 0.4, image_ids * 10 + pick, -1)  # unique across images
    t_ctr = centres[image_ids, pick]
    return {
        "logits": torch.randn(n, 3, generator=g) * 2,
        "targets": (torch.rand(n, 3, generator=g) < 0.3).float(),
        "weight": (torch.rand(n, 3, generator=g) < 0.85).float(),
        "image_ids": image_ids,
        "gt_ids": gt_ids,
        "labels": torch.where(gt_ids >= 0, pick, -1),
        "ious": torch.rand(n, generator=g),
        "scores": torch.rand(n, generator=g),
        "boxes": torch.cat([ctr - size / 2, ctr + size / 2], 1),
        "target_boxes": torch.cat([t_ctr - 0.06, t_ctr + 0.06], 1),
    }


def _losses(rows: slice) -> dict[str, torch.Tensor]:
    """Losses (normalised by all-reduced counts) and gradients on ``rows`` of the global batch."""
    out: dict[str, torch.Tensor] = {}
    ghm = GHMC(bins=10, momentum=0.75)
    for step in range(2):  # the second step uses the running counts of the first
        b = {k: v[rows] for k, v in _batch(step).items()}
        x = b["logits"].clone().requires_grad_()
        loss = ghm(x, b["targets"], b["weight"]).sum() / all_reduce_sum((b["weight"] > 0).sum())
        loss.backward()
        out[f"ghm{step}"], out[f"ghm{step}_grad"] = loss.detach(), x.grad
    b = {k: v[rows] for k, v in _batch(7).items()}
    info = SampleInfo(b["labels"], b["gt_ids"], b["ious"], b["boxes"], b["scores"], b["image_ids"])
    num_pos = all_reduce_sum((b["gt_ids"] >= 0).sum())
    x = b["logits"][:, :1].clone().requires_grad_()  # objectness rows: C = 1, all anchors
    obj_t = (b["gt_ids"] >= 0).float()[:, None]
    loss = ISR(BCE(), neg_topk=12)(x, obj_t, b["weight"][:, :1], info).sum() / num_pos
    loss.backward()
    out["isr"], out["isr_grad"] = loss.detach(), x.grad
    pos = b["gt_ids"] >= 0
    cls_logit = b["logits"][pos, 0].clone().requires_grad_()
    xyxy = b["boxes"][pos].clone().requires_grad_()
    info = SampleInfo(*(t[pos] for t in (b["labels"], b["gt_ids"], b["ious"], b["boxes"], b["scores"], b["image_ids"])))
    info.cls_score = torch.sigmoid(cls_logit)
    pred, target = BoxSet(torch.zeros_like(xyxy), xyxy), BoxSet(torch.zeros_like(xyxy), b["target_boxes"][pos])
    loss = CARL(GIoULoss())(pred, target, None, info).sum() / num_pos
    loss.backward()
    out["carl"], out["carl_grad_score"], out["carl_grad_box"] = loss.detach(), cls_logit.grad, xyxy.grad
    out["pos"] = pos
    return out


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cut = 3 * ROWS_PER_IMAGE
        torch.save(_losses(slice(0, cut) if rank == 0 else slice(cut, None)), f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _losses(slice(None))
    for name in ("ghm0", "ghm1", "isr", "carl"):
        mean_scaled = torch.stack([WORLD * p[name] for p in parts]).mean()
        torch.testing.assert_close(mean_scaled, single[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in ("ghm0_grad", "ghm1_grad", "isr_grad", "carl_grad_score", "carl_grad_box"):
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), single[name], rtol=1e-5, atol=1e-6, msg=name)
    assert single["isr_grad"].abs().sum() > 0 and single["carl_grad_score"].abs().sum() > 0
    pos = [int(p["pos"].sum()) for p in parts]
    assert pos[0] > 2 * pos[1] > 0, pos  # both processes hold positives, unevenly
