"""Exact resume: a run SIGKILLed in the middle of an epoch and restarted with ``--ckpt_path last`` ends
with the same weights (raw and EMA), GHM-C state, optimizer, scheduler and metrics as an uninterrupted run.

Both runs use the real CLI and default config with the GHM recipe, EMA, and a second ModelCheckpoint
that writes every training step (``every_n_train_steps: 1``, ``save_last``) into its own folder.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = 8  # 6 steps per epoch: step 8 is in the middle of the second (last) epoch
STEPS = 12


def _cmd(tmp_path: Path, run: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"),
        "--config", str(ROOT / "configs" / "default.yaml"), "--config", str(ROOT / "configs" / "losses" / "ghm.yaml"),
        "--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", "24", "--data.embedded.num_val", "4",
        "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / run),
        "--model.lr", "0.02",
        "--model.ema_decay", "0.9", "--model.ema_warmup_steps", "2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(tmp_path / run / "steps"), "--trainer.callbacks.filename", "{step}",
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1",
        "--trainer.callbacks.save_last", "true",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _table(stdout: str) -> list[str]:
    """The metric lines of the validation table the CLI prints after fit."""
    return [line for line in stdout.splitlines() if "val/" in line]


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


def test_sigkill_mid_epoch_then_resume_last_is_exact(tmp_path: Path) -> None:
    full = subprocess.run(_cmd(tmp_path, "full"), capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(_cmd(tmp_path, "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    watched = tmp_path / "cut" / "steps" / f"step={KILL_AT}.ckpt"
    deadline = time.monotonic() + 600
    while not watched.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # while step 8 is being written: last.ckpt still holds step 7
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = torch.load(tmp_path / "cut" / "steps" / "last.ckpt", weights_only=True)
    assert 6 < last["global_step"] < STEPS  # killed in the middle of the second epoch

    resumed = subprocess.run([*_cmd(tmp_path, "cut"), "--ckpt_path", "last"], capture_output=True, text=True,
                             env=_env(), timeout=600, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restored = f"Restoring states from the checkpoint path at {tmp_path / 'cut' / 'steps' / 'last.ckpt'}"
    assert restored in resumed.stderr + resumed.stdout

    a = torch.load(tmp_path / "full" / "steps" / f"step={STEPS}.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "steps" / f"step={STEPS}.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert "criterion.objectness.acc" in a["current_model_state"]  # GHM-C's running counts are compared
    for key in ("state_dict", "current_model_state", "averaging_state", "optimizer_states", "lr_schedulers"):
        _assert_same({key: a[key]}, {key: b[key]}, key)
    table = _table(full.stdout)
    assert any("val/map_50" in line for line in table) and table == _table(resumed.stdout)
