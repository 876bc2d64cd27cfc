"""Data pipeline speed: per-worker transform throughput and the share of a training step spent waiting.

    python benchmarks/data.py                 # both parts on the embedded shapes data
    python benchmarks/data.py --steps 60      # a longer fit
    python benchmarks/data.py --parts 1       # only the worker throughput

1. Throughput of one loader worker (one process, one cv2 thread): ``dataset[i]`` + ``collate``
   per second at 416, letterbox+jitter vs mosaic, decoding every image vs the RAM cache.
2. A real short fit of the ``nano`` preset on CPU (320 px, the default ``num_workers``): the
   time the loop waits in ``next(dataloader)`` (Lightning's ``SimpleProfiler`` action
   ``[_TrainingEpochLoop].train_dataloader_next``) over the wall time of the same steps,
   skipping the first ``--skip`` steps (worker start-up). Target: < 10 %.
Timings on a shared machine are noisy; compare ratios printed in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import cv2
import lightning as L
import torch
from lightning.pytorch.profilers import SimpleProfiler

from detector.data import DetectionDataModule, ShapesConfig, collate
from detector.data.pipeline.samplers import ItemKey
from detector.module import DetectorModule

NEXT = "[_TrainingEpochLoop].train_dataloader_next"
STEP = "run_training_batch"


def worker_throughput(root: str, size: int, configs: dict[str, dict], n: int, rounds: int) -> dict[str, float]:
    """Images/s of ``train_set[i]`` + collate in this process (what one loader worker does), per config.

    The configs take turns for ``rounds`` rounds and each keeps its best round, so that load from
    other processes on a shared machine hits them alike.
    """
    sets = {}
    for name, kwargs in configs.items():
        dm = DetectionDataModule(root=root, image_size=size, num_workers=0, **kwargs)
        dm.setup("fit")
        sets[name] = dm.train_set
    best = dict.fromkeys(configs, 0.0)
    for r in range(rounds):
        for name, ds in sets.items():
            keys = [ItemKey((r * n + k) % len(ds), 0) for k in range(n)]
            start = time.perf_counter()
            for k in range(0, n, 8):
                collate([ds[key] for key in keys[k : k + 8]])
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def fit_wait_fraction(
    root: str, steps: int, skip: int, size: int, accelerator: str, **data_kwargs
) -> tuple[float, float]:
    """``(waiting share, seconds per step)`` over steps ``skip..steps`` of a nano fit."""
    L.seed_everything(0, verbose=False)
    dm = DetectionDataModule(root=root, image_size=size, batch_size=8, **data_kwargs)
    model = DetectorModule(class_names=dm.class_names, preset="nano")
    profiler = SimpleProfiler(dirpath=tempfile.mkdtemp(), filename="profile")  # its table goes to a file
    trainer = L.Trainer(
        accelerator=accelerator, max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, profiler=profiler,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    waits = profiler.recorded_durations[NEXT][skip + 1 : steps + 1]  # +1: the fetcher prefetches one batch
    runs = profiler.recorded_durations[STEP][skip:steps]
    total = sum(waits) + sum(runs)
    return sum(waits) / total, total / len(runs)


def throughput(args: argparse.Namespace) -> None:
    cv2.setNumThreads(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"1. one worker, 416 px, images/s (dataset[i] + collate, best of {args.rounds} x {args.images} images)")
    configs = {
        "letterbox + jitter, decode": {},
        "mosaic + jitter, decode": {"mosaic": 1.0},
        "letterbox + jitter, RAM cache": {"cache": True},
        "mosaic + jitter, RAM cache": {"mosaic": 1.0, "cache": True},
    }
    rates = worker_throughput(args.root, 416, configs, args.images, args.rounds)
    base = rates["letterbox + jitter, decode"]
    for name, rate in rates.items():
        print(f"   {name:<34} {rate:7.1f} img/s   x{rate / base:.2f}", flush=True)
    torch.set_num_threads(threads)


def wait_share(args: argparse.Namespace) -> None:
    print(f"2. nano fit on {args.accelerator}, 320 px, batch 8, default num_workers, steps {args.skip}..{args.steps}")
    for label, kwargs in [
        ("letterbox", {}),
        ("mosaic 1.0", {"mosaic": 1.0}),
        ("mosaic 1.0 + multi_scale [256, 416]", {"mosaic": 1.0, "multi_scale": (256, 416)}),
        ("mosaic 1.0 + cache", {"mosaic": 1.0, "cache": True}),
    ]:
        frac, step = fit_wait_fraction(args.root, args.steps, args.skip, 320, args.accelerator, **kwargs)
        print(f"   {label:<36} waiting {100 * frac:5.1f} % of the step   ({step * 1000:.0f} ms/step)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--images", type=int, default=80, help="images per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu", help="of the fit (part 2)")
    parser.add_argument("--parts", default="12", help="which parts to run, e.g. 1 or 2")
    args = parser.parse_args()
    DetectionDataModule(root=args.root, embedded=ShapesConfig(), num_workers=0)  # generate if missing

    if "1" in args.parts:
        throughput(args)
    if "2" in args.parts:
        wait_share(args)


if __name__ == "__main__":
    main()
