"""A 2-process DDP fit (CPU, gloo) of the real default config: it runs, and only rank 0 writes files.

The job must leave exactly one W&B run (offline here), one set of checkpoints and one saved config,
however many processes trained.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_fit(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "default.yaml"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs),
        "--data.num_workers", "0", "--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", "8",
        "--data.embedded.num_val", "4", "--data.image_size", "128", "--data.batch_size", "2",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600
    )  # WANDB_MODE=offline (conftest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr and "val/map" in proc.stdout
    assert len(list((runs / "wandb").glob("offline-run-*"))) == 1  # one W&B run for the job
    ckpts = list(runs.rglob("*.ckpt"))
    assert len(ckpts) == 2 and {p.parent for p in ckpts} == {
        runs / "detector" / ckpts[0].parent.parent.name / "checkpoints"
    }
    assert "last.ckpt" in {p.name for p in ckpts}  # one best + last, in the W&B run's folder
    assert len(list(tmp_path.rglob("config.yaml"))) == 1
