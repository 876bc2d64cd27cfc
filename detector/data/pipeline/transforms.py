"""Albumentations pipelines and the letterbox convention.

Both pipelines take ``image`` uint8 (H, W, 3), ``bboxes`` xyxy original pixels
(``pascal_voc``) and ``labels``, and return a ``size x size`` image with boxes in that frame.

Letterbox: the longest side is resized to ``size`` (aspect kept), then the image is padded
to ``size x size`` with gray 114, centred. It is recorded as ``(scale, pad_x, pad_y)``:

    input = orig * scale + pad          orig = (input - pad) / scale

``letterbox_params`` computes it exactly as ``val_transforms`` does. The resized short side
is rounded to whole pixels, so along that axis the true scale differs from ``scale`` by at
most ``0.5 / orig_side``: mapping back is exact to within ``0.5 / scale`` original pixels
(< 0.7 px for 416 -> 320). For training samples the recorded letterbox is that of the base
letterbox only (before the random affine and flip), so it is meaningful for val/test only.

Training pipeline (``train_transforms``)::

    letterbox(size) -> augment -> letterbox(size)        (mosaic items: A.Mosaic -> augment -> letterbox(size))

``augment`` is the user's list of albumentations transforms (``data.augment``), by default
``default_augment()``: random scale 0.6-1.4 and translate +-10 %, horizontal flip, HSV jitter.
The template owns the rest: the box parameters (``BboxParams``: pascal_voc boxes, ``labels``
field, clipping, boxes thinner than ``MIN_BOX_SIDE`` dropped), the letterbox before, mosaic, and
a final letterbox that brings whatever size the augmentation produced back to ``size x size``
(a no-op, pixel for pixel, when it kept the size; left out after the default, which keeps it).
``check_augment`` rejects what cannot keep boxes on their pixels (see ``docs/augmentation.md``).

Mosaic (``mosaic_transforms``, YOLOv4) tiles four images on a 2 x 2 grid with
``A.Mosaic``: each image is resized so that its *short* side is ``size`` ("cover"), the
grid centre is drawn in the middle 40 % and the ``size x size`` window around it is kept,
so every image shows the corner nearest the centre. The three extra images come through
``A.Mosaic``'s metadata (``MOSAIC_KEY``); the dataset chooses them (``detector.data.pipeline.mosaic``).

Multi-scale training resizes whole batches (``random_batch_size``, ``resize_batch``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

import albumentations as A
import cv2
import numpy as np
import torch.nn.functional as F
from albumentations.core.type_definitions import Targets
from torch import Tensor

from detector.structures import MAX_STRIDE, Target

PAD_VALUE = 114  # gray used for letterbox padding and affine borders (as in YOLOv3-v5)
MIN_BOX_SIDE = 2.0  # training boxes thinner than this (input pixels) after augmentation are dropped
MOSAIC_KEY = "mosaic_metadata"  # A.Mosaic's metadata key: a list of {"image", "bboxes", "labels"} dicts

Transform: TypeAlias = A.BasicTransform | A.BaseCompose  # one entry of ``data.augment``
Augment: TypeAlias = Sequence[Transform]


def letterbox_params(orig_hw: tuple[int, int], size: int) -> tuple[float, float, float]:
    """``(scale, pad_x, pad_y)`` of the letterbox that ``val_transforms(size)`` applies to an (h, w) image."""
    h, w = orig_hw
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))  # as A.LongestMaxSize
    pad_y, pad_x = int((size - new_h) / 2.0), int((size - new_w) / 2.0)  # as A.PadIfNeeded(position="center")
    return scale, float(pad_x), float(pad_y)


def _letterbox(size: int) -> list[A.BasicTransform]:
    return [
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE),
    ]


def default_augment(color_jitter: bool = True) -> list[Transform]:
    """The default ``data.augment``: random scale 0.6-1.4 and translate +-10 %, horizontal flip,
    HSV jitter (hue +-10, saturation +-40, value +-30; left out when ``color_jitter`` is false)."""
    transforms: list[Transform] = [
        A.Affine(
            scale=(0.6, 1.4),
            translate_percent=(-0.1, 0.1),
            keep_ratio=True,
            border_mode=cv2.BORDER_CONSTANT,
            fill=PAD_VALUE,
            p=1.0,
        ),
        A.HorizontalFlip(p=0.5),
    ]
    if color_jitter:
        transforms.append(A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=40, val_shift_limit=30, p=1.0))
    return transforms


def _train_compose(transforms: list[Transform], seed: int | None) -> A.Compose:
    bbox_params = A.BboxParams(
        format="pascal_voc", label_fields=["labels"], min_width=MIN_BOX_SIDE, min_height=MIN_BOX_SIDE, clip=True
    )
    return A.Compose(transforms, bbox_params=bbox_params, seed=seed)


def _user_part(augment: Augment | None, color_jitter: bool, size: int) -> list[Transform]:
    """``augment`` and the final letterbox: a checked private copy of ``augment``, or
    ``default_augment(color_jitter)`` when ``None`` (which keeps the size: no final letterbox needed)."""
    if augment is None:
        return default_augment(color_jitter)
    check_augment(augment, probe=False)
    # a private copy: each Compose owns its transforms (random state, box processors)
    return copy.deepcopy(list(augment)) + _letterbox(size)


def train_transforms(
    size: int, color_jitter: bool = True, seed: int | None = None, augment: Augment | None = None
) -> A.Compose:
    """Letterbox, ``augment`` (default: ``default_augment(color_jitter)``), letterbox again (not
    needed after the default, which keeps the size, and left out there: ~5 % of the time per item).

    Boxes are clipped to the image and dropped when a side falls below ``MIN_BOX_SIDE``.
    ``seed`` fixes the augmentation stream (tests); the dataset reseeds it for every item.
    """
    return _train_compose(_letterbox(size) + _user_part(augment, color_jitter, size), seed)


def mosaic_transforms(
    size: int, color_jitter: bool = True, seed: int | None = None, augment: Augment | None = None
) -> A.Compose:
    """2 x 2 mosaic of the image and three others (``A.Mosaic``), then ``augment`` and the final
    letterbox, as in ``train_transforms``.

    Call it with ``MOSAIC_KEY=[{"image", "bboxes", "labels"} x 3]`` (see ``apply``); boxes cut by
    a cell border are clipped to the visible part and dropped below ``MIN_BOX_SIDE``.
    """
    mosaic = A.Mosaic(
        grid_yx=(2, 2),
        target_size=(size, size),
        cell_shape=(size, size),
        center_range=(0.3, 0.7),
        fit_mode="cover",
        interpolation=cv2.INTER_LINEAR,
        fill=PAD_VALUE,
        metadata_key=MOSAIC_KEY,
        p=1.0,
    )
    return _train_compose([mosaic] + _user_part(augment, color_jitter, size), seed)


def val_transforms(size: int) -> A.Compose:
    """Letterbox only (deterministic); every box is kept, clipped to the image."""
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True)
    return A.Compose(_letterbox(size), bbox_params=bbox_params)


def _walk(transforms: Sequence[Any]) -> Iterator[Any]:
    """Every entry of ``transforms``, compositions (``A.OneOf`` ...) and their children, depth first."""
    for t in transforms:
        yield t
        if isinstance(t, A.BaseCompose):
            yield from _walk(t.transforms)


def _reason(t: Any) -> str | None:
    """Why ``t`` cannot be a training transform, or ``None`` when it can."""
    name = type(t).__name__
    if isinstance(t, A.Compose):
        return f"{name}: list the transforms themselves; the template builds the Compose (box parameters, letterbox)"
    if isinstance(t, A.BaseCompose):
        return None  # OneOf, SomeOf, Sequential, ...: their children are checked
    if not isinstance(t, A.BasicTransform):
        return f"{t!r} is not an albumentations transform"
    if isinstance(t, A.Mosaic):
        return "Mosaic: set data.mosaic instead (the template draws the partner images)"
    if t.targets_as_params:
        return f"{name} needs inputs {list(t.targets_as_params)} that the training pipeline does not supply"
    targets = t._targets if isinstance(t._targets, tuple) else (t._targets,)
    if not isinstance(t, A.ImageOnlyTransform) and Targets.BBOXES not in targets:
        return f"{name} cannot move bounding boxes (albumentations targets: {[x.value for x in targets if x]})"
    return None


def check_augment(augment: Augment, probe: bool = True) -> None:
    """Raise a one-line ``ValueError`` unless every transform can keep boxes on their pixels.

    Rejected: objects that are not albumentations transforms, a nested ``A.Compose``, ``A.Mosaic``
    (that is ``data.mosaic``), transforms that need extra inputs (``targets_as_params``: masks,
    metadata), spatial transforms that do not move boxes. With ``probe``, a copy with every ``p``
    set to 1 is run once on a test image, which must come out uint8 (H, W, 3).
    """
    if isinstance(augment, (str, bytes)) or not isinstance(augment, Sequence):
        raise ValueError(f"data.augment must be a list of albumentations transforms, got {type(augment).__name__}")
    for t in _walk(augment):
        reason = _reason(t)
        if reason is not None:
            raise ValueError(f"data.augment: {reason}")
    if probe:
        _probe(augment)


def _probe(augment: Augment) -> None:
    """Run a copy of ``augment`` with every probability 1 on a 64 x 48 image with one box, letterboxed to 64."""
    transforms = copy.deepcopy(list(augment))
    for t in _walk(transforms):
        t.p = 1.0
    image = np.full((48, 64, 3), PAD_VALUE, np.uint8)
    image[8:40, 16:48] = 255
    boxes, labels = np.array([[16, 8, 48, 40]], np.float32), np.array([0])
    try:
        out = _train_compose(_letterbox(64) + transforms, seed=0)(image=image, bboxes=boxes, labels=labels)
    except Exception as err:  # a transform's own failure, reported in one line with its cause chained
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"data.augment fails on a test image: {type(err).__name__}: {first}") from err
    _check_image(out["image"])


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(
            f"data.augment must keep uint8 (H, W, 3) images, got {got}: leave scaling to the template "
            "(no A.Normalize, A.ToFloat, ToTensorV2 or one-channel A.ToGray)"
        )


def augment_config(augment: Augment | None) -> list[dict[str, Any]] | None:
    """``data.augment`` checked (``check_augment``, probe included) and in its plain-data form (``augment_hparams``),
    which is what checkpoints record; ``None`` (the default augmentation) stays ``None``."""
    if augment is not None:
        check_augment(augment)
    return augment_hparams(augment)


def augment_hparams(augment: Augment | None) -> list[dict[str, Any]] | None:
    """``augment`` in albumentations' serialization (``A.from_dict({"transform": d})`` rebuilds each
    entry), as plain lists/dicts/numbers, so checkpoints load with ``weights_only=True``."""
    if augment is None:
        return None
    return [json.loads(json.dumps(A.to_dict(t)["transform"], default=str)) for t in augment]


def apply(
    transform: A.Compose,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    extras: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run a pipeline; returns ``(image (S, S, 3) uint8, boxes float32 (N, 4), labels int64 (N,))``.

    ``extras``: ``(image, boxes, labels)`` of the other mosaic tiles (``mosaic_transforms`` only).
    Raises ``ValueError`` when the pipeline did not return a uint8 (H, W, 3) image.
    """
    data: dict[str, object] = {"image": image, "bboxes": boxes, "labels": labels}
    if extras is not None:
        data[MOSAIC_KEY] = [{"image": im, "bboxes": b, "labels": lab} for im, b, lab in extras]
    out = transform(**data)
    _check_image(out["image"])
    boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], np.int64).reshape(-1)
    return out["image"], boxes, labels


def check_multi_scale(multi_scale: Sequence[int] | None) -> tuple[int, int] | None:
    """``multi_scale`` as ``(low, high)`` (``None`` stays ``None``); a ``ValueError`` unless
    ``MAX_STRIDE <= low <= high`` and the range holds a multiple of ``MAX_STRIDE``."""
    if multi_scale is None:
        return None
    low, high = multi_scale
    if not MAX_STRIDE <= low <= high or high // MAX_STRIDE * MAX_STRIDE < low:
        raise ValueError(
            f"multi_scale must be [low, high] with {MAX_STRIDE} <= low <= high spanning a multiple of {MAX_STRIDE}, "
            f"got {list(multi_scale)}"
        )
    return low, high


def random_batch_size(seed: int, step: int, low: int, high: int) -> int:
    """A multiple of ``MAX_STRIDE`` in ``[low, high]``, uniform, a pure function of ``(seed, step)``."""
    k = np.random.default_rng([seed, step]).integers(-(-low // MAX_STRIDE), high // MAX_STRIDE + 1)
    return int(k) * MAX_STRIDE


def resize_batch(images: Tensor, targets: list[Target], size: int) -> tuple[Tensor, list[Target]]:
    """Resize ``images (B, 3, S, S)`` to ``(B, 3, size, size)`` (bilinear) and scale boxes by ``size / S``.

    Pixel-edge coordinates scale exactly: ``F.interpolate(align_corners=False)`` maps the edge
    ``x`` of the input to ``x * size / S``. ``letterbox`` (scale, pad_x, pad_y) is scaled alike.
    """
    if size == images.shape[-1]:
        return images, targets
    k = size / images.shape[-1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    out: list[Target] = []
    for t in targets:
        t = t.copy()
        t["boxes"] = t["boxes"] * k  # (N, 4)
        t["letterbox"] = t["letterbox"] * k  # (3,): input' = k * (orig * scale + pad)
        out.append(t)
    return images, out
