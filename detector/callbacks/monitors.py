"""Monitors of the training run itself: learning rate, throughput, epoch times."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import ThroughputMonitor as _ThroughputMonitor

from ..structures import Target


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stands aside when the run has no logger
    (``--trainer.logger false``) instead of stopping the run."""

    def on_train_start(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        """Lightning's set-up of the logged learning rates; skipped without a logger (Lightning's would raise)."""
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)


def images_in_batch(batch: tuple[Any, list[Target]]) -> int:
    """Number of images B of a detection batch ``(images [B, 3, S, S], targets)``."""
    return len(batch[0])


class ThroughputMonitor(_ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for detection batches ``(images, targets)``: images per second.

    Logs ``train/device/samples_per_sec`` and ``train/device/batches_per_sec`` (over the last
    ``window_size`` batches, so from that many steps on; without validation time), the same for
    validation under ``validate/...`` (x-axis: validation batches), and ``train/samples``,
    ``train/time``. Under DDP also the totals over all processes (``train/samples_per_sec``).

    Args:
        window_size: batches averaged over.
        batch_size_fn: images in a batch; :func:`images_in_batch` by default.
    """

    def __init__(
        self, window_size: int = 20, batch_size_fn: Callable[[Any], int] = images_in_batch, **kwargs: Any
    ) -> None:
        super().__init__(batch_size_fn=batch_size_fn, window_size=window_size, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's setup, counting FLOPs only when the module defines ``flops_per_batch``."""
        super().setup(trainer, pl_module, stage)
        # FLOPs are optional: say nothing when the module does not define ``flops_per_batch``
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")


class EpochTimer(L.Callback):
    """Wall time of each training epoch (validation excluded) and of each validation, in seconds.

    Logs ``train/epoch_time`` and ``val/epoch_time`` (the whole validation: forward,
    post-processing and the mAP computation) to every logger, at the trainer's global step.
    """

    def __init__(self) -> None:
        self._train_start = self._val_start = 0.0
        self._val_total = 0.0  # validation time inside the current training epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock and reset the validation time spent inside it."""
        self._train_start, self._val_total = time.perf_counter(), 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``train/epoch_time``: the epoch's wall time less the validations run inside it."""
        _log(trainer, {"train/epoch_time": time.perf_counter() - self._train_start - self._val_total})

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the validation clock."""
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``val/epoch_time`` (not for the sanity check) and add it to the epoch's validation time."""
        elapsed = time.perf_counter() - self._val_start
        self._val_total += elapsed
        if not trainer.sanity_checking:
            _log(trainer, {"val/epoch_time": elapsed})


def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send metrics to every logger (rank 0 only, as Lightning's loggers do) at the global step."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
