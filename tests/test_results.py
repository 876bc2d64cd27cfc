"""Results on disk: metrics.csv and results.png with no logger and with W&B offline; the analysis PNGs
in the same run folder and in W&B."""

import struct
import zlib
from pathlib import Path

import lightning as L
import pytest
import test_wandb_run as wandb_file  # its reader of .wandb files (a module: its tests are not collected here)

from detector.callbacks import EpochTimer, ResultsWriter
from detector.callbacks.results import read_csv, run_dir
from detector.cli import main
from detector.data import DetectionDataModule, ShapesConfig
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
W_AND_B_ONLY = ("_step", "_runtime", "_timestamp", "_wandb")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking its signature and CRC)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


class Spy(L.Callback):
    """What the module logged, read from ``trainer.callback_metrics`` (not from any logger)."""

    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []
        self.val: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.train.append({k: float(trainer.callback_metrics[k]) for k in ("train/loss", "train/loss_box", "lr")})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val/map"]))


def _fit(root: Path, epochs: int, spy: Spy, ckpt_path: str | None = None) -> L.Trainer:
    dm = DetectionDataModule(root=str(root / "shapes"), embedded=ShapesConfig(num_train=8, num_val=4, seed=2),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    trainer = L.Trainer(max_epochs=epochs, logger=False, log_every_n_steps=1, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root / "runs",
                        callbacks=[ResultsWriter(), EpochTimer(), spy])  # fmt: skip
    trainer.fit(DetectorModule(dm.class_names, preset="nano"), datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_without_a_logger_and_resumed(tmp_path: Path) -> None:
    spy = Spy()
    trainer = _fit(tmp_path, 2, spy)
    assert run_dir(trainer) == tmp_path / "runs" and trainer.loggers == []  # the recorder has left
    rows = read_csv(tmp_path / "runs" / "metrics.csv")
    train = [r for r in rows if "train/loss" in r]
    assert [{k: r[k] for k in spy.train[0]} for r in train] == spy.train  # 4 steps, every one logged
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    assert [r["val/map"] for r in rows if "val/map" in r] == spy.val and len(spy.val) == 2
    assert sum("train/epoch_time" in r for r in rows) == 2  # what callbacks send to the loggers too
    assert png_size(tmp_path / "runs" / "results.png") == (1600, 640)  # 2 x 4 panels
    # resumed from the last checkpoint for a third epoch: the first rows stay, the new ones follow
    ckpt = next((tmp_path / "runs" / "checkpoints").glob("*.ckpt"))
    more = Spy()
    _fit(tmp_path, 3, more, ckpt_path=str(ckpt))
    resumed = read_csv(tmp_path / "runs" / "metrics.csv")
    assert resumed[: len(rows)] == rows
    new_train = [r for r in resumed[len(rows) :] if "train/loss" in r]
    assert [r["step"] for r in new_train] == [4, 5] and [r["train/loss"] for r in new_train] == [
        s["train/loss"] for s in more.train
    ]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fit 2 epochs through the CLI and the default config, W&B offline; read back what W&B recorded."""
    tmp = tmp_path_factory.mktemp("results_wandb")
    cli = main([
        "--config", str(ROOT / "configs" / "default.yaml"),
        "--data.root", str(tmp / "shapes"), "--data.embedded.num_train", "8", "--data.embedded.num_val", "4",
        "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
    ])  # fmt: skip
    cli.trainer.logger.experiment.finish()
    (run_file,) = (tmp / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_file.records(run_file)
    history = [wandb_file._items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    return {"history": history, "folder": run_dir(cli.trainer), "id": cli.trainer.logger.version}


def test_metrics_csv_is_what_wandb_got(wandb_run: dict) -> None:
    folder = wandb_run["folder"]
    assert folder.parent.name == "detector" and folder.name == wandb_run["id"]  # runs/<project>/<run id>
    rows = read_csv(folder / "metrics.csv")
    scalars = [  # W&B's rows from the loggers' log_metrics (its media rows hold dicts)
        {("step" if k == "trainer/global_step" else k): v for k, v in row.items() if k not in W_AND_B_ONLY}
        for row in wandb_run["history"]
        if all(isinstance(v, (int, float)) for k, v in row.items() if k not in W_AND_B_ONLY)
    ]
    assert rows == scalars[: len(rows)]  # every row, every key, every value, in order
    after_fit = scalars[len(rows) :]  # the CLI's validation of the best checkpoint, after fit
    assert after_fit and all(k.split("/")[0] in ("val", "validate", "step", "epoch") for r in after_fit for k in r)
    for key in ("train/loss", "train/loss_obj", "train/loss_cls", "train/loss_box", "lr", "val/map", "val/loss"):
        assert any(key in r for r in rows), key
    assert sum("val/map" in r for r in rows) == 2 and sum("val/best_f1" in r for r in rows) == 1
    assert png_size(folder / "results.png") == (1600, 640)


def test_analysis_pngs_on_disk_and_in_wandb(wandb_run: dict) -> None:
    for name in ("confusion_matrix", "pr_curve", "f1_curve"):
        assert png_size(wandb_run["folder"] / f"val_{name}.png")[0] >= 700
        media = [row[f"val/{name}"] for row in wandb_run["history"] if f"val/{name}" in row]
        assert len(media) == 2 and all(m["_type"] == "image-file" for m in media)  # end of fit, best checkpoint
    assert (wandb_run["folder"] / "val_analysis.json").is_file()
