"""The data contract every layer shares: what a batch target and a detection hold, and the input size rule.

Images are ``float32 [B, 3, S, S]`` in 0..1, letterboxed to the model input side ``S``, a multiple of
:data:`MAX_STRIDE` (the coarsest head's stride). Boxes are absolute-pixel ``xyxy`` in that input frame.
This module depends on torch only, so data, models, losses and ops may all import it.
"""

# No ``from __future__ import annotations`` here: under Python 3.11 a string ``NotRequired[...]`` is not
# recognised, so ``Target.__required_keys__`` (which ``collate`` reads) would list the optional keys too.
from typing import NotRequired, TypedDict

from torch import Tensor

MAX_STRIDE = 32  # the coarsest YOLOv3 scale: every input side is a multiple of it


class Target(TypedDict):
    """One image's ground truth after ``collate``.

    boxes      float32 ``[N, 4]`` xyxy input pixels (``[0, 4]`` for a background image)
    labels     int64   ``[N]`` in ``[0, num_classes)``
    image_id   int64   ``[]`` the dataset's image id (COCO ``id``)
    orig_size  int64   ``[2]`` (h, w) of the original image
    letterbox  float32 ``[3]`` (scale, pad_x, pad_y): original = (input − pad) / scale
    orig_boxes, orig_labels (optional): ``[M, 4]`` xyxy original pixels and ``[M]``, the annotation
        as read from disk, for evaluation in original pixels
    """

    boxes: Tensor
    labels: Tensor
    image_id: Tensor
    orig_size: Tensor
    letterbox: Tensor
    orig_boxes: NotRequired[Tensor]
    orig_labels: NotRequired[Tensor]


class Detections(TypedDict):
    """One image's detections after NMS, by descending score (torchmetrics' prediction format).

    boxes float32 ``[D, 4]`` xyxy pixels; scores float32 ``[D]``; labels int64 ``[D]``
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def check_image_size(image_size: int, name: str = "image_size") -> int:
    """``image_size`` if it is a positive multiple of :data:`MAX_STRIDE`, else a ``ValueError`` naming ``name``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % MAX_STRIDE:
        raise ValueError(f"{name} must be a positive multiple of {MAX_STRIDE} (the largest stride), got {image_size!r}")
    return image_size
