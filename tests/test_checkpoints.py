"""What is saved when: ``last.ckpt`` is the latest training state, the best ``val/map`` stays the best.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only at a step where it also
writes a top-k checkpoint, so with a monitor it lags at the last improvement (pinned below). The
default config therefore adds two monitor-less ``ModelCheckpoint`` with ``filename: last`` (top-1 of
"the latest", overwritten in place): one at the end of every training epoch
(``save_on_train_epoch_end``, whatever the validation interval), one every 30 minutes.
These tests run those callbacks, built from configs/default.yaml, on a tiny module whose ``val/map``
is scripted: it improves at the first validation only.
"""

from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_fit import STEPS_PER_EPOCH, Scripted, default_checkpoints, saved, trainer


class _LastProbe(L.Callback):
    """Records ``(epoch, global_step)`` of ``last.ckpt`` when each epoch or batch starts."""

    def __init__(self, folder: Path, every_batch: bool = False) -> None:
        self.last, self.every_batch, self.seen = folder / "last.ckpt", every_batch, []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_batch and self.last.exists():
            self.seen.append((trainer.current_epoch, trainer.global_step, saved(self.last)))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.every_batch and self.last.exists():
            self.seen.append((trainer.current_epoch, trainer.global_step, saved(self.last)))


def test_default_config_checkpoints() -> None:
    best, epochs, timed = default_checkpoints()
    assert (best.monitor, best.mode, best.save_top_k, best.save_last) == ("val/map", "max", 1, None)
    for latest in (epochs, timed):
        assert (latest.monitor, latest.save_top_k, latest.filename, latest._enable_version_counter) == (
            None, 1, "last", False,
        )  # fmt: skip
    assert (epochs._save_on_train_epoch_end, epochs._every_n_epochs, epochs._train_time_interval) == (True, 1, None)
    assert (timed._train_time_interval, timed._every_n_epochs) == (timedelta(minutes=30), 0)


def test_last_is_written_every_epoch_and_at_the_end(tmp_path: Path) -> None:
    """Validation every 2 epochs, improving only at the first: last.ckpt follows every epoch to the end."""
    probe = _LastProbe(tmp_path / "checkpoints")
    fit = trainer(tmp_path, [*default_checkpoints(), probe], max_epochs=5, check_val_every_n_epoch=2)
    fit.fit(Scripted(maps=[0.5, 0.2]))
    assert fit.global_step == 5 * STEPS_PER_EPOCH
    # at the start of epoch e, last.ckpt holds the end of epoch e - 1, with or without a validation there
    assert [(e, step, ckpt) for e, step, ckpt in probe.seen] == [
        (e, e * STEPS_PER_EPOCH, (e - 1, e * STEPS_PER_EPOCH)) for e in range(1, 5)
    ]
    assert saved(tmp_path / "checkpoints" / "last.ckpt") == (4, fit.global_step)  # the final state
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["epoch001-map0.5000.ckpt", "last.ckpt"]  # one best + one latest: disk stays bounded
    assert saved(tmp_path / "checkpoints" / files[0]) == (1, 2 * STEPS_PER_EPOCH)
    assert fit.checkpoint_callback.best_model_path == str(tmp_path / "checkpoints" / files[0])  # validated after fit


def test_lightning_save_last_alone_lags_at_the_last_improvement(tmp_path: Path) -> None:
    """The Lightning 2.6 behaviour the two extra callbacks work around (the cause of the stale last.ckpt)."""
    ckpt = ModelCheckpoint(monitor="val/map", mode="max", save_last=True)
    fit = trainer(tmp_path, [ckpt], max_epochs=5, check_val_every_n_epoch=2)
    fit.fit(Scripted(maps=[0.5, 0.2]))
    assert saved(tmp_path / "checkpoints" / "last.ckpt") == (1, 2 * STEPS_PER_EPOCH)  # not (4, 20)


def test_time_interval_writes_the_same_last_ckpt_within_an_epoch(tmp_path: Path) -> None:
    """The timed callback with a zero interval saves after every batch, into last.ckpt, without versions."""
    best, epochs, timed = default_checkpoints()
    timed._train_time_interval = timedelta(0)
    probe = _LastProbe(tmp_path / "checkpoints", every_batch=True)
    fit = trainer(tmp_path, [best, epochs, timed, probe], max_epochs=2)
    fit.fit(Scripted(maps=[0.5, 0.2]))
    steps = [(step, ckpt_step) for _, step, (_, ckpt_step) in probe.seen]
    assert steps == [(s, s) for s in range(1, 2 * STEPS_PER_EPOCH)]  # each batch starts from a saved last.ckpt
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch000-map0.5000.ckpt", "last.ckpt"]


def test_fit_ckpt_path_last_finds_it(tmp_path: Path) -> None:
    """Lightning's own ``ckpt_path="last"`` (``ModelCheckpoint._find_last_checkpoints``) picks this last.ckpt."""
    trainer(tmp_path, default_checkpoints(), max_epochs=3).fit(Scripted(maps=[0.5, 0.2, 0.1]))
    again = trainer(tmp_path, default_checkpoints(), max_epochs=4)
    again.fit(Scripted(maps=[0.5, 0.2, 0.1, 0.0]), ckpt_path="last")
    assert again.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert again.global_step == 4 * STEPS_PER_EPOCH and saved(tmp_path / "checkpoints" / "last.ckpt") == (3, 16)
