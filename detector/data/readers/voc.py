"""A Pascal VOC detection dataset -> checked samples.

Layout (one year folder of ``VOCdevkit``, or any folder laid out the same way)::

    VOC2007/Annotations/000005.xml        # <filename>, <size>, <object><name>, <difficult>, <bndbox>
    VOC2007/JPEGImages/000005.jpg
    VOC2007/ImageSets/Main/train.txt      # one image id per line; the split name is the file stem

The image of id ``x`` is ``JPEGImages/x.jpg``, or the XML's ``<filename>`` when that file is
not there. ``bndbox`` holds 1-based inclusive pixel indices; as in Detectron2 they become
pixel-edge coordinates ``(xmin - 1, ymin - 1, xmax, ymax)``, so a box covering the whole
W x H image is ``[0, 0, W, H]``. Class names are the sorted distinct ``<name>``s of the split's
XMLs, or given (``class_names``; the training split's for val/test), and
``category_ids[label] = label``. Objects marked ``difficult`` are left out of the boxes
(counted as ``difficult``), for training and evaluation alike, as mmdetection does by
default; unlike VOC's official metric, which ignores them, a detection of one then counts as a
false positive, so mAP is slightly conservative. ``keep_difficult=True`` keeps them as
ordinary boxes. Image ids: ``stem_ids`` of the split's ids (``2008_000123`` -> 2008000123).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.data.readers.base import DetectionSource, RawImage, index_ids, stem_ids
from detector.data.readers.checks import DataNotFoundError, Verify, parallel_map


@dataclass
class VocRecord:
    """One parsed XML: objects as (name, difficult, (x0, y0, x1, y1) pixel edges)."""

    filename: str | None = None
    size: tuple[int, int] | None = None  # (h, w), None when absent
    objects: list[tuple[str, bool, tuple[float, float, float, float]]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # unparsable objects
    problem: str | None = None  # missing_file / bad_annotation: the whole image is skipped


def parse_voc_xml(path: Path) -> VocRecord:
    """Read one annotation XML; never raises for a bad file (the problem is recorded instead)."""
    if not path.is_file():
        return VocRecord(problem="missing_file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return VocRecord(problem="bad_annotation")
    rec = VocRecord(filename=root.findtext("filename"))
    try:
        rec.size = (int(float(root.findtext("size/height", "0"))), int(float(root.findtext("size/width", "0"))))
    except ValueError:
        rec.size = None
    for k, obj in enumerate(root.iter("object")):
        try:
            name = (obj.findtext("name") or "").strip()
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}", "")) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(float(obj.findtext("difficult", "0") or 0)) == 1
        except ValueError:
            name = ""
        if not name:
            rec.bad.append(f"{path.name} object {k}")
            continue
        rec.objects.append((name, difficult, (xmin - 1, ymin - 1, xmax, ymax)))
    return rec


class VocDetection(DetectionSource):
    """Detection samples of one Pascal VOC split (contract: ``detector.data.readers.formats``).

    Args:
        root: the folder holding ``Annotations``, ``JPEGImages`` and ``ImageSets/Main``.
        split: ``ImageSets/Main/<split>.txt`` (``train``, ``val``, ``trainval``, ``test``).
        class_names: the class list (default: sorted ``<name>``s of this split); an object of
            another class counts as ``class_out_of_range``.
        category_ids: must be ``0 .. C-1`` if given.
        images, annotations: other folders than ``JPEGImages`` / ``Annotations`` (relative to root).
        keep_difficult: keep ``difficult`` objects as boxes.
        strict, verify, max_examples, workers: as for ``CocoDetection``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        *,
        images: str | Path = "JPEGImages",
        annotations: str | Path = "Annotations",
        keep_difficult: bool = False,
        strict: bool = False,
        verify: Verify = "header",
        max_examples: int = 5,
        workers: int | None = None,
    ):
        self.root = Path(root)
        ids_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        super().__init__(str(ids_file), strict=strict, verify=verify, max_examples=max_examples, workers=workers)
        if not ids_file.is_file():
            raise DataNotFoundError(f"VOC split list not found: {ids_file} (check data root and split name)")
        self.images_dir, self.annotations_dir = self.root / images, self.root / annotations
        if not self.annotations_dir.is_dir():
            raise DataNotFoundError(f"VOC annotation folder not found: {self.annotations_dir}")
        ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
        records = parallel_map(lambda i: parse_voc_xml(self.annotations_dir / f"{i}.xml"), ids, workers)
        found = sorted({name for rec in records for name, _, _ in rec.objects})
        self.class_names, self.category_ids = index_ids(found, class_names, category_ids, str(ids_file))
        label_of = {n: i for i, n in enumerate(self.class_names)}
        self._build([self._raw(i, k, rec, label_of, keep_difficult) for i, k, rec in zip(ids, stem_ids(ids), records)])

    def _raw(
        self, stem: str, image_id: int, rec: VocRecord, label_of: dict[str, int], keep_difficult: bool
    ) -> RawImage:
        path = self.images_dir / f"{stem}.jpg"
        if rec.filename and not path.is_file():
            path = self.images_dir / rec.filename
        if rec.problem == "missing_file":
            return RawImage(
                path, image_id, np.zeros((0, 4)), np.zeros(0, np.int64), name=f"{stem}.xml", problem=rec.problem
            )
        for where in rec.bad:
            self.report.add("bad_annotation", where)
        kept = [(box, label_of.get(name, -1)) for name, hard, box in rec.objects if keep_difficult or not hard]
        self.report.add("difficult", f"{stem}.xml", len(rec.objects) - len(kept))
        boxes = np.array([b for b, _ in kept], np.float64).reshape(-1, 4)
        labels = np.array([lab for _, lab in kept], np.int64)
        name = f"{stem}.xml" if rec.problem else path.name
        return RawImage(path, image_id, boxes, labels, name=name, size=rec.size, problem=rec.problem)
