"""A 2-process DDP fit (CPU, gloo) of the real default config: it runs, and only rank 0 writes checkpoints."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_fit(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "default.yaml"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--data.num_workers", "0",
        "--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", "8", "--data.embedded.num_val", "4",
        "--data.image_size", "128", "--data.batch_size", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/map" in proc.stdout
    ckpts = sorted(p.name for p in (tmp_path / "runs").rglob("*.ckpt"))
    assert len(ckpts) == 2 and "last.ckpt" in ckpts  # one best + last, written once (rank 0)
