"""Cost of assignment + loss (forward and backward) as a fraction of a training step, per recipe.

    python benchmarks/losses.py                 # nano @ 320 and yolov3 @ 416, batch 16, 20 objects/image
    python benchmarks/losses.py --presets nano  # quicker

For each preset it times, on one synthetic batch:
  - the bare step: model forward, backward of the outputs' gradients, SGD step (no loss);
  - per recipe: YOLOLoss forward + backward on the (detached) raw outputs.
The fraction printed is ``loss / (bare + loss)``, i.e. the loss's share of a full step with
that recipe; one real full step with the default recipe is timed too, as a check of the sum.

Then GHM-C and ISR-P against their straightforward formulations (benchmarks/loss_references.py)
on COCO-scale inputs: 16 × 10,647 anchors × 80 classes for GHM-C; 16 images × 30 ground truths
× 10 positives for ISR-P; values are checked equal. Last, ISR-N with and without the optional
candidate cap ``neg_topk = 2000`` (the paper has none) on random outputs. Targets (issue 3): loss ≤ 3 % of the step for
the default recipe and ≤ 5 % for every recipe; GHM-C ≥ 4× and ISR-P ≥ 7× their references.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_targets, timeit  # noqa: E402
from loss_references import ghmc_reference, ghmc_reference_weights, isr_p_reference  # noqa: E402

from detector.losses import BCE, GHMC, ISR, SampleInfo, YOLOLoss, load_recipe  # noqa: E402
from detector.models import YOLOv3  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"nano": 320, "yolov3": 416, "yolov3-tiny": 416}


def bench_preset(preset: str, batch: int, objects: int, classes: int, repeat: int) -> None:
    size = SIZES[preset]
    model = YOLOv3(classes, preset)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.rand(batch, 3, size, size)
    targets = synthetic_targets(batch, size, objects, classes)
    outs = [o.detach() for o in model(images)]
    grads = [torch.randn_like(o) * 1e-3 for o in outs]

    def bare() -> None:
        torch.autograd.backward(model(images), grads)
        opt.step()
        opt.zero_grad(set_to_none=True)

    default = YOLOLoss()

    def full() -> None:
        default(model(images), targets, model.anchors, model.strides)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_bare = timeit(bare, repeat)
    t_full = timeit(full, repeat)
    print(f"\n{preset} @ {size}, batch {batch}, {objects} objects/image: bare step {t_bare * 1e3:.0f} ms, "
          f"full step (default recipe) {t_full * 1e3:.0f} ms")  # fmt: skip
    print("| recipe | loss fwd+bwd (ms) | share of step |\n|---|---:|---:|")
    recipes = {"default": default} | {p.stem: load_recipe(p) for p in sorted((ROOT / "configs/losses").glob("*.yaml"))}

    def loss_step(loss_fn: YOLOLoss, leaves: list[torch.Tensor]) -> None:
        for leaf in leaves:  # as in training: nothing accumulates into the outputs' .grad
            leaf.grad = None
        loss_fn(leaves, targets, model.anchors, model.strides)["loss"].backward()

    for name, loss_fn in recipes.items():
        leaves = [o.clone().requires_grad_() for o in outs]
        t_loss = timeit(partial(loss_step, loss_fn, leaves), max(repeat, 5))
        print(f"| {name} | {t_loss * 1e3:.1f} | {100 * t_loss / (t_bare + t_loss):.2f} % |")


def bench_ghmc() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 16 * 10647, 80
    logits = torch.randn(n, c, generator=g) * 3
    targets = (torch.rand(n, c, generator=g) < 0.01).float()
    weight = (torch.rand(n, c, generator=g) < 0.95).float()
    ours, acc = GHMC(30, 0.75), torch.zeros(30)
    a, b = ours(logits, targets, weight), ghmc_reference(logits, targets, weight, acc, 30, 0.75)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), "GHM-C differs from the reference"
    t_w = timeit(lambda: ours.harmonizing_weights(logits, targets, weight), 5)
    t_ref_w = timeit(lambda: ghmc_reference_weights(logits, targets, weight, acc.clone(), 30, 0.75), 3)
    t_ours = timeit(lambda: ours(logits, targets, weight), 5)
    t_ref = timeit(lambda: ghmc_reference(logits, targets, weight, acc.clone(), 30, 0.75), 3)
    print(f"\nGHM-C 16 x 10647 x 80, equal values: weights {t_w * 1e3:.0f} ms vs loop over bins {t_ref_w * 1e3:.0f} ms: "
          f"{t_ref_w / t_w:.1f}x faster; with the BCE both share: {t_ours * 1e3:.0f} vs {t_ref * 1e3:.0f} ms: {t_ref / t_ours:.1f}x")  # fmt: skip


def bench_isr_p() -> None:
    g = torch.Generator().manual_seed(0)
    images, gts, per_gt, c = 16, 30, 10, 80
    p = images * gts * per_gt
    gt_ids = torch.arange(images * gts).repeat_interleave(per_gt)
    labels = torch.randint(0, c, (images * gts,), generator=g)[gt_ids]
    ious = torch.rand(p, generator=g)
    loss = torch.rand(p, c, generator=g)
    info = SampleInfo(labels, gt_ids, ious, torch.zeros(p, 4), torch.zeros(p), gt_ids // gts)
    isr = ISR(BCE(), isr_n=False)
    ours = loss * isr.row_weights(loss, None, info)[:, None]
    assert torch.allclose(ours, isr_p_reference(loss, labels, gt_ids, ious), rtol=1e-5, atol=1e-6), "ISR-P differs"
    t_ours = timeit(lambda: loss * isr.row_weights(loss, None, info)[:, None], 10)
    t_ref = timeit(lambda: isr_p_reference(loss, labels, gt_ids, ious), 5)
    print(f"ISR-P 16 images x 30 gts x 10 positives, 80 classes, equal values: reweighting {t_ours * 1e3:.1f} ms vs "
          f"loops over classes and gts {t_ref * 1e3:.1f} ms: {t_ref / t_ours:.1f}x faster")  # fmt: skip


def bench_isr_n_cap(shifts: list[float], batch: int = 16, size: int = 320, classes: int = 80) -> None:
    """ISR-N with and without ``neg_topk = 2000`` on random outputs (N(0, 1), objectness shifted by
    ``shift``): how many negatives score above 0.05, how many the cap keeps, and the pisa recipe's
    loss forward + backward time either way."""
    model = YOLOv3(classes, "nano")
    targets = synthetic_targets(batch, size, 20, classes)
    print(f"\nISR-N candidate cap, pisa recipe, nano @ {size}, batch {batch}, 20 objects/image, random outputs")
    print("| objectness shift | candidates | kept by neg_topk 2000 | no cap (ms) | cap 2000 (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shift in shifts:
        g = torch.Generator().manual_seed(0)
        outs = [torch.randn(batch, 3, size // s, size // s, 5 + classes, generator=g) for s in model.strides]
        for o in outs:
            o[..., 4] += shift
        times, counts = {}, {}
        for cap in (None, 2000):
            loss_fn = load_recipe(ROOT / "configs/losses/pisa.yaml")
            assert isinstance(loss_fn.objectness, ISR)
            loss_fn.objectness.__class__ = _CountingISR  # the same module, counting its candidates
            loss_fn.objectness.neg_topk = cap
            leaves = [o.clone().requires_grad_() for o in outs]
            times[cap] = timeit(partial(_loss_step, loss_fn, leaves, targets, model), 1)
            counts[cap] = loss_fn.objectness.seen
        print(f"| {shift} | {counts[None][0]} | {counts[2000][1]} | {times[None] * 1e3:.0f} | "
              f"{times[2000] * 1e3:.0f} | {times[None] / times[2000]:.1f}x |")  # fmt: skip


class _CountingISR(ISR):
    """ISR that keeps (negatives above the score floor, negatives taking part) of its last call."""

    seen: tuple[int, int] = (0, 0)

    def _negative_weights(self, info: SampleInfo, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cand, w = super()._negative_weights(info, neg)
        self.seen = (int((neg & (info.scores > self.neg_score_thresh)).sum()), int(cand.sum()))
        return cand, w


def _loss_step(loss_fn: YOLOLoss, leaves: list[torch.Tensor], targets: list[dict], model: YOLOv3) -> None:
    for leaf in leaves:
        leaf.grad = None
    loss_fn(leaves, targets, model.anchors, model.strides)["loss"].backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["nano", "yolov3"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--isr-shifts", nargs="*", type=float, default=[-4.0, -3.0, -2.0],
                        help="objectness shifts of the ISR-N cap measurement (none: skip it)")  # fmt: skip
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        bench_preset(preset, args.batch, args.objects, args.classes, args.repeat if preset == "nano" else 1)
    bench_ghmc()
    bench_isr_p()
    if args.isr_shifts:
        bench_isr_n_cap(args.isr_shifts)


if __name__ == "__main__":
    main()
