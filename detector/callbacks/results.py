"""Results on disk whatever the logger: ``metrics.csv`` of every logged scalar and ``results.png``."""

from __future__ import annotations

import csv
import math
from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..plots import plot_results

PANELS = ("train/loss", "train/loss_box", "train/loss_obj", "train/loss_cls", "val/loss", "lr", "val/map_50", "val/map")


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the parent of the first ``ModelCheckpoint``'s folder; else, as Lightning
    names a checkpoint folder, ``save_dir/name/version`` of the first logger; else ``default_root_dir``.

    With the W&B logger that is ``runs/<project>/<run id>``; with ``--trainer.logger false``,
    ``default_root_dir``. Unlike ``trainer.log_dir`` it runs no collective, so rank 0 may call it alone.
    """
    for ckpt in trainer.checkpoint_callbacks:
        if getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent  # type: ignore[attr-defined]
    loggers = [lg for lg in trainer.loggers if not isinstance(lg, MetricsRecorder)]
    if loggers:
        version = loggers[0].version
        version = version if isinstance(version, str) else f"version_{version}"
        return Path(loggers[0].save_dir or trainer.default_root_dir, str(loggers[0].name), version)
    return Path(trainer.default_root_dir)


class MetricsRecorder(Logger):
    """A logger that keeps every scalar it is given in memory, as rows ``{"step": s, key: value, ...}``
    (one per ``log_metrics`` call, on global rank 0). It writes nothing and names no folder."""

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []
        self._save_dir = save_dir

    @property
    def name(self) -> str:
        """No name of its own."""
        return ""

    @property
    def version(self) -> None:
        """No version (the progress bar shows none)."""
        return None

    @property
    def save_dir(self) -> str | None:
        """The trainer's ``default_root_dir``, so ``trainer.log_dir`` stays what it was without this logger."""
        return self._save_dir

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Keep the scalars of ``metrics`` (numbers or one-element tensors) with their step."""
        row: dict[str, float] = {"step": float(step if step is not None else -1)}
        for key, value in metrics.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError, RuntimeError):  # not a scalar: not a column
                continue
        self.rows.append(row)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are not scalars over time: not recorded."""


def write_csv(rows: list[dict[str, float]], path: Path) -> None:
    """``rows`` as CSV: ``step`` then every key in order of first appearance; a key absent from a row is empty."""
    keys: dict[str, None] = {"step": None}
    for row in rows:
        keys.update(dict.fromkeys(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: int(v) if k == "step" else v for k, v in row.items()})


def read_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` written by :func:`write_csv`, empty cells left out."""
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


class ResultsWriter(L.Callback):
    """Writes ``metrics.csv`` and ``results.png`` into the run folder (:func:`run_dir`) during ``fit``,
    with W&B online, offline or no logger at all.

    - ``metrics.csv``: every scalar the loggers receive while training (``self.log`` of the module,
      ``lr``, epoch times, throughput, diagnostics, ...): one row per logging call, ``step`` (the
      x-axis W&B uses, ``trainer/global_step``) and one column per key, like Lightning's
      ``CSVLogger``. Rewritten at the end of every training epoch and at the end of ``fit``.
    - ``results.png``: one panel per key of ``panels`` against the step (losses, learning rate, mAP),
      at the end of ``fit`` (and when it stops on an error).

    How: at the start of training a :class:`MetricsRecorder` joins ``trainer.loggers`` (removed at
    the end of ``fit``), so it gets exactly what the other loggers get. Without any other logger the
    trainer then converts the logged values to numbers at each logging step (every
    ``log_every_n_steps``): one host sync per logging step, as any logger costs. A run resumed from
    a checkpoint (``ckpt_path``) keeps the rows of the existing ``metrics.csv`` up to the resumed step.

    Args:
        panels: the keys drawn in ``results.png``.
    """

    def __init__(self, panels: list[str] | None = None) -> None:
        self.panels = list(panels) if panels is not None else list(PANELS)
        if not self.panels:
            raise ValueError("panels must name at least one logged key")
        self.recorder: MetricsRecorder | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Attach the recorder; after a resume, start from the earlier rows up to the resumed step."""
        self.recorder = MetricsRecorder(str(trainer.default_root_dir))
        trainer.loggers = [*trainer.loggers, self.recorder]
        path = run_dir(trainer) / "metrics.csv" if trainer.is_global_zero else None
        if path is not None and trainer.ckpt_path and path.is_file():
            self.recorder.rows = [row for row in read_csv(path) if row.get("step", math.inf) <= trainer.global_step]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rewrite ``metrics.csv`` with the rows so far (cheap: a few kB per epoch)."""
        self._write(trainer, plot=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``metrics.csv`` and ``results.png``; detach the recorder."""
        self._write(trainer, plot=True)
        self._detach(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Write what was recorded before the error; detach the recorder."""
        self._write(trainer, plot=True)
        self._detach(trainer)

    def _write(self, trainer: L.Trainer, plot: bool) -> None:
        if self.recorder is None or not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        write_csv(self.recorder.rows, folder / "metrics.csv")
        if plot:
            plot_results(self.recorder.rows, self.panels, folder / "results.png", title=folder.name)
            rank_zero_info(f"metrics.csv and results.png written to {folder}")

    def _detach(self, trainer: L.Trainer) -> None:
        if self.recorder is not None:
            trainer.loggers = [lg for lg in trainer.loggers if lg is not self.recorder]
        self.recorder = None
