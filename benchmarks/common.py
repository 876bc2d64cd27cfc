"""Shared pieces of the benchmark scripts: synthetic batches and a timer."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synthetic_targets(
    batch: int, size: int, objects: int, classes: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``batch`` target dicts (``detector.structures.Target``) with ``objects`` random boxes each, 4..size/2 px wide."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = torch.rand(objects, 2, generator=g) * (size / 2 - 4) + 4
        xy = torch.rand(objects, 2, generator=g) * (size - wh)
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, classes, (objects,), generator=g)})
    return out


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
