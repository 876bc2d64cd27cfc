"""Non-finite checks for the training step: one check per optimizer step, agreed across processes,
buffer roll-back, checkpoint scan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed as dist


def nonfinite_flag(tensors: Iterable[Tensor]) -> Tensor:
    """``1.0`` if any element of ``tensors`` is NaN or ±Inf, else ``0.0``: a float32 scalar on their
    device, computed without a host sync.

    Tested on the float32 sum of each tensor (one reduction pass, no [N] bool tensor): NaN and
    ±Inf propagate into it; a sum that overflows float32 (mean |x| > ~1e38 / numel) also counts
    as non-finite, which only values that would overflow the loss anyway reach.
    """
    total = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors]).sum()  # ()
    return (~total.isfinite()).to(torch.float32)


@dataclass
class Nonfinite:
    """What the guard found in a step: ``what`` was non-finite (``network outputs``, ``loss`` or
    ``gradients``; the first in that order), the image ids of the batches it concerns on this
    process, and the losses of the step's batches on this process."""

    what: str
    image_ids: list[int]
    losses: list[float]


class StepGuard:
    """The non-finite guard's record of one optimizer step, and its one check of that step.

    ``begin()`` before each forward pass (the first one of a step snapshots the buffers),
    ``record(outputs, loss, image_ids)`` after the loss (device-side flags, no host sync) and
    ``check(grads)`` before the optimizer step, once the gradients are there: it flags

        outputs  any of the network outputs of the step's batches is NaN/±Inf,
        loss     any of their losses is,
        grads    the gradient norm ‖g‖₂ (``torch.nn.utils.get_total_norm``) is: a NaN/Inf
                 gradient, or finite ones whose norm overflows float32 (‖g‖₂ > 3.4e38),

    sums the three flags over all processes (one all-reduce under DDP: every process takes the same
    branch, and none waits in a collective the others skip) and reads them with **one host sync**
    per step. A finite loss can have non-finite gradients (a learning rate that has already blown the
    weights up: loss 8e29, gradients inf), so the loss alone is not enough. Under DDP the gradients are
    already averaged over the processes when checked, so a NaN on one process shows on all.
    """

    def __init__(self, module: nn.Module) -> None:
        self.snapshot = BufferSnapshot(module)
        self.batches: list[tuple[Tensor, Tensor, list[Tensor | None]]] = []  # (flags (2,), loss, ids) per batch

    def begin(self) -> None:
        """Before a forward pass: snapshot the buffers if this is the first batch of the step."""
        if not self.batches:
            self.snapshot.take()

    def record(self, outputs: list[Tensor], loss: Tensor, image_ids: list[Tensor | None]) -> None:
        """After the loss: remember whether ``outputs`` / ``loss`` are finite (on device) and the batch's
        image ids (``None`` for a target without one)."""
        flags = torch.stack([nonfinite_flag(outputs), nonfinite_flag([loss])])  # (2,)
        self.batches.append((flags, loss.detach(), image_ids))

    def check(self, grads: list[Tensor] | None) -> Nonfinite | None:
        """The step's verdict on every process, ``None`` when all is finite; forgets the step.

        ``grads``: the gradients the optimizer is about to apply; ``None`` leaves them unchecked
        (a ``GradScaler`` skips steps with non-finite gradients itself).
        """
        batches, self.batches = self.batches, []
        if not batches:
            return None
        local = torch.stack([flags for flags, _, _ in batches]).amax(0)  # (2,) outputs, loss
        grad_flag = torch.zeros_like(local[:1])
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            grad_flag = (~norm.isfinite()).to(torch.float32).view(1).to(local.device)
        outputs_bad, loss_bad, grads_bad = dist.all_reduce_sum(torch.cat([local, grad_flag])).tolist()  # the sync
        if not (outputs_bad or loss_bad or grads_bad):
            return None
        what = "network outputs" if outputs_bad else "loss" if loss_bad else "gradients"
        mine = [b for b in batches if bool(b[0].any())] or batches  # the batches to blame on this process
        ids = [int(i) for _, _, image_ids in mine for i in image_ids if i is not None]
        return Nonfinite(what, ids, [float(loss) for _, loss, _ in batches])


class BufferSnapshot:
    """Copies of a module's buffers (BatchNorm statistics and counters, GHM-C running counts) taken
    before a forward pass, restored when the step is skipped: a forward pass in training mode writes
    its batch statistics into them, and one NaN image would poison them for the rest of the run.

    ``take()`` costs one fused copy of the buffers (tens of KB for ``nano``, ~0.2 MB for ``yolov3``).
    """

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())
        self.copies = [torch.empty_like(b) for b in self.buffers]

    def take(self) -> None:
        """Copy every buffer into the snapshot."""
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        """Copy the snapshot back into the buffers."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)


def nonfinite_entries(state: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [
        k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not bool(v.isfinite().all())
    ]
