"""Detections exported by ``predict`` and scored by pycocotools against the ground-truth JSON give
the same mAP as the module's own ``val/map`` (torchmetrics, faster_coco_eval)."""

import json
from pathlib import Path

import lightning as L
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from detector.callbacks import CocoPredictionWriter
from detector.data import CocoDetection, ShapesConfig, TransformedDataset, collate, ensure_shapes, val_transforms
from detector.losses import YOLOLoss
from detector.module import DetectorModule


def test_exported_detections_score_like_val_map(tmp_path: Path) -> None:
    L.seed_everything(0)
    root = ensure_shapes(tmp_path / "shapes", ShapesConfig(num_train=6, num_val=1, seed=3))
    gt_file = root / "annotations" / "train.json"
    base = CocoDetection(root / "train", gt_file)
    loader = DataLoader(TransformedDataset(base, val_transforms(160), 160), batch_size=6, collate_fn=collate)
    model = DetectorModule(base.class_names, lr=0.02, warmup_epochs=5, loss=YOLOLoss(box_weight=2.0))
    out = tmp_path / "pred" / "detections.json"
    trainer = L.Trainer(
        max_epochs=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=10.0, callbacks=[CocoPredictionWriter(str(out), base.category_ids)],
    )  # fmt: skip
    trainer.fit(model, loader)
    val_map = trainer.validate(model, dataloaders=loader, verbose=False)[0]["val/map"]
    trainer.predict(model, dataloaders=loader, return_predictions=False)

    results = json.loads(out.read_text())
    assert {r["category_id"] for r in results} <= set(base.category_ids)  # the dataset's own ids
    coco = COCO(str(gt_file))
    ev = COCOeval(coco, coco.loadRes(str(out)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(val_map, abs=1e-4)
    assert 0.02 < val_map < 1.0, val_map  # a partly trained model: a non-trivial value to compare
