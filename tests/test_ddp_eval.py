"""Distributed evaluation is the single-process evaluation.

- ``ShardedMeanAveragePrecision`` on 2 gloo processes holding 4 | 3, 1 | 0 and 2 | 1 images gives
  the mAP of one process holding all of them, exact score ties between images included.
- Through the CLI: 2 CPU processes validating one checkpoint on the same 7 images (batch 2: the
  processes hold 4 and 3) log exactly the mAP keys of 1 process: no image dropped or counted twice.
- A process whose batches hold no ground truth at all neither hangs nor breaks the others, in
  training or in validation.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from detector.cli import main
from detector.data import ShapesConfig, ensure_shapes
from detector.metrics import ShardedMeanAveragePrecision
from detector.module import MAP_KEYS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")


def _args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--config", DEFAULT, "--data.embedded", "null", "--data.root", str(root), "--data.image_size", "128",
        "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(runs),
        *extra,
    ]  # fmt: skip


def _train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, as in _one_thread
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _csv_metrics(save_dir: Path) -> dict[str, float]:
    """The last value of every column of the CSVLogger's metrics.csv under ``save_dir``."""
    (path,) = save_dir.rglob("metrics.csv")
    out: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def _images(n: int) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``n`` (prediction, ground truth) pairs with random boxes, 3 classes; image 2 has no ground truth."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        k, m = int(torch.randint(0, 6, (1,), generator=g)), 0 if i == 2 else int(torch.randint(1, 4, (1,), generator=g))
        gt = torch.rand(m, 2, generator=g) * 80
        gt = torch.cat([gt, gt + 10 + torch.rand(m, 2, generator=g) * 40], 1)
        det = torch.cat(
            [
                gt + torch.randn(m, 4, generator=g) * 3,
                torch.rand(k, 2, generator=g).repeat(1, 2) * 100 + torch.tensor([0, 0, 20, 20]),
            ]
        )
        labels = torch.randint(0, 3, (m,), generator=g)
        pred = {
            "boxes": det,
            "scores": torch.rand(m + k, generator=g),
            "labels": torch.cat([labels, torch.randint(0, 3, (k,), generator=g)]),
        }
        out.append((pred, {"boxes": gt, "labels": labels, "image_id": torch.tensor(100 + i)}))
    return out


def _tied_images() -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """A true positive in image 1 and a false positive in image 2 with the same score. COCO ranks
    tied detections by image order: 1-process order (0, 1, 2) gives mAP 1, but the shards' rank
    order (0, 2 | 1) would put the false positive first (mAP 0.83) unless images are re-ordered."""
    box, none = torch.tensor([[10.0, 10, 50, 50]]), torch.zeros(0, 4)
    out = []
    for i, (score, gt) in enumerate([(0.9, box), (0.5, box), (0.5, none)]):
        pred = {"boxes": box, "scores": torch.tensor([score]), "labels": torch.tensor([0])}
        out.append(
            (pred, {"boxes": gt, "labels": torch.zeros(len(gt), dtype=torch.int64), "image_id": torch.tensor(i)})
        )
    return out


SCENARIOS = {"7 images": lambda: _images(7), "1 image": lambda: _images(1), "tied scores": _tied_images}


def _map(pairs: list) -> dict[str, torch.Tensor]:
    metric = ShardedMeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", class_metrics=True
    )
    for pred, gt in pairs:
        metric.update([pred], [gt])
    return metric.compute()


def _map_worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for i, make in enumerate(SCENARIOS.values()):  # unpadded shards: 4 | 3 images, 1 | none, 2 | 1
            torch.save(_map(make()[rank::2]), f"{path}/{i}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_map_gathers_uneven_shards(tmp_path: Path) -> None:
    mp.spawn(_map_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for i, (name, make) in enumerate(SCENARIOS.items()):
        single = _map(make())
        assert 0.05 < float(single["map_50"]) < 0.95 or name == "tied scores", single  # a lost or repeated image shows
        for rank in range(2):
            double = torch.load(tmp_path / f"{i}_rank{rank}.pt")
            for key in (*MAP_KEYS, "map_per_class", "mar_100_per_class"):
                torch.testing.assert_close(double[key], single[key], rtol=1e-6, atol=1e-9, msg=f"{name}: {key}")
    assert float(_map(_tied_images())["map"]) == 1.0


def _label_with_detections(root: Path, detections: Path) -> int:
    """Replace the validation annotations by detections of the checkpoint itself, so that an untrained
    checkpoint scores a mAP far from 0 and 1: image k keeps 1 + k % 3 of its highest-scoring
    detections, every second one, so higher-scoring detections in between count as false positives."""
    path = root / "annotations" / "val.json"
    coco, dets = json.loads(path.read_text()), json.loads(detections.read_text())
    coco["annotations"] = []
    for k, image in enumerate(sorted(coco["images"], key=lambda im: im["id"])):
        mine = sorted((d for d in dets if d["image_id"] == image["id"]), key=lambda d: -d["score"])
        for d in mine[: 2 * (1 + k % 3) : 2]:
            x, y, w, h = d["bbox"]
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image["id"], "category_id": d["category_id"]}
            coco["annotations"].append({**ann, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path.write_text(json.dumps(coco))
    return len(coco["annotations"])


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread, as each DDP process gets: an untrained model's scores nearly tie, and a
    different thread count rounds them differently; with one thread an image's detections are the
    same bits in every run, so the comparison tests the evaluation, not floating-point noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def test_two_process_validation_equals_one_process(tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(ensure_shapes(tmp_path / "shapes", ShapesConfig(num_train=4, num_val=7, seed=1)), root)
    main(_args(root, tmp_path / "fit", "--data.batch_size", "4", "--trainer.max_epochs", "1", "--trainer.logger", "false",
               "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_val_batches", "1"))  # fmt: skip
    ckpt = str(next((tmp_path / "fit").rglob("last.ckpt")))
    evaluate = _args(
        root, tmp_path / "eval", "--data.batch_size", "2", "--ckpt_path", ckpt, "--trainer.logger", "false"
    )
    main(["predict", *evaluate, "--config", str(ROOT / "configs" / "predict_coco.yaml"),
          "--trainer.callbacks.init_args.output", str(tmp_path / "dets.json")])  # fmt: skip
    assert _label_with_detections(root, tmp_path / "dets.json") == 13  # 1 + 2 + 3 + 1 + 2 + 3 + 1 over 7 images
    single = {k: float(v) for k, v in main(["validate", *evaluate]).trainer.callback_metrics.items()}
    assert 0.1 < single["val/map_50"] < 0.99, single  # far from 0 and 1: a dropped or repeated image changes it
    csv_logger = json.dumps(
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    )
    proc = _train_py("validate", *evaluate, *DDP, "--trainer.logger", csv_logger, cwd=tmp_path)
    assert "Starting with 2 processes" in proc.stderr
    double = _csv_metrics(tmp_path / "csv")
    keys = [f"val/{k}" for k in MAP_KEYS] + [k for k in single if k.startswith("val/map_class/")]
    assert double["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)  # image-weighted over uneven shards
    for key in keys:
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


def _without_boxes_except(root: Path, split: str, keep: int) -> None:
    """Drop the annotations of every image of ``split`` but the ``keep``-th."""
    path = root / "annotations" / f"{split}.json"
    coco = json.loads(path.read_text())
    kept_id = sorted(im["id"] for im in coco["images"])[keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == kept_id]
    assert coco["annotations"], "the kept image must have boxes"
    path.write_text(json.dumps(coco))


def test_process_without_ground_truth_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(ensure_shapes(tmp_path / "shapes", ShapesConfig(num_train=4, num_val=3, seed=2)), root)
    _without_boxes_except(root, "train", keep=0)  # 4 images, 2 per process: one process has none with boxes
    _without_boxes_except(root, "val", keep=0)  # 3 images: 2 and 1 per process, at most one with boxes
    pisa = str(ROOT / "configs" / "losses" / "pisa.yaml")  # the recipe with the most collectives (ranking, sums)
    args = _args(root, tmp_path / "runs", "--config", pisa,
                 "--data.batch_size", "2", "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.logger", "false", *DDP)  # fmt: skip
    proc = _train_py(*args, cwd=tmp_path)  # a hang ends in the timeout
    assert "Starting with 2 processes" in proc.stderr
    assert "val/map" in proc.stdout and "nan" not in proc.stdout.lower()
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())  # the steps trained sanely
