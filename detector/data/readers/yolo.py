"""A YOLO-txt detection dataset (Ultralytics layout) -> checked samples.

The dataset YAML, as Ultralytics writes it::

    path: ../datasets/coco8     # dataset root; relative = relative to this YAML's folder; absent = that folder
    train: images/train         # per split: a folder (searched recursively), a .txt file listing
    val: images/val             #   image paths (relative lines: relative to the .txt's folder), or a list of these
    test:                       # optional
    names: [person, bicycle]    # or {0: person, 1: bicycle}; optional nc must equal len(names)

The label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt`` (the last ``/images/``
replaced by ``/labels/``, the extension by ``.txt``). Each line is ``class cx cy w h``, all but
the class normalised to [0, 1] by the image width/height; a line ``class x1 y1 x2 y2 ...``
(a segment, >= 3 points) becomes its bounding box. An image without a label file, or with an
empty one, has no boxes. A label file in the label folder of a split's image folder that no
image of the split claims (its image is gone, or has a suffix outside ``base.IMAGE_SUFFIXES``) is
counted as ``orphan_label`` (``classes.txt``, the class list some tools write there, excepted).
``category_ids[label] = label``. Image ids are the file stems when they are distinct integers,
else positions in the split's sorted list (``base.stem_ids``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detector.data.readers.base import IMAGE_SUFFIXES, DetectionSource, RawImage, index_ids, stem_ids
from detector.data.readers.checks import DataError, DataNotFoundError, Verify, parallel_map


def load_yolo_yaml(path: str | Path) -> dict[str, Any]:
    """Read a dataset YAML; ``names`` becomes a list and ``path`` an absolute root folder."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"YOLO dataset YAML not found: {path} (pass the file with train/val/names)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"YOLO dataset YAML does not parse: {path} ({e})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"YOLO dataset YAML {path} lacks 'names' (a list, or a dict {{id: name}})")
    names = data["names"]
    if isinstance(names, dict):
        if sorted(int(k) for k in names) != list(range(len(names))):
            raise DataError(f"{path}: names keys must be 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: names must be a non-empty list or dict, got {data['names']!r}")
    if "nc" in data and int(data["nc"]) != len(names):
        raise DataError(f"{path}: nc={data['nc']} but names has {len(names)} entries")
    root = Path(data.get("path") or ".")
    return {**data, "names": [str(n) for n in names], "path": root if root.is_absolute() else path.parent / root}


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (the last ``/images/`` only)."""
    head, sep, tail = str(image).rpartition(f"{os.sep}images{os.sep}")
    return Path(f"{head}{os.sep}labels{os.sep}{tail}" if sep else str(image)).with_suffix(".txt")


def split_images(root: Path, spec: str | list[str], source: str) -> list[Path]:
    """Image files of one split: folders are searched recursively (sorted), .txt lists keep their order."""
    out: list[Path] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        p = root / str(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file() and p.suffix == ".txt":
            lines = (ln.strip() for ln in p.read_text().splitlines())
            out += [p.parent / ln for ln in lines if ln]
        else:
            raise DataNotFoundError(f"{source}: split entry {item!r} is neither a folder nor a .txt list under {root}")
    return out


def orphan_labels(root: Path, spec: str | list[str], images: list[Path]) -> list[Path]:
    """Label files that no image of the split claims, in the label folders of the split's image folders.

    Only folders of the ``images/ -> labels/`` layout are searched (``.txt`` lists may share label
    folders with other splits; labels stored beside their images may sit among other text files).
    """
    claimed = {label_path(p) for p in images}
    orphans: list[Path] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        folder = root / str(item)
        labels = label_path(folder / "x").parent
        if folder.is_dir() and labels != folder and labels.is_dir():
            found = labels.rglob("*.txt")
            orphans += sorted(f for f in found if f not in claimed and f.name != "classes.txt" and f.is_file())
    return orphans


def parse_label_file(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Normalised xyxy float64 (N, 4), class ids int64 (N,) and the unparsable lines' names.

    No file: no boxes. Class ids are not range-checked here (``check_boxes`` does that).
    """
    if not path.is_file():
        return np.zeros((0, 4)), np.zeros(0, np.int64), []
    boxes, labels, bad = [], [], []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return np.zeros((0, 4)), np.zeros(0, np.int64), [f"{path.name} (not a text file)"]
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        if not values or not values[0].is_integer() or not (len(values) == 5 or (len(values) >= 7 and len(values) % 2)):
            bad.append(f"{path.name} line {n}")
            continue
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            boxes.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        else:
            xy = np.array(values[1:]).reshape(-1, 2)  # (P, 2) segment points
            boxes.append((*xy.min(0), *xy.max(0)))
        labels.append(int(values[0]))
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(labels, np.int64), bad


class YoloDetection(DetectionSource):
    """Detection samples of one split of a YOLO-txt dataset (contract: ``detector.data.readers.formats``).

    Args:
        data: the dataset YAML.
        split: its key naming the split (``train``, ``val``, ``test``).
        class_names: the training split's names; must equal the YAML's (the label is the index).
        category_ids: must be ``0 .. C-1`` if given.
        strict, verify, max_examples, workers: as for ``CocoDetection``.
    """

    def __init__(
        self,
        data: str | Path,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        *,
        strict: bool = False,
        verify: Verify = "header",
        max_examples: int = 5,
        workers: int | None = None,
    ):
        self.data = Path(data)
        super().__init__(
            f"{self.data} [{split}]", strict=strict, verify=verify, max_examples=max_examples, workers=workers
        )
        cfg = load_yolo_yaml(self.data)
        if class_names is not None and list(class_names) != cfg["names"]:
            raise DataError(f"{self.data}: names {cfg['names']} differ from the training split's {list(class_names)}")
        self.class_names, self.category_ids = index_ids(cfg["names"], class_names, category_ids, str(self.data))
        if not cfg.get(split):
            raise DataError(
                f"{self.data} has no split {split!r} (keys: {[k for k in cfg if k not in ('path', 'names', 'nc')]})"
            )
        images = split_images(cfg["path"], cfg[split], str(self.data))
        self.root = Path(cfg["path"])
        annotations = parallel_map(lambda p: parse_label_file(label_path(p)), images, workers)
        ids = stem_ids([p.stem for p in images])
        for orphan in orphan_labels(self.root, cfg[split], images):
            self.report.add("orphan_label", _short(orphan, self.root))
        raw = []
        for p, i, (boxes, labels, bad) in zip(images, ids, annotations):
            for where in bad:
                self.report.add("bad_annotation", where)
            raw.append(RawImage(p, i, boxes, labels, name=_short(p, self.root), normalized=True))
        self._build(raw)


def _short(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
