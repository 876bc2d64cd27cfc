"""Exponential moving average of the weights, validated and checkpointed (Lightning's ``WeightAveraging``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor


def ema_multi_avg_fn(decay: float, warmup_steps: float) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """In-place EMA update of lists of tensors, with the decay ramped up over the first updates.

    ``d_n = decay · (1 − exp(−n / warmup_steps))`` for the n-th update (n ≥ 1; the first update,
    n = 0, copies the weights, see ``torch.optim.swa_utils.AveragedModel``), then
    ``ema ← ema + (1 − d_n)·(w − ema)`` (``torch.lerp``: exact when ``ema == w``, so constant
    buffers such as the anchors stay bit-identical). Integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. ``warmup_steps = 0`` turns the ramp off.
    As in Ultralytics' ``ModelEMA``, the ramp lets the average follow the fast early changes
    instead of being dragged by the random initialisation for ~1/(1 − decay) steps.
    """

    @torch.no_grad()
    def update(ema: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        n = int(num_averaged)
        d = decay * (1.0 - math.exp(-n / warmup_steps)) if warmup_steps > 0 else decay
        if torch.is_floating_point(ema[0]):
            torch._foreach_lerp_(ema, current, 1.0 - d)
        else:
            torch._foreach_copy_(ema, current)

    return update


class EMA(WeightAveraging):
    """EMA of every parameter and buffer of the LightningModule (BatchNorm statistics included).

    Lightning's ``WeightAveraging`` does the rest: the average is updated after every optimizer
    step; **validation runs with the averaged weights** (swapped in at the start of each validation
    epoch and out at its end); a checkpoint's ``state_dict`` holds the **averaged** weights (so
    ``validate``/``test``/``predict``/export from a checkpoint use them), with the raw weights in
    ``current_model_state`` and the update count in ``averaging_state``, from which ``--ckpt_path``
    resumes exactly; when training ends the averaged weights are copied into the model.
    Stateful-loss buffers (GHM-C's running bin counts) are averaged too; validation reads them
    but never writes them, and the raw ones are restored after validation and on resume.
    Outside ``fit`` (``validate``/``test``/``predict``, the CLI's validation after fit) nothing is
    swapped: the model holds the checkpoint's ``state_dict``, i.e. the averaged weights.

    Args:
        decay: the EMA decay at the end of the ramp; the average spans ~1/(1 − decay) steps.
        warmup_steps: τ of the ramp ``decay·(1 − exp(−n/τ))`` (0 = constant decay).
        update_every_n_steps: update after every n-th optimizer step.
        device: where the averaged copy lives (``"cpu"`` saves accelerator memory); the model's device when None.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup_steps: float = 200.0,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=ema_multi_avg_fn(decay, warmup_steps))
        self.decay, self.warmup_steps, self.update_every_n_steps = decay, warmup_steps, update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every ``update_every_n_steps``-th optimizer step (``step_idx`` is zero-based); never per epoch."""
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Resume the average and the raw weights when fitting; otherwise keep the averaged ``state_dict``."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the averaged weights in for validation while fitting; outside fit the model already holds them."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the raw weights back after a validation while fitting; nothing to undo outside fit."""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)
