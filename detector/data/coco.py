"""A COCO-JSON detection dataset: images folder + annotation file -> raw samples.

Each sample is a dict

    image     uint8  (H, W, 3) RGB, original pixels
    boxes     float32 (N, 4) xyxy in original pixels, clipped to the image
    labels    int64  (N,)   contiguous labels in [0, num_classes)
    image_id  int           the COCO image id

Labels are the category ids sorted ascending and renumbered 0..C-1 (``category_ids[label]``
gives the dataset id back, ``class_names[label]`` its name). Crowd annotations and boxes
with no area are skipped. The JSON is parsed once and reduced to per-image numpy arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from torch.utils.data import Dataset

COCO_KEYS = ("images", "annotations", "categories")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file, with one-line errors that say what to fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path} (check the annotations path or the data root)")
    try:
        coco = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"annotation file is not valid JSON: {path} ({e})") from None
    missing = [k for k in COCO_KEYS if not isinstance(coco, dict) or k not in coco]
    if missing:
        raise ValueError(f"annotation file is not COCO format: {path} lacks keys {missing} (need {list(COCO_KEYS)})")
    return coco


class CocoDetection(Dataset):
    """Detection samples from a COCO annotation file (see the module docstring for the sample dict).

    Args:
        images: folder holding the ``file_name`` of every image entry.
        annotations: COCO JSON file.
        category_ids: force this label -> category id mapping (e.g. the training set's), so
            that a validation file lists its categories in any order; unknown ids raise.
    """

    def __init__(self, images: str | Path, annotations: str | Path, category_ids: Sequence[int] | None = None):
        self.images_dir = Path(images)
        self.annotations = Path(annotations)
        coco = load_coco_json(self.annotations)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images_dir} (check the images path or the data root)")
        names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        if category_ids is None:
            category_ids = sorted(names)
        elif set(names) - set(category_ids):
            raise ValueError(
                f"{self.annotations} has category ids {sorted(set(names) - set(category_ids))} "
                f"that the training categories {list(category_ids)} lack"
            )
        self.category_ids: list[int] = [int(c) for c in category_ids]
        self.class_names: list[str] = [names.get(c, str(c)) for c in self.category_ids]
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        self._index(coco)

    def _index(self, coco: dict[str, Any]) -> None:
        self.image_ids: list[int] = [int(im["id"]) for im in coco["images"]]
        self.file_names: list[str] = [str(im["file_name"]) for im in coco["images"]]
        self.sizes: list[tuple[int, int]] = [(int(im.get("height", 0)), int(im.get("width", 0))) for im in coco["images"]]
        row = {image_id: i for i, image_id in enumerate(self.image_ids)}
        per_image: list[list] = [[] for _ in self.image_ids]
        for ann in coco["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            if ann["category_id"] not in self._label_of:
                raise ValueError(f"{self.annotations}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
            if ann["image_id"] not in row:
                raise ValueError(f"{self.annotations}: annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
            per_image[row[ann["image_id"]]].append((x, y, x + w, y + h, self._label_of[ann["category_id"]]))
        self._boxes = [np.array([a[:4] for a in anns], np.float32).reshape(-1, 4) for anns in per_image]
        self._labels = [np.array([a[4] for a in anns], np.int64) for anns in per_image]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        path = self.images_dir / self.file_names[i]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"image not found or unreadable: {path} (listed in {self.annotations})")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.load_image(i)
        h, w = image.shape[:2]
        boxes = self._boxes[i].copy()
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {"image": image, "boxes": boxes[keep], "labels": self._labels[i][keep], "image_id": self.image_ids[i]}
