"""A folder of images with no annotations, for ``predict``: raw samples in the ``CocoDetection`` format.

Images are the files directly in the folder whose extension is one of ``base.IMAGE_SUFFIXES``
(case-insensitive), sorted by name. Item ``i`` is

    image     uint8  (H, W, 3) RGB, original pixels
    boxes     float32 (0, 4)   no annotation
    labels    int64  (0,)
    image_id  int           i, the running index; ``file_names[i]`` is its file name

so ``TransformedDataset(ImageFolder(...), val_transforms(size), size)`` letterboxes it as it does
a validation image, and a prediction's ``image_id`` leads back to its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from detector.data.readers.base import IMAGE_SUFFIXES


class ImageFolder(Dataset):
    """The images of ``folder`` (see the module docstring); raises when there is none."""

    def __init__(self, folder: str | Path):
        self.images_dir = Path(folder)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images_dir} (check data.predict_images)")
        files = sorted(p.name for p in self.images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in {self.images_dir}")
        self.file_names: list[str] = files
        self.image_ids: list[int] = list(range(len(files)))

    def __len__(self) -> int:
        return len(self.file_names)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB."""
        path = self.images_dir / self.file_names[i]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot decode image {path}: not an image, or a format OpenCV cannot read")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.load_image(i),
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int64),
            "image_id": i,
        }
