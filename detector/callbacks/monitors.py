"""Monitors of the training run itself."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` that stands aside when the run has no logger
    (``--trainer.logger false``) instead of stopping the run."""

    def on_train_start(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)
