"""``predict`` output writers: a COCO results file and, optionally, the images with their detections drawn."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from detector.data.readers.folder import ImageFolder


class CocoPredictionWriter(BasePredictionWriter):
    """Write ``predict`` detections as a COCO results file, and optionally draw them.

    Each detection becomes ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in
    original image pixels, with the dataset's own category ids (``datamodule.category_ids``),
    so the file can be scored by ``pycocotools.COCOeval`` against the ground-truth JSON.
    When predicting on a folder (``data.predict_images``) there is no COCO id: ``image_id`` is
    the image's index in the sorted folder and each detection also carries its ``file_name``.

    Args:
        output: path of the JSON file (folders are created).
        category_ids: label -> dataset category id; the datamodule's ``category_ids`` when None.
        draw_dir: when set, write every predicted image there as JPEG, original size, with its
            detections of score >= ``draw_thresh`` drawn (box, class name, score); the file is
            the image's ``file_name`` with the suffix ``.jpg``.
        draw_thresh: minimum score of a drawn detection, in [0, 1].
    """

    def __init__(
        self,
        output: str = "predictions.json",
        category_ids: list[int] | None = None,
        draw_dir: str | None = None,
        draw_thresh: float = 0.3,
    ) -> None:
        super().__init__(write_interval="epoch")
        if not 0.0 <= draw_thresh <= 1.0:
            raise ValueError(f"draw_thresh is a score and must be in [0, 1], got {draw_thresh}")
        self.output = Path(output)
        self.category_ids = category_ids
        self.draw_dir = Path(draw_dir) if draw_dir is not None else None
        self.draw_thresh = draw_thresh

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        """Write the predict epoch's detections (per batch, per image) as COCO results JSON; draw them if asked."""
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning when run with a datamodule
        category_ids = self.category_ids or getattr(datamodule, "category_ids", None)
        source = predict_source(trainer)
        file_names = source.file_names if isinstance(source, ImageFolder) else None  # image_id = row
        dets = [det for batch in predictions for det in batch]
        results = []
        for det in dets:
            image_id = int(det["image_id"])
            xywh = det["boxes"].clone()  # (D, 4) xyxy original pixels -> xywh
            xywh[:, 2:] -= xywh[:, :2]
            labels = det["labels"].tolist()
            cats = [category_ids[k] for k in labels] if category_ids else labels
            for box, cat, score in zip(xywh.tolist(), cats, det["scores"].tolist()):
                result = {"image_id": image_id, "category_id": int(cat), "bbox": box, "score": score}
                if file_names is not None:
                    result["file_name"] = file_names[image_id]
                results.append(result)
        output = self.output  # under DDP every process writes its share of the images to its own file
        if trainer.world_size > 1:
            output = output.with_suffix(f".rank{trainer.global_rank}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results))
        rank_zero_info(f"{len(results)} detections written to {output}")
        if self.draw_dir is not None:
            names = getattr(pl_module, "class_names", None) or getattr(datamodule, "class_names", None)
            self._draw_all(source, dets, names, self.draw_dir)

    def _draw_all(self, source: Any, dets: list[dict], class_names: list[str] | None, draw_dir: Path) -> None:
        row_of = {int(image_id): row for row, image_id in enumerate(source.image_ids)}
        written: set[Path] = set()
        for det in dets:
            row = row_of[int(det["image_id"])]
            keep = det["scores"] >= self.draw_thresh
            boxes, labels, scores = (
                det["boxes"][keep].numpy(),
                det["labels"][keep].tolist(),
                det["scores"][keep].tolist(),
            )
            image = draw_detections(source.load_image(row), boxes, labels, scores, class_names)
            name = Path(source.file_names[row] if hasattr(source, "file_names") else source.paths[row].name)
            path = draw_dir / name.with_suffix(".jpg")
            if path in written:  # a.png and a.jpg in one folder: keep both
                path = draw_dir / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            written.add(path)
        rank_zero_info(f"{len(written)} images with detections drawn written to {draw_dir}")


def predict_source(trainer: L.Trainer) -> Any:
    """The raw dataset under the predict loader (``ImageFolder`` or a ``DetectionSource``): it has
    ``image_ids``, ``load_image(row)`` (original pixels) and ``file_names`` or ``paths``."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if loader is None:
        raise RuntimeError("predict_source needs the trainer's predict dataloader (call it from a predict hook)")
    dataset = loader.dataset
    while not hasattr(dataset, "load_image") and hasattr(dataset, "base"):  # TransformedDataset, CachedImages
        dataset = dataset.base
    return dataset


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per class, hues spread by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray, boxes: np.ndarray, labels: list[int], scores: list[float], class_names: list[str] | None = None
) -> np.ndarray:
    """Draw ``boxes`` (D, 4) xyxy pixels with ``"<class> <score>"`` on a copy of ``image`` uint8 (H, W, 3) RGB."""
    out = np.ascontiguousarray(image).copy()
    thickness = max(1, round(max(out.shape[:2]) / 400))
    for (x0, y0, x1, y1), label, score in zip(np.round(boxes).astype(int).tolist(), labels, scores):
        colour = class_colour(label)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, thickness)
        text = f"{class_names[label] if class_names else label} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        ty = max(y0, th + base)  # keep the label inside the image
        cv2.rectangle(out, (x0, ty - th - base), (x0 + tw, ty), colour, cv2.FILLED)
        cv2.putText(out, text, (x0, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out
