"""Data-parallel scaling: training images/s with 1 and N processes, and the scaling efficiency.

    python benchmarks/scaling.py                          # 1 and every GPU (NCCL), or 1 and 2 CPU processes (gloo)
    python benchmarks/scaling.py --processes 1 2 4 --threads 1 --accelerator cpu

Each run is a real ``Trainer.fit`` of ``DetectorModule`` with Lightning's DDP strategy (Lightning
starts the other processes itself) on an in-memory synthetic set, so it measures the model, the
loss with its all-reduced normaliser, DDP's gradient all-reduce and the optimizer, not image
decoding. The batch per process is fixed (weak scaling): with P processes a step trains P·batch
images. Rank 0 times the steps after ``--warmup``; then

    images/s(P)   = P · batch · steps / seconds
    efficiency(P) = images/s(P) / (P · images/s(1))      1.0 = perfect linear scaling

On a CPU the processes share the machine: give each ``--threads`` threads so that P·threads
does not exceed the cores, else the processes only take turns and the efficiency says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_targets  # noqa: E402

from detector.data import collate  # noqa: E402
from detector.module import DetectorModule  # noqa: E402

CLASSES = ["a", "b", "c", "d", "e"]
MARK = "SCALING "


class SyntheticImages(Dataset):
    """``length`` items ``(uint8 image (3, S, S), target)``, 16 distinct random images and box sets."""

    def __init__(self, length: int, size: int, objects: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=g)
        self.targets = synthetic_targets(16, size, objects, len(CLASSES))
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = i % 16
        extra = {
            "image_id": torch.tensor(i),
            "orig_size": torch.tensor([self.size] * 2),
            "letterbox": torch.tensor([1.0, 0, 0]),
        }
        return self.images[k], {**self.targets[k], **extra}


class StepTimer(L.Callback):
    """Wall time of the training steps after the first ``warmup`` ones (GPU work synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            self.start = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seconds = self._now(trainer) - self.start


def worker(args: argparse.Namespace) -> None:
    """One measurement with ``args.worker`` processes; Lightning re-runs this command for ranks > 0."""
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    procs, gpu = args.worker, args.accelerator == "gpu"  # gpu: NCCL (Lightning's default backend on CUDA)
    steps = args.warmup + args.steps
    data = DataLoader(SyntheticImages(procs * args.batch * steps, args.size), batch_size=args.batch, collate_fn=collate)
    model = DetectorModule(CLASSES, preset=args.preset, warmup_epochs=0.0)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=procs, strategy="ddp" if procs > 1 else "auto", max_steps=steps,
        precision=args.precision or ("bf16-mixed" if gpu else "32-true"), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, data)
    if trainer.is_global_zero:
        rate = procs * args.batch * args.steps / timer.seconds
        backend = trainer.strategy.process_group_backend if procs > 1 else "-"
        print(MARK + json.dumps({"processes": procs, "images_per_s": rate, "backend": backend}), flush=True)


def measure(args: argparse.Namespace, procs: int) -> dict:
    """Run ``worker`` with ``procs`` processes in a fresh interpreter; its rank-0 result."""
    cmd = [sys.executable, __file__, "--worker", str(procs), *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{procs} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, nargs="+", help="process counts (default: 1 and every GPU, or 1 2 on CPU)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--batch", type=int, default=8, help="images per process and step")
    p.add_argument("--size", type=int, default=320, help="input side in pixels")
    p.add_argument("--preset", default="nano")
    p.add_argument("--precision", help="Trainer precision (default: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.accelerator == "auto":
        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return worker(args)
    gpus = torch.cuda.device_count() if args.accelerator == "gpu" else 0
    counts = args.processes or ([1, gpus] if gpus > 1 else [1] if gpus else [1, 2])
    print(
        f"{args.accelerator}, {args.preset} @ {args.size} px, batch {args.batch} per process, {args.threads} thread(s) each"
    )
    print(f"{'processes':>9} {'images/s':>10} {'speed-up':>9} {'efficiency':>10}  backend")
    base = None
    for procs in sorted(set(counts)):
        r = measure(args, procs)
        if procs == 1:
            base = r["images_per_s"]
        speedup = r["images_per_s"] / base if base else float("nan")
        print(
            f"{procs:>9} {r['images_per_s']:>10.1f} {speedup:>9.2f} {speedup / procs:>10.2f}  {r['backend']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
