"""A short offline run through the CLI and the default config, read back from W&B's own run file.

wandb 0.31 no longer ships a Python reader (``wandb.sdk.internal.datastore``); its ``.wandb``
file is a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs, which :func:`records`
reads: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

import json
import struct
import time
from pathlib import Path

import lightning as L
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger
from tiny_fit import STEPS_PER_EPOCH, Scripted, default_checkpoints, trainer
from wandb.proto import wandb_internal_pb2

from detector.cli import main
from detector.loggers import WandbLogger, log_to_wandb, wandb_run

ROOT = Path(__file__).resolve().parents[1]
BLOCK, HEADER = 32768, 7


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    out, pos, chunks = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 or pos + HEADER + length > len(data):  # end, or a chunk still being written
            break
        chunks = (b"" if kind in (1, 2) else chunks) + data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
    return out


def _merge(dst: dict, src: dict) -> dict:
    """Deep-merge ``src`` into ``dst``."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _items(update, out: dict | None = None) -> dict:
    """History/summary/config items -> nested dict (W&B splits media objects into nested keys)."""
    out = {} if out is None else out
    for item in update:
        keys = [item.key] if item.key else list(item.nested_key)
        value = json.loads(item.value_json)
        for k in reversed(keys):
            value = {k: value}
        _merge(out, value)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fit one epoch (2 steps) with the W&B logger offline, diagnostics on and checkpoint artifacts."""
    tmp = tmp_path_factory.mktemp("wandb_run")
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        mp.setenv(var, str(tmp / var.lower()))  # artifact staging stays inside the test's folder
    throughput = "{'class_path': 'detector.callbacks.ThroughputMonitor', 'init_args': {'window_size': 2}}"
    cli = main([
        "--config", str(ROOT / "configs" / "default.yaml"), "--config", str(ROOT / "configs" / "diagnostics.yaml"),
        "--data.root", str(tmp / "shapes"), "--data.embedded.num_train", "8", "--data.embedded.num_val", "4",
        "--data.image_size", "128", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
        "--trainer.logger.init_args.log_model", "true",
        "--trainer.callbacks+", throughput,  # a short window, so images/s is logged within 2 steps
    ])  # fmt: skip
    cli.trainer.logger.experiment.finish()
    mp.undo()
    (run_file,) = (tmp / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    for _ in range(300):  # wandb's writer process may still be flushing after finish() returns
        if any(r.WhichOneof("record_type") == "exit" for r in records(run_file)):
            break
        time.sleep(0.1)
    history, summary, config, artifacts = [], {}, {}, []
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            _items(record.summary.update, summary)
        elif kind == "config":
            _items(record.config.update, config)
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return {"history": history, "summary": summary, "config": config, "artifacts": artifacts,
            "files": run_file.parent / "files", "dm": cli.datamodule,
            "best": Path(cli.trainer.checkpoint_callback.best_model_path).name}  # fmt: skip


def _rows(run: dict, key: str) -> list[dict]:
    return [row for row in run["history"] if key in row]


def test_metrics_and_summary(run: dict) -> None:
    for key in ("train/loss", "train/loss_obj", "train/loss_cls", "train/loss_box", "lr", "val/map", "val/map_50",
                "val/map_class/circle", "train/epoch_time", "val/epoch_time", "train/device/samples_per_sec"):  # fmt: skip
        assert _rows(run, key), key
    assert all(row["trainer/global_step"] >= 0 for row in run["history"] if "val/map" in row)
    fit_maps = [row["val/map"] for row in _rows(run, "val/map")]
    assert run["summary"]["best/val/map"] == pytest.approx(max(fit_maps))
    assert run["summary"]["best/epoch"] == 0 and run["summary"]["best/step"] == 2
    # the resolved config: files and command-line overrides merged
    assert run["config"]["trainer"]["max_epochs"] == 1 and run["config"]["data"]["image_size"] == 128
    assert run["config"]["model"]["loss"]["class_path"] == "detector.losses.YOLOLoss"


def _boxes(run: dict, media: dict, i: int) -> dict:
    return json.loads((run["files"] / media["all_boxes"][i]["ground_truth"]["path"]).read_text()), media["all_boxes"][i]


def test_images_with_boxes(run: dict) -> None:
    names = {str(k): v for k, v in enumerate(run["dm"].class_names)}
    trains = [row["train/examples"] for row in _rows(run, "train/examples")]
    assert len(trains) == 2  # the first 2 training batches (all there are)
    for train in trains:
        assert train["_type"] == "images/separated" and train["count"] == 4
        assert all(set(b) == {"ground_truth"} for b in train["all_boxes"])  # ground truth only
    vals = [row["val/examples"] for row in _rows(run, "val/examples")]
    assert len(vals) == 2  # after the epoch's validation and after the final validation of the best checkpoint
    media = vals[0]
    assert media["count"] == 4 and all(set(b) == {"ground_truth", "predictions"} for b in media["all_boxes"])
    val_set = run["dm"].val_set
    for i in range(4):  # the 4 validation images, in order: their ground-truth boxes and class names
        gt, layers = _boxes(run, media, i)
        _, target = val_set[i]
        assert len(gt["box_data"]) == len(target["labels"])
        assert [b["class_id"] for b in gt["box_data"]] == target["labels"].tolist()
        assert gt["class_labels"] == names
        preds = json.loads((run["files"] / layers["predictions"]["path"]).read_text())
        assert all(
            b["scores"]["score"] >= 0.1 and b["box_caption"].split()[0] in names.values() for b in preds["box_data"]
        )


def test_per_class_table_and_histograms(run: dict) -> None:
    rows = _rows(run, "val/map_class_table")
    assert len(rows) == 2  # after each validation
    table = json.loads((run["files"] / rows[0]["val/map_class_table"]["path"]).read_text())
    assert table["columns"] == ["class", "ap"]
    row = _rows(run, "val/map_class/circle")[0]  # the metrics of the same validation
    metrics = {k.split("/")[-1]: v for k, v in row.items() if k.startswith("val/map_class/")}
    assert len(metrics) == 5
    assert {c: ap for c, ap in table["data"]} == pytest.approx({c: ap for c, ap in metrics.items() if ap >= 0})
    assert "val/map_class_chart" in run["config"]["_wandb"]["visualize"]
    (diag,) = _rows(run, "diag/g/obj_pos")
    (scalars,) = _rows(run, "diag/pos_per_image")
    hist = {k: diag[f"diag/g/{k}"] for k in ("obj_pos", "obj_neg", "cls_pos", "cls_neg")}
    assert all(h["_type"] == "histogram" and len(h["values"]) == 20 and len(h["bins"]) == 21 for h in hist.values())
    positives = scalars["diag/pos_per_image"] * 8  # 8 training images
    assert sum(hist["obj_pos"]["values"]) == pytest.approx(positives)  # one objectness element per positive
    assert sum(hist["cls_pos"]["values"]) == pytest.approx(positives)  # one target class per positive
    assert sum(hist["cls_neg"]["values"]) == pytest.approx(4 * positives)  # the other 4 classes
    per_image = diag["diag/positives_per_image"]  # images per number of positives 0, 1, ...
    assert sum(per_image["values"]) == 8 and per_image["bins"][:3] == [0, 1, 2]
    assert sum(k * n for k, n in enumerate(per_image["values"])) == pytest.approx(positives)
    shares = sum(scalars[f"diag/loss_share/{k}"] for k in ("pos", "neg", "box"))
    assert shares == pytest.approx(1.0)
    assert "diag/g_density" in run["config"]["_wandb"]["visualize"]


def _models(artifacts: list) -> list[tuple[list[str], dict]]:
    """(aliases, metadata) of the ``model`` artifact versions, in the order they were logged."""
    return [(sorted(a.aliases), json.loads(a.metadata)) for a in artifacts if a.type == "model"]


def test_checkpoints_as_artifacts(run: dict) -> None:
    # the best, then last.ckpt; wandb adds "latest" to every version it logs, W&B keeps it on the newest
    models = _models(run["artifacts"])
    assert [(aliases, m["original_filename"]) for aliases, m in models] == [
        (["best", "latest"], run["best"]),
        (["latest"], "last.ckpt"),
    ]
    assert all([c.path for c in a.manifest.contents] == ["model.ckpt"] for a in run["artifacts"] if a.type == "model")


def _read(run_dir: Path) -> tuple[list, dict]:
    """The artifacts and the summary of a finished offline run."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(300):  # wandb's writer process may still be flushing after finish() returns
        if any(r.WhichOneof("record_type") == "exit" for r in records(run_file)):
            break
        time.sleep(0.1)
    artifacts, summary = [], {}
    for record in records(run_file):
        if record.WhichOneof("record_type") == "artifact":
            artifacts.append(record.artifact)
        elif record.WhichOneof("record_type") == "summary":
            _items(record.summary.update, summary)
    return artifacts, summary


def test_best_and_latest_artifacts_say_which_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """val/map improves at the first validation (epoch 1) only; training goes on to epoch 3."""
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    logger = WandbLogger(save_dir=str(tmp_path / "runs"), log_model=True)  # offline: WANDB_MODE (conftest)
    fit = trainer(tmp_path, default_checkpoints(), logger=logger, max_epochs=4, check_val_every_n_epoch=2)
    fit.fit(Scripted(maps=[0.5, 0.2]))
    logger.experiment.finish()
    wandb.teardown()  # stop this process's wandb service: later subprocesses must not inherit it (WANDB_SERVICE)
    artifacts, summary = _read(tmp_path / "runs")
    models = _models(artifacts)
    assert [(aliases, m["epoch"], m["step"], m["original_filename"]) for aliases, m in models] == [
        (["best", "latest"], 1, 2 * STEPS_PER_EPOCH, "epoch001-map0.5000.ckpt"),
        (["latest"], 3, 4 * STEPS_PER_EPOCH, "last.ckpt"),
    ]
    assert models[0][1]["score"] == pytest.approx(0.5)
    assert {k: v for k, v in summary.items() if k.startswith("model/")} == {
        "model/best/epoch": 1, "model/best/step": 8, "model/latest/epoch": 3, "model/latest/step": 16,
    }  # fmt: skip


def test_a_given_run_id_is_resumed(tmp_path: Path) -> None:
    """The CLI passes every unset wandb.init argument as None; resume=None would start a new run under the id."""
    logger = WandbLogger(save_dir=str(tmp_path), id="abc123", resume=None)
    assert (logger.version, logger._wandb_init["id"], logger._wandb_init["resume"]) == ("abc123", "abc123", "allow")


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_wandb_pieces_stand_aside_without_a_wandb_logger(logger: str, tmp_path: Path) -> None:
    trainer = L.Trainer(logger=CSVLogger(tmp_path) if logger == "csv" else False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    assert wandb_run(trainer) is None
    assert log_to_wandb(trainer, {"val/examples": []}) is False
