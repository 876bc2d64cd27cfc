"""Overhead of the real training step over the bare network step, and GPU throughput with mixed precision.

    python benchmarks/train_step.py                                   # CPU: nano @ 320 and yolov3 @ 416, batch 16
    python benchmarks/train_step.py --presets nano --steps 6          # quicker
    python benchmarks/train_step.py --device cuda --precision bf16-mixed --presets yolov3   # images/s on one GPU

Both steps run on the same synthetic batch (``benchmarks/common.py``: 20 random boxes per image):
  - bare: network forward, backward of ``Σ outputs``, SGD step (plain PyTorch loop);
  - full: ``lightning.Trainer.fit`` of ``DetectorModule`` (default recipe and optimizer groups,
    gradient clipping at 10 as in configs/default.yaml, non-finite guard), fed the batch from a
    CPU dataloader so each step includes the transfer to the device; optionally with ``EMA``.
Times are the mean per step after ``--warmup`` steps (device synchronised at both ends).
Target (issue 7): full / bare ≤ 1.05 on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_targets

from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
try:
    from detector.callbacks.ema import EMA
except ModuleNotFoundError:  # a GPU image without the data/W&B dependencies that detector.callbacks imports
    _spec = importlib.util.spec_from_file_location("detector_ema", ROOT / "detector" / "callbacks" / "ema.py")
    _ema = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_ema)
    EMA = _ema.EMA
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

SIZES = {"nano": 320, "yolov3": 416, "yolov3-tiny": 416}
CLASSES = [f"c{i}" for i in range(80)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.start, self.end, self.steps = warmup, device, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            _sync(self.device)
            self.start = time.perf_counter()
        elif batch_idx >= self.warmup:
            _sync(self.device)
            self.end, self.steps = time.perf_counter(), batch_idx - self.warmup + 1


def disable_guard() -> None:
    """No non-finite check and no buffer snapshot in ``DetectorModule``'s steps (measurement only)."""
    from detector import module

    class NoGuard:
        def __init__(self, _: torch.nn.Module) -> None: ...
        def begin(self) -> None: ...
        def record(self, *args: object) -> None: ...
        def check(self, _: object) -> None: ...

    module.StepGuard = NoGuard


def _module(preset: str, channels_last: bool) -> DetectorModule:
    try:
        return DetectorModule(CLASSES, preset, warmup_epochs=0, channels_last=channels_last)
    except ModuleNotFoundError:  # the mAP backend (faster_coco_eval) is absent: training never uses it
        DetectorModule._make_metric = staticmethod(lambda: torch.nn.Identity())  # type: ignore[method-assign]
        return DetectorModule(CLASSES, preset, warmup_epochs=0, channels_last=channels_last)


def time_full(preset: str, batch: list, args: argparse.Namespace, ema: bool) -> float:
    """Seconds per step of ``Trainer.fit`` on ``batch`` repeated."""
    module = _module(preset, args.channels_last)
    loader = torch.utils.data.DataLoader([batch] * (args.warmup + args.steps), batch_size=None)
    clock = StepClock(args.warmup, args.device)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision, max_epochs=1,
        gradient_clip_val=10.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[clock] + ([EMA()] if ema else []),
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return (clock.end - clock.start) / clock.steps


def time_bare(preset: str, batch: list, args: argparse.Namespace) -> float:
    """Seconds per step of forward, backward of the outputs' sum and SGD, same autocast as ``--precision``."""
    net = _module(preset, args.channels_last).model.to(args.device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images = batch[0].to(args.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(args.device)
            start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(o.float().sum() for o in net(images))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(args.device)
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["nano", "yolov3"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-guard", action="store_true", help="measure without the non-finite guard (its cost)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, help="timed steps (default: 10 nano, 3 yolov3 on CPU; 30 on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda but torch sees no GPU\n")
    if args.no_guard:
        disable_guard()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"precision {args.precision}, channels_last {args.channels_last}, guard {not args.no_guard}, batch {args.batch}, {args.objects} objects/image")  # fmt: skip
    print(
        "| preset @ size | bare step (ms) | full step (ms) | full / bare | full + EMA (ms) | (full + EMA) / bare | images/s (full) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        size, steps = SIZES[preset], args.steps
        args.steps = steps or (30 if args.device == "cuda" else 10 if preset == "nano" else 3)
        images = torch.rand(args.batch, 3, size, size)
        batch = [images, synthetic_targets(args.batch, size, args.objects, len(CLASSES))]
        for i, t in enumerate(batch[1]):
            t["image_id"] = torch.tensor(i)
        bare = time_bare(preset, batch, args)
        full = time_full(preset, batch, args, ema=False)
        full_ema = time_full(preset, batch, args, ema=True)
        print(f"| {preset} @ {size} | {bare * 1e3:.1f} | {full * 1e3:.1f} | {full / bare:.3f} | {full_ema * 1e3:.1f} | "
              f"{full_ema / bare:.3f} | {args.batch / full:.1f} |", flush=True)  # fmt: skip
        args.steps = steps


if __name__ == "__main__":
    main()
