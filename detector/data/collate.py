"""Batch samples into the detector contract (``detector.structures``; docs/design.md).

images   float32 (B, 3, S, S) in [0, 1], contiguous, letterboxed to the model size
targets  list of B dicts:
    boxes      float32 (N, 4) xyxy in input pixels (N may be 0: shape (0, 4))
    labels     int64   (N,)   in [0, num_classes)
    image_id   int64   ()     dataset image id (COCO ``id``)
    orig_size  int64   (2,)   (h, w) of the original image
    letterbox  float32 (3,)   (scale, pad_x, pad_y): orig = (input - pad) / scale
    orig_boxes   float32 (M, 4) the annotation's boxes in original pixels, for evaluation
    orig_labels  int64   (M,)   their labels (both optional; passed through when present)
"""

from __future__ import annotations

import torch
from torch import Tensor

TARGET_KEYS = ("boxes", "labels", "image_id", "orig_size", "letterbox")
OPTIONAL_KEYS = {"orig_boxes": (torch.float32, (-1, 4)), "orig_labels": (torch.int64, (-1,))}


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack ``(image (3, S, S) uint8 or float in [0, 1], target)`` samples; targets stay a list."""
    if not batch:
        raise ValueError("collate: empty batch")
    images = torch.stack([image for image, _ in batch])  # (B, 3, S, S)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    else:
        images = images.float()
    targets = []
    for _, target in batch:
        missing = [k for k in TARGET_KEYS if k not in target]
        if missing:
            raise ValueError(f"collate: target lacks keys {missing}")
        out = {
            "boxes": torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1),
            "image_id": torch.as_tensor(target["image_id"], dtype=torch.int64).reshape(()),
            "orig_size": torch.as_tensor(target["orig_size"], dtype=torch.int64).reshape(2),
            "letterbox": torch.as_tensor(target["letterbox"], dtype=torch.float32).reshape(3),
        }
        for key, (dtype, shape) in OPTIONAL_KEYS.items():
            if key in target:
                out[key] = torch.as_tensor(target[key], dtype=dtype).reshape(shape)
        targets.append(out)
    return images.contiguous(), targets
