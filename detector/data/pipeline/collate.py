"""Batch samples into the detector contract (``detector.structures.Target``; see ``docs/design.md``).

images   float32 (B, 3, S, S) in [0, 1], contiguous, letterboxed to the model size
targets  list of B ``Target`` dicts:
    boxes      float32 (N, 4) xyxy in input pixels (N may be 0: shape (0, 4))
    labels     int64   (N,)   in [0, num_classes)
    image_id   int64   ()     dataset image id (COCO ``id``)
    orig_size  int64   (2,)   (h, w) of the original image
    letterbox  float32 (3,)   (scale, pad_x, pad_y): orig = (input - pad) / scale
    orig_boxes   float32 (M, 4) the annotation's boxes in original pixels, for evaluation
    orig_labels  int64   (M,)   their labels (both optional; passed through when present)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from detector.structures import Target

# the keys as ``Target`` declares them (in its order): every target has the required ones
TARGET_KEYS: tuple[str, ...] = tuple(k for k in Target.__annotations__ if k in Target.__required_keys__)
OPTIONAL_KEYS: tuple[str, ...] = tuple(k for k in Target.__annotations__ if k in Target.__optional_keys__)
# dtype and shape of each key of ``Target`` (-1: the number of boxes)
LAYOUT: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "boxes": (torch.float32, (-1, 4)),
    "labels": (torch.int64, (-1,)),
    "image_id": (torch.int64, ()),
    "orig_size": (torch.int64, (2,)),
    "letterbox": (torch.float32, (3,)),
    "orig_boxes": (torch.float32, (-1, 4)),
    "orig_labels": (torch.int64, (-1,)),
}


def collate(batch: Sequence[tuple[Tensor, Mapping[str, Any]]]) -> tuple[Tensor, list[Target]]:
    """Stack ``(image (3, S, S) uint8 or float in [0, 1], target)`` samples; targets stay a list.

    Each target's values (tensors, arrays or numbers) become tensors of ``LAYOUT``'s dtype and shape;
    a target without one of ``TARGET_KEYS`` is a ``ValueError``; keys outside ``Target`` are dropped.
    """
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
            key: torch.as_tensor(target[key], dtype=dtype).reshape(shape)
            for key, (dtype, shape) in LAYOUT.items()
            if key in target
        }
        targets.append(cast(Target, out))
    return images.contiguous(), targets
