"""The embedded shapes generator: determinism, caching, concurrency, valid COCO annotations."""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.data.shapes import SHAPES_CLASSES, ShapesConfig, _shape_points, draw_image, ensure_shapes, fill_polygon

SMALL = ShapesConfig(num_train=8, num_val=4, seed=3, min_size=96, max_size=160)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_same_bytes_and_pixels(tmp_path):
    a, b = ensure_shapes(tmp_path / "a", SMALL), ensure_shapes(tmp_path / "b", SMALL)
    assert _files(a) == _files(b)
    for split in ("train", "val"):
        assert (a / "annotations" / f"{split}.json").read_bytes() == (b / "annotations" / f"{split}.json").read_bytes()
    for rel in _files(a):
        if rel.suffix == ".jpg":
            assert np.array_equal(cv2.imread(str(a / rel)), cv2.imread(str(b / rel))), rel
    other = ensure_shapes(tmp_path / "c", replace(SMALL, seed=4))
    assert (other / "annotations/val.json").read_bytes() != (a / "annotations/val.json").read_bytes()


def test_regenerates_only_when_missing_or_changed(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes(root, SMALL)
    stamp = (root / "shapes.json").stat().st_mtime_ns
    (root / "marker").write_text("kept while the config is unchanged")
    assert ensure_shapes(root, SMALL) == root
    assert (root / "shapes.json").stat().st_mtime_ns == stamp and (root / "marker").exists()

    ensure_shapes(root, replace(SMALL, num_train=5))  # changed config: replaced as a whole
    assert not (root / "marker").exists()
    assert len(list((root / "train").glob("*.jpg"))) == 5
    assert json.loads((root / "shapes.json").read_text())["num_train"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def _ensure(root: str) -> str:
    return str(ensure_shapes(root, SMALL))


def test_concurrent_callers_agree(tmp_path):
    root = tmp_path / "shapes"
    with mp.get_context("fork").Pool(3) as pool:
        assert pool.map(_ensure, [str(root)] * 3) == [str(root)] * 3
    reference = ensure_shapes(tmp_path / "ref", SMALL)
    assert (root / "annotations/train.json").read_bytes() == (reference / "annotations/train.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_annotations_are_valid_coco(tmp_path):
    root = ensure_shapes(tmp_path / "shapes", SMALL)
    for split, count in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        coco = json.loads((root / "annotations" / f"{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPES_CLASSES)
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 5, 8]
        assert len(coco["images"]) == count
        images = {im["id"]: im for im in coco["images"]}
        for im in coco["images"]:
            h, w = cv2.imread(str(root / split / im["file_name"])).shape[:2]
            assert (h, w) == (im["height"], im["width"])
            assert SMALL.min_size <= h <= SMALL.max_size and SMALL.min_size <= w <= SMALL.max_size
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for a in coco["annotations"]:
            x, y, bw, bh = a["bbox"]
            im = images[a["image_id"]]
            assert bw > 0 and bh > 0 and 0 < a["area"] <= bw * bh + 1e-6
            assert x >= 0 and y >= 0 and x + bw <= im["width"] + 0.01 and y + bh <= im["height"] + 0.01
            assert a["category_id"] in {1, 2, 3, 5, 8} and a["iscrowd"] == 0
            assert max(bw, bh) >= 12 - 0.01


def test_object_counts_and_empty_images():
    counts = [len(draw_image(np.random.default_rng([0, 0, i]), 128, 160)[1]) for i in range(120)]
    assert 0 in counts, "about 5 % of images should have no object"
    assert max(counts) <= 6 and np.mean(counts) > 2


@pytest.mark.parametrize("label", range(len(SHAPES_CLASSES)))
def test_boxes_are_tight_to_the_drawn_shape(label):
    rng = np.random.default_rng(label)
    for _ in range(5):
        pts = _shape_points(rng, label, 200, 200)
        pts = pts - pts.min(0) + rng.uniform(5, 30, size=2)
        image = np.zeros((200, 200, 3), np.uint8)
        fill_polygon(image, pts, [255.0, 255.0, 255.0])
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        # pixel i spans [i, i + 1): every pixel at least half covered lies inside the box (+0.25 px
        # rasterisation slack), and some ink reaches within one pixel of each side (box not loose)
        ys, xs = np.nonzero(image[..., 0] >= 128)
        assert xs.min() >= x0 - 0.75 and xs.max() + 1 <= x1 + 0.75, (SHAPES_CLASSES[label], xs.min(), x0)
        assert ys.min() >= y0 - 0.75 and ys.max() + 1 <= y1 + 0.75, (SHAPES_CLASSES[label], ys.min(), y0)
        ys, xs = np.nonzero(image[..., 0] > 0)
        assert xs.min() <= x0 + 1 and xs.max() + 1 >= x1 - 1 and ys.min() <= y0 + 1 and ys.max() + 1 >= y1 - 1


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_size <= max_size"):
        ensure_shapes(tmp_path / "x", replace(SMALL, min_size=300, max_size=200))
