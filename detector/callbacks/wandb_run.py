"""What the W&B run records about itself: the resolved config and the best score (summary)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn

from ..loggers import wandb_run


class WandbRunInfo(L.Callback):
    """Resolved config into the W&B run config, best monitored value into its summary.

    - At setup, the full config LightningCLI resolved (every ``--config`` file and override
      merged, defaults filled in; what it writes as ``config.yaml``) goes into the run config
      under its top-level sections: ``trainer``, ``model``, ``data``, ``seed_everything``,
      ``config`` (the files given) ... Runs outside LightningCLI keep the hyperparameters
      Lightning logs itself.
    - After each validation while fitting, the summary keys ``best/<monitor>``, ``best/epoch``
      and ``best/step`` hold the best value so far (kept in checkpoints, so a resumed run goes on
      from its best). W&B's own summary keeps each metric's last value.

    Does nothing without a ``WandbLogger`` or off global rank 0.

    Args:
        monitor: the metric to track (``val/map``). mode: "max" or "min".
    """

    def __init__(self, monitor: str = "val/map", mode: Literal["max", "min"] = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] = {}  # value, epoch, step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put the CLI's full configuration (``SaveConfigCallback``'s) into the W&B run config."""
        run = wandb_run(trainer)
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)  # type: ignore[attr-defined]
        if run is None or saver is None:
            return
        config = yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
        run.config.update(config, allow_val_change=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """While fitting, track the best ``monitor`` value with its epoch and step and write them to the W&B summary."""
        metric = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or metric is None:
            return
        value = float(metric)
        best = self.best.get("value")
        better = best is None or (value > best if self.mode == "max" else value < best)
        if not math.isnan(value) and better:
            self.best = {"value": value, "epoch": trainer.current_epoch, "step": trainer.global_step}
        run = wandb_run(trainer)
        if run is not None and self.best:
            run.summary.update(
                {
                    f"best/{self.monitor}": self.best["value"],
                    "best/epoch": self.best["epoch"],
                    "best/step": self.best["step"],
                }
            )

    def state_dict(self) -> dict[str, Any]:
        """The best value, epoch and step so far, saved in checkpoints."""
        return dict(self.best)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the best value, epoch and step from a checkpoint."""
        self.best = dict(state_dict)
