"""One entry point for the dataset formats: ``open_dataset(format, root, split, ...)``.

Reader contract (``CocoDetection``, ``YoloDetection``, ``VocDetection``; all ``DetectionSource``):
every reader is a ``torch.utils.data.Dataset`` whose items are dicts

    image     uint8   (H, W, 3) RGB, original pixels (gray replicated, alpha dropped, 16-bit >> 8)
    boxes     float32 (N, 4) xyxy in original pixels, inside [0, W] x [0, H], positive area
    labels    int64   (N,) contiguous labels in [0, C)
    image_id  int     unique within the split

and whose attributes are

    class_names   list[str]              label -> name
    category_ids  list[int]              label -> the dataset's own id (COCO category id;
                                         YOLO/VOC: the index in the class list, i.e. the label)
    sizes         list[tuple[int, int]]  (h, w) per image, from the image header (no decode)
    boxes, labels list[np.ndarray]       per image, as in the items (no decode needed)
    image_ids     list[int]; paths list[Path]
    report        CheckReport            counts per kind of problem (``detector.data.readers.checks``)

Every constructor takes ``category_ids`` / ``class_names`` to force the training split's
mapping on val/test, ``strict`` (raise ``ValueError`` on any non-benign problem instead of
skipping it with one warning) and ``verify`` (``"header"``: cheap checks; ``"decode"``: decode
every image once). Checks run once, when the dataset is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from detector.data.readers.base import DetectionSource
from detector.data.readers.checks import DataError, DataNotFoundError, Verify
from detector.data.readers.coco import CocoDetection
from detector.data.readers.voc import VocDetection
from detector.data.readers.yolo import YoloDetection

Format = Literal["coco", "yolo", "voc"]
FORMATS: tuple[str, ...] = ("coco", "yolo", "voc")


def open_dataset(
    format: Format,
    root: str | Path,
    split: str,
    *,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    category_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = False,
    verify: Verify = "header",
    keep_difficult: bool = False,
    max_examples: int = 5,
    workers: int | None = None,
) -> DetectionSource:
    """Open one split of a dataset; relative ``images`` / ``annotations`` are relative to ``root``.

    Args:
        format: ``coco``: ``root`` is the dataset folder; ``images`` defaults to ``<split>``,
            ``annotations`` to ``annotations/<split>.json``, else ``annotations/instances_<split>.json``.
            ``yolo``: ``root`` is the dataset YAML, or a folder holding exactly one ``*.yaml``;
            ``split`` is its key (``train`` / ``val`` / ``test``); ``images``/``annotations`` unused.
            ``voc``: ``root`` is the folder with ``Annotations``, ``JPEGImages``, ``ImageSets/Main``;
            ``split`` names ``ImageSets/Main/<split>.txt``; ``images``/``annotations`` override
            the two folders.
        split: the split's name (see ``format``).
        category_ids, class_names: the training split's mapping, forced on val/test.
        strict, verify, max_examples, workers: see ``detector.data.readers.checks`` / ``CocoDetection``.
        keep_difficult: VOC only: keep ``difficult`` objects as ordinary boxes.
    Returns:
        a ``DetectionSource`` following the contract in this module's docstring.
    """
    root = Path(root)
    common: dict[str, Any] = {"strict": strict, "verify": verify, "max_examples": max_examples, "workers": workers}
    if format == "coco":
        if category_ids is None and class_names is not None:
            raise DataError("coco: pass category_ids (the training split's) together with class_names")
        image_dir = root / (images if images is not None else split)
        return CocoDetection(
            image_dir, _coco_annotations(root, split, annotations), category_ids, class_names, **common
        )
    if format == "yolo":
        if images is not None or annotations is not None:
            raise DataError("yolo: images/annotations are not used; the dataset YAML names each split's images")
        return YoloDetection(_yolo_yaml(root), split, class_names, category_ids, **common)
    if format == "voc":
        folders: dict[str, Any] = {"images": images or "JPEGImages", "annotations": annotations or "Annotations"}
        return VocDetection(root, split, class_names, category_ids, keep_difficult=keep_difficult, **folders, **common)
    raise DataError(f"unknown dataset format {format!r}; choose one of {list(FORMATS)}")


def _coco_annotations(root: Path, split: str, annotations: str | Path | None) -> Path:
    if annotations is not None:
        return root / annotations
    candidates = [root / "annotations" / f"{split}.json", root / "annotations" / f"instances_{split}.json"]
    return next((p for p in candidates if p.is_file()), candidates[0])


def _yolo_yaml(root: Path) -> Path:
    if not root.is_dir():
        return root
    found = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    if len(found) != 1:
        raise DataNotFoundError(
            f"yolo: {root} holds {len(found)} dataset YAMLs ({[p.name for p in found]}); set root to the YAML file itself"
        )
    return found[0]
