"""The embedded default dataset: coloured shapes on textured backgrounds, in COCO format.

``ensure_shapes(root, cfg)`` writes

    <root>/train/000000.jpg ...          # images, width and height each in [min_size, max_size]
    <root>/val/000000.jpg ...
    <root>/annotations/{train,val}.json  # COCO: images, annotations (xywh), categories
    <root>/shapes.json                   # the config it was generated with (written last)

The class is the shape, never the colour. Category ids are deliberately non-contiguous
(1, 2, 3, 5, 8) so that every reader exercises the id -> label mapping. Boxes are the
full geometric extent of each shape (pixel-edge convention, as COCO), even where a later
shape covers part of it; occlusion is kept mild by rejecting placements that would hide
more than ``MAX_COVERED`` of an earlier box. Generation is deterministic: each image has
its own ``numpy`` Generator seeded by (seed, split, index), so the same config gives
byte-identical JSON and identical pixels, and growing ``num_train`` keeps earlier images.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

SHAPES_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "cross", "star")
SHAPES_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 5, 8)  # non-contiguous on purpose
GENERATOR_VERSION = 2  # bump when the drawing code changes, so stored datasets regenerate
MAX_OBJECTS = 6  # objects per image: 0..MAX_OBJECTS
EMPTY_FRACTION = 0.05  # share of images with no object at all
MIN_OBJECT = 20.0  # smallest object extent in pixels (≥ 15 px after letterboxing to 320)
MAX_OBJECT_FRACTION = 0.6  # largest object extent as a fraction of the shorter image side
MAX_COVERED = 0.3  # a new box may cover at most this fraction of an earlier box
MIN_CONTRAST = 90.0  # min RGB distance between an object colour and the background under it
SUBPIXEL = 4  # cv2 fixed-point bits: points are drawn with 1/16 px precision
SUPERSAMPLE = 4  # anti-aliasing: coverage is measured on a 4x finer grid


@dataclass
class ShapesConfig:
    """What to generate; stored as ``<root>/shapes.json`` and compared on every call."""

    num_train: int = 800  # ~10 min of CPU training reaches mAP@50 >= 0.8 with a tiny model
    num_val: int = 200  # enough for a stable mAP, fast to evaluate every epoch
    seed: int = 0  # same seed -> byte-identical annotations and pixels
    min_size: int = 256  # image width and height are each drawn from [min_size, max_size]
    max_size: int = 416  # non-square images exercise the letterbox


# checkpoints of a datamodule built with ShapesConfig(...) in Python load with weights_only=True
torch.serialization.add_safe_globals([ShapesConfig])


def ensure_shapes(root: str | Path, cfg: ShapesConfig) -> Path:
    """Generate the dataset under ``root`` unless it is there with the same config.

    Safe when several processes (DDP ranks, dataloader workers) call it at once: each
    generates into a private temp dir next to ``root`` and renames it into place; a
    loser of the race uses the winner's copy (identical, since generation is deterministic).
    """
    _check_config(cfg)
    root = Path(root)
    wanted = _stored_config(cfg)
    if _read_stored(root) == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, cfg)
        (tmp / "shapes.json").write_text(json.dumps(wanted, indent=1, sort_keys=True))
        _install(tmp, root, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_config(cfg: ShapesConfig) -> None:
    if cfg.num_train < 0 or cfg.num_val < 0:
        raise ValueError(f"ShapesConfig: num_train and num_val must be >= 0, got {cfg.num_train}, {cfg.num_val}")
    if not 64 <= cfg.min_size <= cfg.max_size:
        raise ValueError(f"ShapesConfig: need 64 <= min_size <= max_size, got {cfg.min_size}, {cfg.max_size}")


def _stored_config(cfg: ShapesConfig) -> dict:
    return {**asdict(cfg), "generator_version": GENERATOR_VERSION}


def _read_stored(root: Path) -> dict | None:
    try:
        return json.loads((root / "shapes.json").read_text())
    except (OSError, ValueError):
        return None


def _install(tmp: Path, root: Path, wanted: dict) -> None:
    """Atomically move ``tmp`` to ``root``; a stale ``root`` is moved aside first."""
    if root.exists() and _read_stored(root) != wanted:
        trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(root, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process installed first (rename onto a non-empty dir fails)
        if _read_stored(root) != wanted:
            raise


def _generate(out: Path, cfg: ShapesConfig) -> None:
    (out / "annotations").mkdir(parents=True)
    for split_index, (split, count) in enumerate((("train", cfg.num_train), ("val", cfg.num_val))):
        (out / split).mkdir()
        images: list[dict] = []
        annotations: list[dict] = []
        for i in range(count):
            rng = np.random.default_rng([cfg.seed, split_index, i])
            image, objects = draw_image(rng, cfg.min_size, cfg.max_size)
            name = f"{i:06d}.jpg"
            if not cv2.imwrite(str(out / split / name), image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
                raise OSError(f"could not write {out / split / name}")
            images.append({"id": i + 1, "file_name": name, "width": image.shape[1], "height": image.shape[0]})
            for label, box, area in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": SHAPES_CATEGORY_IDS[label],
                        "bbox": [round(float(v), 2) for v in box],
                        "area": round(float(area), 2),
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": c, "name": n, "supercategory": "shape"} for c, n in zip(SHAPES_CATEGORY_IDS, SHAPES_CLASSES)
        ]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (out / "annotations" / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))


def draw_image(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[np.ndarray, list]:
    """One image (uint8 HxWx3) and its objects as ``(label, xywh box, polygon area)``."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = _background(rng, h, w)
    n = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    objects: list[tuple[int, list[float], float]] = []
    boxes: list[list[float]] = []
    for _ in range(n):
        label = int(rng.integers(len(SHAPES_CLASSES)))
        placed = _place(rng, _shape_points(rng, label, h, w), boxes, h, w)
        if placed is None:
            continue
        pts, box = placed
        colour = _contrasting_colour(rng, image, box)
        fill_polygon(image, pts, colour)
        boxes.append(box)
        objects.append((label, box, _polygon_area(pts)))
    noise = rng.standard_normal(size=(h, w, 1), dtype=np.float32) * rng.uniform(2.0, 8.0)  # luminance noise
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, objects


def fill_polygon(image: np.ndarray, pts: np.ndarray, colour: list[float]) -> None:
    """Anti-aliased fill of polygon ``pts`` (K, 2) in pixel-edge coordinates (pixel i spans [i, i+1)).

    Coverage is measured on a SUPERSAMPLE x finer grid inside the polygon's box, so edge
    pixels are blended by the fraction they are covered and the box stays tight
    (cv2's own LINE_AA fill spreads about 0.7 px beyond the polygon).
    """
    h, w = image.shape[:2]
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    k = SUPERSAMPLE
    mask = np.zeros(((y1 - y0) * k, (x1 - x0) * k), np.uint8)
    local = (pts - (x0, y0)) * k - 0.5  # cv2 puts (sub)pixel centres on integers
    cv2.fillPoly(mask, [np.round(local * (1 << SUBPIXEL)).astype(np.int32)], 255, cv2.LINE_8, shift=SUBPIXEL)
    alpha = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)[..., None] / 255
    crop = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = np.round(crop + (np.asarray(colour, np.float32) - crop) * alpha).astype(image.dtype)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear gradient between two muted colours, thin lines and soft blobs."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = np.arange(w, dtype=np.float32)[None] * np.cos(angle) + np.arange(h, dtype=np.float32)[:, None] * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    image = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)  # (H, W, 3)
    lo_h, lo_w = h // 8, w // 8  # soft blobs: drawn and blurred at 1/8 resolution, then upsampled
    blobs = np.zeros((lo_h, lo_w, 3), np.float32)
    alpha = np.zeros((lo_h, lo_w), np.float32)
    for _ in range(int(rng.integers(1, 5))):
        centre = (int(rng.integers(lo_w)), int(rng.integers(lo_h)))
        axes = (int(rng.integers(lo_w // 10 + 1, lo_w // 3)), int(rng.integers(lo_h // 10 + 1, lo_h // 3)))
        cv2.ellipse(blobs, centre, axes, 0, 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
        cv2.ellipse(alpha, centre, axes, 0, 0, 360, 0.45, -1)
    big_blobs = cv2.resize(cv2.GaussianBlur(blobs, (0, 0), sigmaX=lo_w / 20), (w, h))
    big_alpha = cv2.resize(cv2.GaussianBlur(alpha, (0, 0), sigmaX=lo_w / 20), (w, h))[..., None]
    image = image * (1 - big_alpha) + big_blobs * big_alpha
    for _ in range(int(rng.integers(2, 8))):
        p0 = (int(rng.integers(w)), int(rng.integers(h)))
        p1 = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.line(image, p0, p1, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_points(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """Polygon (K, 2) of the shape, centred at 0, largest extent log-uniform in [MIN_OBJECT, 0.6 min(h, w)]."""
    name = SHAPES_CLASSES[label]
    if name == "circle":  # ellipse of any orientation
        a = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        pts, aspect, rot = np.stack([np.cos(a), np.sin(a)], 1), np.exp(rng.uniform(-0.7, 0.7)), np.pi
    elif name == "rectangle":  # elongated up to 3.5:1, mildly rotated
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
        aspect, rot = np.exp(rng.uniform(-1.25, 1.25)), np.radians(20)
    elif name == "triangle":  # isosceles to scalene, any orientation
        pts = np.array([[rng.uniform(-0.6, 0.6), -1], [1, 1], [-1, 1]], float)
        aspect, rot = np.exp(rng.uniform(-0.45, 0.45)), np.pi
    elif name == "cross":  # plus sign, arm thickness 30-50 % of its length
        t = rng.uniform(0.3, 0.5)
        q = np.array([[t, -1], [t, -t], [1, -t]])
        pts = np.concatenate([q @ np.array([[c, s], [-s, c]]) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))])
        aspect, rot = np.exp(rng.uniform(-0.35, 0.35)), np.radians(20)
    else:  # five-pointed star
        a = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.55))
        pts, aspect, rot = np.stack([r * np.cos(a), r * np.sin(a)], 1), np.exp(rng.uniform(-0.2, 0.2)), np.pi
    pts = pts * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    theta = rng.uniform(-rot, rot)
    c, s = np.cos(theta), np.sin(theta)
    pts = pts @ np.array([[c, s], [-s, c]])
    largest = np.exp(rng.uniform(np.log(MIN_OBJECT), np.log(MAX_OBJECT_FRACTION * min(h, w))))
    return pts * (largest / (pts.max(0) - pts.min(0)).max())


def _place(rng: np.random.Generator, pts: np.ndarray, boxes: list, h: int, w: int, tries: int = 20):
    """Shift ``pts`` to a random spot inside the image hiding at most MAX_COVERED of earlier boxes."""
    pts = pts - pts.min(0)
    bw, bh = pts.max(0)
    for _ in range(tries):
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        if all(_covered((x0, y0, bw, bh), b) <= MAX_COVERED for b in boxes):
            return pts + (x0, y0), (x0, y0, bw, bh)
    return None


def _covered(new: tuple, old: tuple) -> float:
    """Fraction of box ``old`` (xywh) inside box ``new`` (xywh)."""
    iw = min(new[0] + new[2], old[0] + old[2]) - max(new[0], old[0])
    ih = min(new[1] + new[3], old[1] + old[3]) - max(new[1], old[1])
    return max(iw, 0.0) * max(ih, 0.0) / (old[2] * old[3])


def _contrasting_colour(rng: np.random.Generator, image: np.ndarray, box: tuple) -> list[float]:
    """A random colour at least MIN_CONTRAST away from the mean background under ``box``."""
    x0, y0, bw, bh = (int(v) for v in box)
    under = image[y0 : y0 + max(bh, 1), x0 : x0 + max(bw, 1)].reshape(-1, 3).mean(0)
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, 3)
    else:  # fall back to the far corner of the colour cube
        colour = np.where(under < 128, 255.0, 0.0)
    return colour.tolist()


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
