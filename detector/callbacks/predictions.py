"""``predict`` output writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class CocoPredictionWriter(BasePredictionWriter):
    """Write ``predict`` detections as a COCO results file.

    Each detection becomes ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in
    original image pixels, with the dataset's own category ids (``datamodule.category_ids``),
    so the file can be scored by ``pycocotools.COCOeval`` against the ground-truth JSON.

    Args:
        output: path of the JSON file (folders are created).
        category_ids: label -> dataset category id; the datamodule's ``category_ids`` when None.
    """

    def __init__(self, output: str = "predictions.json", category_ids: list[int] | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)
        self.category_ids = category_ids

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        category_ids = self.category_ids or getattr(trainer.datamodule, "category_ids", None)
        results = []
        for batch in predictions:
            for det in batch:
                xywh = det["boxes"].clone()
                xywh[:, 2:] -= xywh[:, :2]
                labels = det["labels"].tolist()
                cats = [category_ids[k] for k in labels] if category_ids else labels
                for box, cat, score in zip(xywh.tolist(), cats, det["scores"].tolist()):
                    results.append({"image_id": int(det["image_id"]), "category_id": int(cat), "bbox": box, "score": score})
        output = self.output  # under DDP every process writes its share of the images to its own file
        if trainer.world_size > 1:
            output = output.with_suffix(f".rank{trainer.global_rank}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results))
        rank_zero_info(f"{len(results)} detections written to {output}")
