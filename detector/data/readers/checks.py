"""Bad-input checks, run once when a dataset is built, and the report of what they found.

Every reader (see ``detector.data.readers.formats``) passes its parsed annotations through these
checks. Each kind of problem is counted; what happens to the item is fixed per kind:

    kind                  item                                          strict=True
    missing_file          image skipped (or VOC XML missing)            DataError
    unreadable_image      image skipped: not an image / corrupt header   DataError
    truncated_image       image skipped: file ends early / undecodable   DataError
    corrupt_image         image skipped: the JPEG decoder reported       DataError
                          corrupt data (``verify="decode"`` only)
    size_mismatch         image skipped: annotation's (h, w) != file's   DataError
    duplicate_image_id    COCO id listed twice: a repeated entry of the  DataError
                          same file is skipped; if the files differ,
                          every entry of the id is skipped
    ambiguous_annotation  annotation of such an id (which file?) dropped DataError
    duplicate_file        kept: the same file under two ids / listings   DataError
    bad_annotation        unparsable line / object / bbox dropped        DataError
    orphan_label          YOLO label file that no image of the split     DataError
                          claims: ignored
    box_nonfinite         box with NaN/inf coordinate dropped            DataError
    class_out_of_range    box whose class is not in [0, C) dropped       DataError
    box_empty             box with width or height <= 0 dropped          DataError
    box_outside           box with no overlap with the image dropped     DataError
    -- benign: counted, never an error, never warned about on their own --
    box_clipped         box clipped to [0, w] x [0, h]
    grayscale           channel replicated to RGB
    alpha               alpha channel dropped (colour kept as stored, not composited)
    high_bit_depth      16-bit (or 32-bit) samples reduced to 8 bit as ``v >> 8``
    other_mode          palette / CMYK / ... converted to RGB
    exif_orientation    image turned upright by its EXIF orientation tag (see ``Header``)
    no_boxes            image kept as a negative (background-only) sample
    crowd               COCO ``iscrowd`` annotation left out
    difficult           VOC ``difficult`` object left out
    -- at load time --
    load_failed           item replaced by the next readable one         DataError
                          (see ``DetectionSource``)

A split where no image is usable is an error whatever ``strict`` says (almost always a wrong
path). A split whose kept images hold no box at all (every image a negative: usually labels
that were not found or not matched to the class list) is warned about, and is an error under
``strict``. Without ``strict``, non-benign problems give one ``UserWarning`` with the counts and
the first ``max_examples`` examples; benign counts alone are only logged (``logging.INFO``).
Each process that builds the dataset (e.g. each DDP rank) checks and warns for itself. Every
error about the data is a ``DataError`` (a ``ValueError``; ``DataNotFoundError`` is also a
``FileNotFoundError``), so the command line reports it in one line whichever split it is in.

Truncation is detected affordably: a JPEG must end with its EOI marker and a PNG with its
IEND chunk (two small reads at the end of the file); only files failing that are fully
decoded to confirm (trailing bytes after the marker are harmless). ``verify="decode"``
fully decodes every image once instead, in a thread pool; JPEGs are then decoded by
libjpeg-turbo through ``simplejpeg`` with ``strict=True``, which turns libjpeg's *warnings*
("Corrupt JPEG data: premature end of data segment", "N extraneous bytes before marker", "bad
Huffman code") into errors: libjpeg treats damaged scan data as recoverable, fills what it
cannot decode with grey and only prints the warning on stderr, and neither PIL (whose JPEG
decoder discards libjpeg's warnings) nor OpenCV (which prints them, without the file name)
lets a caller see it. Such files are counted as ``corrupt_image``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
Verify = Literal["header", "decode"]

PROBLEMS: dict[str, str] = {
    "missing_file": "file not found (image skipped)",
    "unreadable_image": "not a readable image (image skipped)",
    "truncated_image": "image file truncated or undecodable (image skipped)",
    "corrupt_image": "the decoder reported corrupt image data (image skipped)",
    "size_mismatch": "annotated size differs from the image file (image skipped)",
    "duplicate_image_id": "image id listed twice (skipped; every entry of the id when their files differ)",
    "ambiguous_annotation": "annotation of an image id listed for different files (dropped)",
    "duplicate_file": "same image file listed twice (kept)",
    "bad_annotation": "annotation could not be parsed (dropped)",
    "orphan_label": "label file without an image in the split (ignored)",
    "box_nonfinite": "box with NaN/inf coordinates (dropped)",
    "class_out_of_range": "class not in the class list (box dropped)",
    "box_empty": "box with zero or negative width/height (dropped)",
    "box_outside": "box entirely outside the image (dropped)",
    "load_failed": "image failed to decode at load time (replaced by the next item)",
}
NO_BOXES = "no box in any image: every image is a negative (check the label files and the class list)"


class DataError(ValueError):
    """Bad input: a dataset that cannot be used as given (missing or unparsable files, or what the
    checks found under ``strict``). The message is the whole report; the CLI prints it as it is."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file or folder of the dataset is missing (also a ``FileNotFoundError``)."""


def data_error_message(err: BaseException) -> str:
    """The message of ``err`` without the traceback that a DataLoader worker wraps around it."""
    text = str(err)
    if "Original Traceback" in text:  # re-raised from a worker: the original message ends the traceback
        text = text.rsplit(f"{type(err).__name__}: ", 1)[-1]
    return text.strip()


BENIGN: dict[str, str] = {
    "box_clipped": "boxes clipped to the image",
    "grayscale": "grayscale images converted to RGB",
    "alpha": "alpha channels dropped",
    "high_bit_depth": "16/32-bit images reduced to 8 bit",
    "other_mode": "palette/CMYK images converted to RGB",
    "exif_orientation": "images turned upright by their EXIF orientation",
    "no_boxes": "images without boxes (kept as negatives)",
    "crowd": "COCO crowd annotations left out",
    "difficult": "VOC difficult objects left out",
}


@dataclass
class CheckReport:
    """Counts per kind of problem (``PROBLEMS`` and ``BENIGN``), with the first few examples.

    ``examples`` holds up to ``max_examples`` ``(where, kind)`` pairs of non-benign problems;
    ``where`` is a file name, possibly with a line or annotation number.
    """

    name: str = "dataset"
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    images_listed: int = 0
    images_kept: int = 0
    boxes_kept: int = 0

    def add(self, kind: str, where: str | Path, n: int = 1) -> None:
        """Count ``n`` occurrences of ``kind`` (a key of ``PROBLEMS`` or ``BENIGN``) at ``where``."""
        if kind not in PROBLEMS and kind not in BENIGN:
            raise KeyError(f"unknown check kind {kind!r}")
        if n <= 0:
            return
        self.counts[kind] += int(n)
        if kind in PROBLEMS and len(self.examples) < self.max_examples:
            self.examples.append((str(where), kind))

    @property
    def problems(self) -> dict[str, int]:
        """Non-benign counts (the ones ``strict=True`` turns into an error)."""
        return {k: self.counts[k] for k in PROBLEMS if self.counts[k]}

    @property
    def benign(self) -> dict[str, int]:
        """Counts of the ``BENIGN`` kinds (repairs and conversions that are only logged), zeros left out."""
        return {k: self.counts[k] for k in BENIGN if self.counts[k]}

    def summary(self) -> str:
        """Counts, benign counts and examples in a few lines."""
        kept = f"{self.images_kept} of {self.images_listed} images kept"
        lines = [f"{self.name}: {kept}; problems: " + (_fmt(self.problems) or "none")]
        if self.empty:
            lines.append(f"  {NO_BOXES}")
        if self.benign:
            lines.append("  benign: " + _fmt(self.benign))
        lines += [f"  e.g. {where}: {kind} - {PROBLEMS[kind]}" for where, kind in self.examples]
        return "\n".join(lines)

    @property
    def empty(self) -> bool:
        """Images were kept, but none of them holds a box (an all-background split)."""
        return bool(self.images_kept) and not self.boxes_kept

    def finish(self, strict: bool) -> None:
        """Raise (``strict``, or nothing usable) or warn once if there are problems or no box at all;
        log the benign counts."""
        if self.images_listed and not self.images_kept:
            raise DataError(f"no usable image (check the paths): {self.summary()}")
        if (self.problems or self.empty) and strict:
            raise DataError(f"bad input (strict=True): {self.summary()}")
        if self.problems or self.empty:
            warnings.warn(
                f"bad input skipped or repaired (strict=True makes it an error): {self.summary()}", stacklevel=4
            )
        elif self.benign:
            log.info(self.summary())


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


@dataclass(frozen=True)
class Header:
    """What the file header says: the upright size and the conversions the loader will apply.

    ``height``/``width`` are after the EXIF ``orientation`` (1 = none; 5-8 swap the sides), as
    cv2, mmdetection, Detectron2 and Ultralytics load images; ``stored`` is the (h, w) as stored.
    """

    height: int
    width: int
    kinds: tuple[str, ...] = ()
    orientation: int = 1

    @property
    def stored(self) -> tuple[int, int]:
        """``(h, w)`` as stored in the file: the upright sides swapped back for EXIF orientations 5-8."""
        return (self.width, self.height) if self.orientation in (5, 6, 7, 8) else (self.height, self.width)


def mode_kinds(mode: str, rawmode: str = "") -> tuple[str, ...]:
    """Benign conversion kinds for a PIL ``mode`` (and PNG tile ``rawmode``, e.g. ``RGB;16B``)."""
    kinds = []
    if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;"):
        kinds.append("grayscale")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        kinds.append("alpha")
    if mode in ("I", "F") or mode.startswith("I;") or ";16" in rawmode:
        kinds.append("high_bit_depth")
    if not kinds and mode != "RGB":
        kinds.append("other_mode")
    return tuple(kinds)


@dataclass(frozen=True)
class Problem:
    """Why an image is unusable: its ``kind`` (a ``PROBLEMS`` key) and what the decoder said, if anything."""

    kind: str
    detail: str = ""


def probe_image(path: Path, verify: Verify = "header") -> Header | Problem:
    """Header of ``path``, or why it is unusable (``missing_file`` / ``unreadable_image`` /
    ``truncated_image`` / ``corrupt_image``; the last one only with ``verify="decode"``)."""
    if not path.is_file():
        return Problem("missing_file")
    try:
        with Image.open(path) as im:
            w, h, fmt, mode = im.width, im.height, im.format, im.mode
            rawmode = im.tile[0][3] if im.tile and isinstance(im.tile[0][3], str) else ""  # e.g. "RGB;16B"
            orientation = _orientation(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return Problem("unreadable_image")
    if verify == "decode" or not _tail_ok(path, fmt):
        problem = _decode_problem(path, fmt)
        if problem is not None:
            return problem
    kinds = mode_kinds(mode, rawmode) + (("exif_orientation",) if orientation != 1 else ())
    return Header(w, h, kinds, orientation) if orientation in (5, 6, 7, 8) else Header(h, w, kinds, orientation)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable), without decoding the pixels."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL's PNG getexif() would decode the whole image to look for a late eXIf chunk
    try:
        value = int(im.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return 1
    return value if 1 <= value <= 8 else 1


def _tail_ok(path: Path, fmt: str | None) -> bool:
    """JPEG ends with EOI (FF D9), PNG with the IEND chunk; other formats are not checked here."""
    tail = {"JPEG": (2, b"\xff\xd9"), "MPO": (2, b"\xff\xd9"), "PNG": (8, b"IEND\xaeB`\x82")}.get(fmt or "")
    if tail is None:
        return True
    n, marker = tail
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - n, 0))
        return f.read(n) == marker


def _decode_problem(path: Path, fmt: str | None) -> Problem | None:
    """Decode ``path`` fully: ``truncated_image`` if it does not decode or a JPEG lacks its end,
    ``corrupt_image`` for a complete JPEG that libjpeg decodes only with a warning (damaged scan
    data, filled with grey)."""
    if fmt in ("JPEG", "MPO"):
        clean, warning = _jpeg_decode(path.read_bytes())
        if clean:
            return None
        if warning is not None:
            return Problem("corrupt_image", warning) if _tail_ok(path, fmt) else Problem("truncated_image")
    return None if _decodes(path) else Problem("truncated_image")


def _jpeg_decode(data: bytes) -> tuple[bool, str | None]:
    """``(True, None)``: JPEG ``data`` decodes without a warning; ``(False, warning)``: it decodes
    only when libjpeg's warnings are tolerated; ``(False, None)``: it does not decode at all here.

    ``simplejpeg.decode_jpeg(strict=True)`` raises ``ValueError`` on libjpeg's warnings as well as
    on its errors; a file that then decodes with ``strict=False`` had warnings only.
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]  # (height, width, colorspace, subsampling)
    except ValueError:
        return False, None
    out = "CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY" if colorspace == "Gray" else "RGB"
    try:
        simplejpeg.decode_jpeg(data, colorspace=out, strict=True)
        return True, None
    except ValueError as e:
        warning = str(e)
    try:
        simplejpeg.decode_jpeg(data, colorspace=out, strict=False)
    except ValueError:
        return False, None
    return False, warning


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` in a thread pool (file reads and PIL/cv2 decodes release the GIL)."""
    items = list(items)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items, chunksize=64))


def check_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int], num_classes: int, report: CheckReport, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Drop bad boxes and clip the rest to the image, counting each kind once per box.

    Args:
        boxes: float (N, 4) xyxy pixels, possibly NaN/inf, empty or outside the image.
        labels: int (N,) class labels; outside ``[0, num_classes)`` means unknown.
        size: (h, w) of the image.
    Returns:
        float32 (M, 4) boxes inside ``[0, w] x [0, h]`` with positive area, int64 (M,) labels.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)  # (N, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)  # (N,)
    h, w = size
    finite = np.isfinite(boxes).all(1)
    known = finite & (labels >= 0) & (labels < num_classes)
    positive = known & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = np.clip(np.nan_to_num(boxes), 0.0, [w, h, w, h])  # (N, 4)
    inside = positive & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    report.add("box_nonfinite", where, int((~finite).sum()))
    report.add("class_out_of_range", where, int((finite & ~known).sum()))
    report.add("box_empty", where, int((known & ~positive).sum()))
    report.add("box_outside", where, int((positive & ~inside).sum()))
    report.add("box_clipped", where, int((inside & (clipped != boxes).any(1)).sum()))
    return clipped[inside].astype(np.float32).reshape(-1, 4), labels[inside]


def load_rgb(path: Path, exif: bool = True) -> np.ndarray:
    """Decode ``path`` to uint8 (H, W, 3) RGB: gray replicated, alpha dropped, 16-bit as ``v >> 8``,
    turned upright by its EXIF orientation unless ``exif=False``. Raises ``FileNotFoundError``/``OSError``.
    """
    flags = cv2.IMREAD_COLOR | (0 if exif else cv2.IMREAD_IGNORE_ORIENTATION)
    image = cv2.imread(str(path), flags)  # (H, W, 3) BGR uint8
    if image is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image not found or unreadable: {path}")
        raise OSError(f"image not found or unreadable: {path} (could not be decoded)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
