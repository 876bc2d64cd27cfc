"""A run SIGKILLed and restarted with the same command plus ``--ckpt_path last`` continues exactly.

Each test kills one real CLI process (a subprocess) and compares the resumed run with an
uninterrupted one; those two run in this process through ``detector.cli.main`` (the same CLI),
on one thread as the killed process. Compared: weights (raw and EMA), GHM-C state, optimizer,
scheduler, the datamodule's stream position; and, for the data order, every later update.

- :func:`test_kill_after_a_validation_that_did_not_improve`: validation every epoch, killed in the
  middle of epoch 3, after the epoch-2 validation did not improve on epoch 1's: the default config's
  ``last.ckpt`` must hold the end of epoch 2 (Lightning's ``save_last`` alone keeps epoch 1's), and
  the run resumes from the newest ``last*.ckpt`` (a per-step one here) and ends as the full run.
- :func:`test_kill_early_in_epoch_2_with_the_default_wandb_logger`: the default config (validation
  every 5 epochs, W&B logger offline), killed as soon as epoch 1 ended: ``last.ckpt`` of epoch 1
  exists, and the same command finds the same run folder and W&B run id and continues at epoch 2.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import wandb

from detector.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("state_dict", "current_model_state", "averaging_state", "optimizer_states", "lr_schedulers",
            "DetectionDataModule")  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process runs on one thread, as the killed process (OMP_NUM_THREADS=1): the same float sums."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(tmp_path: Path, train: int) -> list[str]:
    return ["--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", str(train),
            "--data.embedded.num_val", "4", "--data.image_size", "64", "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--model.ema_decay", "0.9", "--model.ema_warmup_steps", "2"]  # fmt: skip


def _kill_when(args: list[str], tmp_path: Path, pattern: str) -> Path:
    """Run the CLI on ``args`` in a subprocess; SIGKILL it as soon as a file matching ``pattern`` (under
    ``tmp_path``) exists, and return that file. Checkpoints appear complete (written, then renamed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(
        "WANDB_SERVICE", None
    )  # its own wandb service, as after a real crash (not this process's, set by earlier tests)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline, found = time.monotonic() + 600, []
    while not found and proc.poll() is None and time.monotonic() < deadline:
        found = list(tmp_path.glob(pattern))
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed (returncode {proc.returncode}): {err[-2000:]!r}"
    assert found, f"{pattern} never appeared"
    return found[0]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k, x in a.items():
        y = b[k]
        if isinstance(x, dict):
            _assert_same(x, y, f"{where}.{k}")
        elif isinstance(x, torch.Tensor):
            assert torch.allclose(x.float(), y.float(), rtol=0, atol=1e-6), f"{where}.{k}"
        elif isinstance(x, float | int):
            assert abs(x - y) <= 1e-12, f"{where}.{k}: {x} != {y}"
        elif isinstance(x, list | tuple) and x and isinstance(x[0], dict | torch.Tensor):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                _assert_same({i: u}, {i: v}, f"{where}.{k}")


def _assert_same_state(a: Path, b: Path, ghm: bool = False) -> None:
    x, y = _load(a), _load(b)
    assert x["global_step"] == y["global_step"] and x["epoch"] == y["epoch"]
    assert not ghm or "criterion.objectness.acc" in x["current_model_state"]  # GHM-C's running counts compared
    for key in COMPARED:
        _assert_same({key: x[key]}, {key: y[key]}, key)


def _table(stdout: str) -> list[str]:
    """The metric lines of the validation table the CLI prints after fit."""
    return [line for line in stdout.splitlines() if "val/" in line]


STEPS_PER_EPOCH, EPOCHS, KILL_AT = 3, 3, 8  # 12 images / batch 4; step 8 is in the middle of epoch 3


def _validating_every_epoch(tmp_path: Path, run: str) -> list[str]:
    """Default config + GHM recipe, no logger, validation every epoch, and a checkpoint after every step
    (top-1, its own ``last.ckpt``) in ``<run>/steps`` to kill at and compare."""
    return [
        "--config", str(ROOT / "configs" / "default.yaml"), "--config", str(ROOT / "configs" / "losses" / "ghm.yaml"),
        *_data(tmp_path, 4 * STEPS_PER_EPOCH), "--model.lr", "0.02",
        "--trainer.max_epochs", str(EPOCHS), "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / run),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(tmp_path / run / "steps"), "--trainer.callbacks.filename", "{step}",
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true",
    ]  # fmt: skip


def test_kill_after_a_validation_that_did_not_improve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(_validating_every_epoch(tmp_path, "full"))
    table = _table(capsys.readouterr().out)
    steps = STEPS_PER_EPOCH * EPOCHS
    full = tmp_path / "full" / "checkpoints"
    # the last validation (epoch 3) did not improve on the best one, yet last.ckpt is the final state
    (best,) = full.glob("epoch*.ckpt")
    assert _load(best)["global_step"] < steps
    assert _load(full / "last.ckpt")["global_step"] == steps

    _kill_when(_validating_every_epoch(tmp_path, "cut"), tmp_path / "cut", f"steps/step={KILL_AT}.ckpt")
    cut = tmp_path / "cut" / "checkpoints"
    (cut_best,) = cut.glob("epoch*.ckpt")  # validated after epochs 1 and 2: epoch 2 did not improve
    assert _load(cut_best)["epoch"] == 0, "precondition: the epoch-2 validation must not improve"
    last = _load(cut / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (1, 2 * STEPS_PER_EPOCH)  # epoch 2's end, not the best's
    steps_last = _load(tmp_path / "cut" / "steps" / "last.ckpt")["global_step"]
    assert 2 * STEPS_PER_EPOCH < steps_last < steps  # killed in the middle of epoch 3

    cli = main([*_validating_every_epoch(tmp_path, "cut"), "--ckpt_path", "last"])
    assert cli.config.fit.ckpt_path == str(tmp_path / "cut" / "steps" / "last.ckpt")  # the newest last*.ckpt
    _assert_same_state(tmp_path / "full" / "steps" / f"step={steps}.ckpt", tmp_path / "cut" / "steps" / f"step={steps}.ckpt", ghm=True)  # fmt: skip
    _assert_same_state(full / "last.ckpt", cut / "last.ckpt", ghm=True)
    assert any("val/map_50" in line for line in table) and table == _table(capsys.readouterr().out)


def test_kill_early_in_epoch_2_with_the_default_wandb_logger(tmp_path: Path) -> None:
    """Validation every 5 epochs (default): before this change nothing was saved until the run ended."""
    epochs = ["--config", str(ROOT / "configs" / "default.yaml"), *_data(tmp_path, 8), "--trainer.max_epochs", "2"]
    main([*epochs, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "full")])
    runs = tmp_path / "cut" / "runs"
    command = [*epochs, "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs)]

    last = _kill_when(command, tmp_path, "cut/runs/detector/*/checkpoints/last.ckpt")
    state = _load(last)
    assert (state["epoch"], state["global_step"]) == (0, 2)  # epoch 1's end: 8 images, batch 4
    run_id = last.parent.parent.name

    cli = main([*command, "--ckpt_path", "last"])  # the same command, WANDB_MODE=offline (conftest)
    resumed_id = cli.trainer.logger.experiment.id
    wandb.finish()
    wandb.teardown()  # stop this process's wandb service: later subprocesses must not inherit it (WANDB_SERVICE)
    assert resumed_id == run_id and cli.config.fit.ckpt_path == str(last)  # same W&B run, same folder
    assert [p.name for p in (runs / "detector").iterdir()] == [run_id]
    assert {"checkpoints", "config.yaml"} <= {p.name for p in last.parent.parent.iterdir()}  # + the analysis files
    assert {p.name.rsplit("-", 1)[1] for p in (runs / "wandb").glob("offline-run-*")} == {run_id}  # 2 starts, 1 run
    _assert_same_state(tmp_path / "full" / "checkpoints" / "last.ckpt", last)  # epoch 2 trained as without the kill
    assert _load(last)["global_step"] == 4
