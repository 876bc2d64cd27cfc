"""Collectives that reduce to the identity outside ``torch.distributed``.

The YOLO loss and the stateful losses use these so that N processes holding 1/N of a
batch each compute the loss of one process holding the whole batch (docs/losses.md, Normalisers).
None of them carries gradient: they move normalisers, counts and ranking keys only.

This module is not a pure op, hence not in ``ops/``: it reads one piece of context, whether
collectives are allowed here (:func:`local_only`). Evaluation turns them off because ranks may
hold different numbers of batches; passing that flag through every loss's ``forward`` would
break the loss contract (``forward(logits, targets, weight)``), so it is a ``ContextVar``, scoped
to the ``with`` block (and to its thread), not a module global.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor

_collectives_off: ContextVar[bool] = ContextVar("collectives_off", default=False)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process (and outside :func:`local_only`)."""
    return not _collectives_off.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local_only() -> Iterator[None]:
    """Within this block every helper acts as in a single process: no collective is issued.

    Evaluation computes its loss inside it: under DDP ranks may hold different numbers of
    validation batches (no padding, no duplicated images), so a collective there would hang.
    """
    token = _collectives_off.set(True)
    try:
        yield
    finally:
        _collectives_off.reset(token)


def world_size() -> int:
    """Number of processes in the default group (1 outside DDP)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Global rank of this process (0 outside DDP)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over all processes (a detached copy; ``t`` is untouched)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``t [n_k, ...]`` over processes along dim 0, rank order.

    Processes may hold different ``n_k``; rows are padded to the largest and the padding
    dropped again. Returns ``(gathered [sum n_k, ...], offset)`` where ``offset`` is where
    this process's own rows start, so ``gathered[offset:offset + n]`` is ``t`` again.
    """
    t = t.detach()
    if not is_distributed():
        return t, 0
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    offset = sum(counts[: rank()])
    return torch.cat([o[:c] for o, c in zip(out, counts)]), offset
