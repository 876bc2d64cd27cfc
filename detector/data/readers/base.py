"""``DetectionSource``: the reader contract of ``detector.data.readers.formats``, implemented once.

A reader (COCO, YOLO, VOC) parses its annotation files into ``RawImage`` records and calls
``_build``, which runs the bad-input checks of ``detector.data.readers.checks`` (in a thread pool),
keeps one numpy array of boxes and labels per kept image, and raises or warns once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from detector.data.readers.checks import (
    CheckReport,
    DataError,
    Header,
    Problem,
    Verify,
    check_boxes,
    load_rgb,
    parallel_map,
    probe_image,
)

# Image files every reader lists (lower-case suffixes; a file's suffix is compared in lower case): the formats
# that Pillow (header checks) and OpenCV (decoding) both read. ``.mpo`` is a multi-picture JPEG (first frame).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")


@dataclass
class RawImage:
    """One image as its annotation file states it, before any check.

    ``boxes`` float (N, 4) xyxy in pixels, or in fractions of (w, h) when ``normalized``;
    ``labels`` int (N,) with -1 for a class the reader could not map; ``size`` (h, w) as
    annotated (``None`` or zeros: not stated); ``problem`` a ``PROBLEMS`` kind that makes the
    reader skip the image (e.g. its XML did not parse); ``name`` how the report names it.
    """

    path: Path
    image_id: int
    boxes: np.ndarray
    labels: np.ndarray
    name: str
    size: tuple[int, int] | None = None
    normalized: bool = False
    problem: str | None = None


class DetectionSource(Dataset):
    """A checked detection dataset; items and attributes as in ``detector.data.readers.formats``.

    Attributes (one entry per kept image, in the annotation file's order): ``paths``,
    ``image_ids``, ``sizes`` (h, w) from the image header, ``boxes`` float32 (N, 4) xyxy
    original pixels (clipped, positive area), ``labels`` int64 (N,) in ``[0, C)``; and
    ``class_names``, ``category_ids``, ``report`` (a ``CheckReport``).

    EXIF orientation: images are turned upright (as cv2, mmdetection, Detectron2, Ultralytics
    load them), unless the annotation states a size that matches only the stored frame (a tool
    that ignored EXIF wrote it); then that image is loaded as stored. Only tags 5-8 (which swap
    the sides) can be told apart this way; for 2-4 the upright frame is assumed.

    Loading: an image that fails to decode in ``__getitem__`` (changed since the checks, or
    corrupt beyond what ``verify`` saw) is replaced by the next index that decodes, cyclically
    (``i+1, i+2, ...``), so a given failure always maps to the same substitute. It is warned
    about once, counted as ``load_failed`` in this process's ``report`` and remembered, so later
    epochs substitute without retrying. Only if no image decodes does it raise. Under ``strict``
    the first failure raises ``DataError`` instead, as every other problem does.
    """

    def __init__(self, name: str, *, strict: bool, verify: Verify, max_examples: int, workers: int | None):
        if verify not in ("header", "decode"):
            raise ValueError(f"verify must be 'header' or 'decode', got {verify!r}")
        self.strict, self.verify, self.workers = strict, verify, workers
        self.report = CheckReport(name, max_examples)
        self.class_names: list[str] = []
        self.category_ids: list[int] = []
        self.paths: list[Path] = []
        self.image_ids: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.boxes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self._upright: list[bool] = []  # apply the EXIF orientation when loading
        self._unreadable: set[int] = set()

    def _build(self, raw: list[RawImage]) -> None:
        """Check ``raw`` against the image files; keep what passes; raise/warn per ``strict``."""
        self.report.images_listed += len(raw)
        _mark_duplicates(raw, self.report)
        todo = [r for r in raw if r.problem is None]
        probed = parallel_map(lambda r: probe_image(r.path, self.verify), todo, self.workers)
        headers: dict[int, Header | Problem] = dict(zip(map(id, todo), probed))
        for r in raw:
            header = Problem(r.problem) if r.problem is not None else headers[id(r)]
            if isinstance(header, Problem):
                self.report.add(header.kind, f"{r.name} ({header.detail})" if header.detail else r.name)
                continue
            annotated = tuple(r.size) if r.size and all(r.size) else None  # (h, w) or not stated
            if annotated in (None, (header.height, header.width)):
                self._keep(r, header, upright=True)
            elif annotated == header.stored:  # annotated on the image as stored, ignoring EXIF
                self._keep(r, header, upright=False)
            else:
                self.report.add(
                    "size_mismatch", f"{r.name} (annotated {annotated}, file {header.height, header.width})"
                )
        self.report.images_kept = len(self.paths)
        self.report.boxes_kept = sum(len(b) for b in self.boxes)
        self.report.finish(self.strict)

    def _keep(self, r: RawImage, header: Header, upright: bool) -> None:
        """Keep ``r``; ``upright=False``: its annotations are in the stored frame, so EXIF is not applied."""
        h, w = (header.height, header.width) if upright else header.stored
        for kind in header.kinds:
            if upright or kind != "exif_orientation":
                self.report.add(kind, r.name)
        boxes = np.asarray(r.boxes, np.float64).reshape(-1, 4)  # (N, 4)
        if r.normalized:
            boxes = boxes * np.array([w, h, w, h], np.float64)
        boxes, labels = check_boxes(boxes, r.labels, (h, w), len(self.class_names), self.report, r.name)
        if not len(boxes):
            self.report.add("no_boxes", r.name)
        self.paths.append(r.path)
        self.image_ids.append(int(r.image_id))
        self.sizes.append((h, w))
        self._upright.append(upright)
        self.boxes.append(boxes)
        self.labels.append(labels)

    @property
    def num_classes(self) -> int:
        """C, the number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB of item ``i``; raises ``OSError`` if it does not decode to its header size."""
        image = load_rgb(self.paths[i], exif=self._upright[i])
        if image.shape[:2] != self.sizes[i]:
            raise OSError(f"{self.paths[i]} decoded to {image.shape[:2]}, its header said {self.sizes[i]}")
        return image

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{"image": uint8 (H, W, 3), "boxes": float32 (N, 4), "labels": int64 (N,), "image_id": int}``."""
        n = len(self)
        for j in ((i + k) % n for k in range(n)):
            if j in self._unreadable:
                continue
            try:
                image = self.load_image(j)
            except OSError as e:
                self._unreadable.add(j)
                self.report.add("load_failed", self.paths[j])
                if self.strict:
                    raise DataError(f"bad input (strict=True): {self.report.name}: {e} (load_failed)") from None
                warnings.warn(  # stacklevel 1: the failing item is the news, not the DataLoader frame that asked
                    f"{self.report.name}: {e}; using the next readable item instead (counted as load_failed)",
                    stacklevel=1,
                )
                continue
            return {
                "image": image,
                "boxes": self.boxes[j].copy(),
                "labels": self.labels[j].copy(),
                "image_id": self.image_ids[j],
            }
        raise DataError(f"{self.report.name}: none of its {n} images could be decoded")


def _mark_duplicates(raw: list[RawImage], report: CheckReport) -> None:
    """Later entries with an already seen image id are skipped (each entry carries its own boxes; COCO,
    whose annotations name only the id, resolves repeated ids itself); repeated files are counted and kept."""
    ids: set[int] = set()
    files: set[str] = set()
    for r in raw:
        if r.problem is not None:
            continue
        if r.image_id in ids:
            r.problem = "duplicate_image_id"
            continue
        ids.add(r.image_id)
        key = os.path.normcase(os.path.abspath(r.path))
        if key in files:
            report.add("duplicate_file", r.name)
        files.add(key)


def stem_ids(stems: Sequence[str]) -> list[int]:
    """Image ids: ``int(stem)`` (``_`` removed, e.g. VOC ``2008_000123``) when every stem gives a
    distinct integer, else the position in the list (so ids are always unique and deterministic)."""
    digits = [s.replace("_", "") for s in stems]
    if digits and all(d.isdigit() for d in digits) and len(set(map(int, digits))) == len(digits):
        return [int(d) for d in digits]
    return list(range(len(stems)))


def index_ids(
    class_names: list[str], forced_names: Sequence[str] | None, category_ids: Sequence[int] | None, source: str
) -> tuple[list[str], list[int]]:
    """Class names and ``category_ids = [0 .. C-1]`` for formats whose class id is the list index.

    ``forced_names`` (the training split's) wins over ``class_names``; forced ``category_ids``
    must then be ``0 .. C-1``, since these formats have no ids of their own.
    """
    names = [str(n) for n in (forced_names if forced_names is not None else class_names)]
    if category_ids is not None and [int(c) for c in category_ids] != list(range(len(names))):
        raise DataError(
            f"{source}: category_ids must be 0..{len(names) - 1} (the index in the class list) for this format, "
            f"got {list(category_ids)}"
        )
    return names, list(range(len(names)))
