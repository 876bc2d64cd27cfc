"""Cost of a validation epoch over the bare forward pass on the same images (``nano`` on CPU).

    python benchmarks/eval.py                    # 64 validation images of the embedded shapes set at 320
    python benchmarks/eval.py --ckpt runs/.../last.ckpt   # a trained model's detections
    python benchmarks/eval.py --threads 1        # steadier on a busy machine

Both sides see the same preloaded batches (no data loading), one thread count, inference mode:
  - bare: ``model(images)`` for every batch;
  - validation: ``Trainer.validate`` of the real ``DetectorModule`` (forward, loss, post-processing,
    mapping back to original pixels, ``MeanAveragePrecision.update``, then ``compute``).
The ratio validation / bare is printed for each head state:
  - ``prior``: the untrained head (its prior biases: few scores above ``conf_thresh``);
  - ``busy``: objectness and class logits set to 0 (every score 0.25): the most candidates, the
    full ``max_candidates`` through NMS and ``max_det`` detections per image into the metric;
  - ``ckpt``: the weights of ``--ckpt`` when given.
Target (issue 4): ratio ≤ 1.3. A breakdown follows: seconds per part of the evaluation step in
one pass without Lightning, batch after batch, and their sum over the forward time, a second
estimate that drifting load on a shared machine disturbs less (parts interleave batch by batch).
Timings on a shared machine are noisy; compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the detector package, installed or not
from detector.data import DetectionDataModule, ShapesConfig
from detector.module import DetectorModule
from detector.ops.boxes import unletterbox
from detector.ops.postprocess import postprocess

TARGET = 1.3


def load_batches(root: str, size: int, images: int, batch: int) -> tuple[list, list[str]]:
    """``images`` validation images of the embedded shapes set, collated in batches of ``batch``."""
    dm = DetectionDataModule(root=root, embedded=ShapesConfig(), image_size=size, batch_size=batch, num_workers=0)
    dm.setup("validate")
    batches = []
    for b in dm.val_dataloader():
        batches.append(b)
        if sum(len(x[0]) for x in batches) >= images:
            break
    return batches, dm.class_names


def make_busy(module: DetectorModule) -> None:
    """Objectness and class logits 0 everywhere: every (anchor, class) scores 0.25."""
    with torch.no_grad():
        for head in module.model.heads:
            conv = head[-1]
            conv.weight.view(module.model.num_anchors, -1, *conv.weight.shape[1:])[:, 4:].zero_()
            conv.bias.view(module.model.num_anchors, -1)[:, 4:].zero_()


def time_epoch(module: DetectorModule, batches: list, repeat: int) -> tuple[float, float]:
    """Best seconds of (bare forward over all batches, ``Trainer.validate`` over the same batches).

    The two alternate, after one warm-up each, and the fastest of ``repeat`` runs is kept: on a
    shared machine other processes only ever add time, so the minimum is the least disturbed.
    """
    module.eval()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    loader = DataLoader(batches, batch_size=None)

    def bare() -> None:
        with torch.inference_mode():
            for images, _ in batches:
                module(images)

    def validate() -> None:
        trainer.validate(module, dataloaders=loader, verbose=False)

    times: dict = {bare: [], validate: []}
    for _ in range(repeat + 1):
        for fn, seen in times.items():
            start = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - start)
    return min(times[bare][1:]), min(times[validate][1:])


def breakdown(module: DetectorModule, batches: list) -> dict[str, float]:
    """Seconds per part of the evaluation step, summed over the batches (one pass, after a warm-up)."""
    hp, model = module.hparams, module.model
    parts = dict.fromkeys(("forward", "loss", "postprocess", "update", "compute"), 0.0)
    metric = module._make_metric()
    with torch.inference_mode():
        for images, targets in batches:
            t0 = time.perf_counter()
            outputs = model(images)
            t1 = time.perf_counter()
            module.criterion(outputs, targets, model.anchors, model.strides)
            t2 = time.perf_counter()
            dets = postprocess(outputs, model.anchors, model.strides, hp.conf_thresh, hp.nms_iou, hp.max_det)
            t3 = time.perf_counter()
            preds = [
                {**d, "boxes": unletterbox(d["boxes"], t["letterbox"], t["orig_size"])} for d, t in zip(dets, targets)
            ]
            metric.update(preds, [{"boxes": t["orig_boxes"], "labels": t["orig_labels"]} for t in targets])
            t4 = time.perf_counter()
            for k, dt in zip(("forward", "loss", "postprocess", "update"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k] += dt
        t5 = time.perf_counter()
        metric.compute()
        parts["compute"] = time.perf_counter() - t5
    parts["detections/image"] = sum(len(d["scores"]) for d in dets) / len(dets)
    return parts


def eval_arguments(description: str, images: int) -> argparse.ArgumentParser:
    """The options both evaluation benchmarks take (this one and ``analysis.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default="data/shapes", help="embedded shapes dataset folder (generated if missing)")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def prepare(args: argparse.Namespace) -> tuple[list, list[str]]:
    """Seed, set the threads, and load ``args.images`` validation images in batches."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_batches(args.root, args.size, args.images, args.batch)


def main() -> None:
    parser = eval_arguments(__doc__.split("\n")[0], images=64)
    parser.add_argument("--ckpt", default=None, help="a trained checkpoint to time as well")
    args = parser.parse_args()
    batches, names = prepare(args)
    n = sum(len(b[0]) for b in batches)
    print(f"nano @ {args.size}, {n} images in batches of {args.batch}, {torch.get_num_threads()} threads")
    states = ["prior", "busy"] + (["ckpt"] if args.ckpt else [])
    for state in states:
        module = DetectorModule(names, "nano", weights=args.ckpt if state == "ckpt" else None)
        if state == "busy":
            make_busy(module)
        t_bare, t_val = time_epoch(module, batches, args.repeat)
        ratio = t_val / t_bare
        flag = "ok" if ratio <= TARGET else f"over the target {TARGET}"
        print(
            f"{state:6s} bare forward {t_bare:6.2f} s   validation epoch {t_val:6.2f} s   ratio {ratio:5.2f}  ({flag})"
        )
        parts = breakdown(module, batches)
        steps = sum(v for k, v in parts.items() if k != "detections/image")
        print(
            "       "
            + "   ".join(f"{k} {v:.3f}" for k, v in parts.items())
            + f"   (parts / forward {steps / parts['forward']:.2f})"
        )


if __name__ == "__main__":
    main()
