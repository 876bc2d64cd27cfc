"""A COCO-JSON detection dataset: images folder + annotation file -> checked samples.

Samples and attributes follow the reader contract of ``detector.data.readers.formats``. Labels are
the category ids sorted ascending and renumbered 0..C-1 (``category_ids[label]`` gives the
dataset id back, ``class_names[label]`` its name). ``bbox`` is ``[x, y, w, h]`` in pixels
(pixel-edge convention) and becomes ``[x, y, x + w, y + h]``. Crowd annotations are left out
(counted as ``crowd``); the other checks are those of ``detector.data.readers.checks``: an annotation
whose ``category_id`` is not a category counts as ``class_out_of_range``, one whose
``image_id`` is not an image or whose ``bbox`` is not 4 numbers as ``bad_annotation``. An image
id listed twice is resolved by ``resolve_ids``: annotations are never attached to another image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detector.data.readers.base import DetectionSource, RawImage
from detector.data.readers.checks import DataError, DataNotFoundError, Verify

COCO_KEYS = ("images", "annotations", "categories")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file, with one-line errors that say what to fix."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"annotation file not found: {path} (check the annotations path or the data root)")
    try:
        coco = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"annotation file is not valid JSON: {path} ({e})") from None
    missing = [k for k in COCO_KEYS if not isinstance(coco, dict) or k not in coco]
    if missing:
        raise DataError(f"annotation file is not COCO format: {path} lacks keys {missing} (need {list(COCO_KEYS)})")
    return coco


class CocoDetection(DetectionSource):
    """Detection samples from a COCO annotation file (contract: ``detector.data.readers.formats``).

    Args:
        images: folder holding the ``file_name`` of every image entry.
        annotations: COCO JSON file.
        category_ids: force this label -> category id mapping (e.g. the training set's), so
            that a validation file lists its categories in any order; a category of the file
            outside it raises, an annotation of an unknown id counts as ``class_out_of_range``.
        class_names: names for ``category_ids`` (default: the file's, or the id as text).
        strict: raise ``ValueError`` on any non-benign problem instead of skipping it.
        verify: ``"header"`` (cheap checks) or ``"decode"`` (decode every image once).
        max_examples: examples listed in the warning / error.
        workers: threads for the image checks (default ``min(8, cpus)``).
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path,
        category_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        *,
        strict: bool = False,
        verify: Verify = "header",
        max_examples: int = 5,
        workers: int | None = None,
    ):
        self.images_dir = Path(images)
        self.annotations = Path(annotations)
        super().__init__(
            str(self.annotations), strict=strict, verify=verify, max_examples=max_examples, workers=workers
        )
        coco = load_coco_json(self.annotations)
        if not self.images_dir.is_dir():
            raise DataNotFoundError(
                f"image folder not found: {self.images_dir} (check the images path or the data root)"
            )
        self._set_classes(coco["categories"], category_ids, class_names)
        self._build(self._parse(coco))
        self.file_names: list[str] = [str(p.relative_to(self.images_dir)) for p in self.paths]

    def _set_classes(
        self, categories: list, category_ids: Sequence[int] | None, class_names: Sequence[str] | None
    ) -> None:
        names = {int(c["id"]): str(c["name"]) for c in categories}
        if category_ids is None:
            category_ids = sorted(names)
        elif set(names) - set(category_ids):
            raise DataError(
                f"{self.annotations} has category ids {sorted(set(names) - set(category_ids))} "
                f"that the training categories {list(category_ids)} lack"
            )
        self.category_ids = [int(c) for c in category_ids]
        self.class_names = [names.get(c, str(c)) for c in self.category_ids]
        if class_names is not None:
            if len(class_names) != len(self.category_ids):
                raise DataError(f"class_names has {len(class_names)} names for {len(self.category_ids)} category_ids")
            self.class_names = [str(n) for n in class_names]

    def _parse(self, coco: dict[str, Any]) -> list[RawImage]:
        raw = [self._image(im) for im in coco["images"]]
        owner, ambiguous = resolve_ids(raw)
        skipped = {r.image_id for r in raw if r.problem is not None}  # their annotations go with them
        per_image: list[list[tuple]] = [[] for _ in raw]
        label_of = {c: i for i, c in enumerate(self.category_ids)}
        where = self.annotations.name
        for ann in coco["annotations"]:
            image_id, bbox = ann.get("image_id"), ann.get("bbox")
            if image_id in ambiguous:
                files = f"image_id {image_id} is listed for {ambiguous[image_id]} files"
                self.report.add("ambiguous_annotation", f"{where} annotation {ann.get('id')} ({files})")
                continue
            if ann.get("iscrowd", 0):
                self.report.add("crowd", f"{where} annotation {ann.get('id')}")
                continue
            if image_id not in owner and image_id in skipped:
                continue
            if image_id not in owner or not isinstance(bbox, list) or len(bbox) != 4:
                self.report.add("bad_annotation", f"{where} annotation {ann.get('id')} (image_id/bbox)")
                continue
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                self.report.add("bad_annotation", f"{where} annotation {ann.get('id')} (bbox {bbox})")
                continue
            per_image[owner[image_id]].append((x, y, x + w, y + h, label_of.get(ann.get("category_id"), -1)))
        for r, anns in zip(raw, per_image):
            r.boxes = np.array([a[:4] for a in anns], np.float64).reshape(-1, 4)
            r.labels = np.array([a[4] for a in anns], np.int64)
        return raw

    def _image(self, im: dict[str, Any]) -> RawImage:
        name = str(im.get("file_name", ""))
        empty = np.zeros((0, 4)), np.zeros(0, np.int64)
        try:
            image_id, size = int(im["id"]), (int(im.get("height", 0)), int(im.get("width", 0)))
        except (KeyError, TypeError, ValueError):
            return RawImage(
                self.images_dir / name, -1, *empty, name=f"{name} (image entry {im})", problem="bad_annotation"
            )
        problem = None if name else "bad_annotation"
        return RawImage(
            self.images_dir / name, image_id, *empty, name=name or f"image {image_id}", size=size, problem=problem
        )


def resolve_ids(raw: list[RawImage]) -> tuple[dict[int, int], dict[int, int]]:
    """Which image entry owns the annotations of each image id, as COCO annotations name only the id.

    An id listed again for the same file: the first entry owns the annotations, the repeats are
    skipped (``duplicate_image_id``). An id listed for different files: no entry can own them
    (whose boxes are they?), so every entry of the id is skipped (``duplicate_image_id``) and the
    id is returned in ``ambiguous`` (id -> number of files), never attached to a kept image.
    Entries that already have a problem take no part. Returns ``(owner: id -> index into raw, ambiguous)``.
    """
    files: dict[int, dict[str, int]] = {}
    for i, r in enumerate(raw):
        if r.problem is None:
            files.setdefault(r.image_id, {}).setdefault(os.path.normcase(os.path.abspath(r.path)), i)
    owner = {k: next(iter(v.values())) for k, v in files.items() if len(v) == 1}
    ambiguous = {k: len(v) for k, v in files.items() if len(v) > 1}
    for i, r in enumerate(raw):
        if r.problem is None and owner.get(r.image_id) != i:
            r.problem = "duplicate_image_id"
    return owner, ambiguous
