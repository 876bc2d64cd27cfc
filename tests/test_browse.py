"""``python -m detector.browse``: the grid's size and the drawn boxes' pixels against the targets."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.io import read_image

from detector import browse
from detector.data import DetectionDataModule, ShapesConfig, collate
from detector.data.pipeline.samplers import TrainSampler

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96
SMALL = ShapesConfig(num_train=8, num_val=2, seed=4, min_size=80, max_size=150)
COMMON = ["--config", str(ROOT / "configs/default.yaml"), "--data.image_size", str(SIZE), "--data.num_workers", "0"]


def _is(pixel: torch.Tensor, colour: tuple[int, int, int]) -> bool:
    return pixel.tolist() == list(colour)


def test_browse_val_draws_the_known_box_where_the_letterbox_puts_it(tmp_path):
    """One 72 x 120 image with box [10, 6, 50, 26]: letterboxed to 96 (scale 0.8, pad_y 19) the box is
    [8, 23.8, 40, 39.8], drawn on pixels [8, 23] .. [39, 38] of tile 0, which starts at (2, 2)."""
    (tmp_path / "img").mkdir()
    images = [{"id": k + 1, "file_name": f"{k}.png", "height": 72, "width": 120} for k in range(2)]
    for k in range(2):
        cv2.imwrite(str(tmp_path / "img" / f"{k}.png"), np.full((72, 120, 3), 60, np.uint8))
    boxes = [[10, 6, 40, 20], [70, 40, 30, 28]]
    annotations = [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": b} for k, b in enumerate(boxes)]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    files = [f"--data.{s}_{k}={v}" for s in ("train", "val") for k, v in (("images", "img"), ("annotations", "ann.json"))]  # fmt: skip
    args = [*COMMON, "--data.root", str(tmp_path), "--data.embedded", "null", *files, "--split", "val", "--n", "2"]
    out = tmp_path / "grid.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "detector.browse", *args, "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{out}: 2 val samples, 2 boxes; image ids: 1 2"
    grid = read_image(str(out))  # (3, H, W) uint8
    assert grid.shape == (3, SIZE + 4, 2 * (SIZE + 2) + 2)  # one row of two tiles, 2 px gaps
    colour = browse.class_colours(1)[0]
    x0, y0, x1, y1 = 2 + 8, 2 + 23, 2 + 39, 2 + 38  # outermost pixels in grid coordinates
    for y, x in [(y0 + 8, x0), (y0 + 8, x1), (y0, x0 + 20), (y1, x0 + 20), (y1, x1), (y1 - 1, x1 - 1)]:
        assert _is(grid[:, y, x], colour), (y, x, grid[:, y, x])  # the outline, 2 px wide, inward
    for y, x in [(y0 + 8, x0 - 1), (y0 + 8, x1 + 1), (y0 - 1, x0 + 20), (y1 + 1, x0 + 20), (y1 - 3, x1 - 3)]:
        assert _is(grid[:, y, x], (60, 60, 60)), (y, x, grid[:, y, x])  # around it: the gray image
    assert (grid[:, :, SIZE + 2 : SIZE + 4] == 255).all()  # the gap between the tiles


def test_browse_train_draws_every_target_of_the_loader_samples(tmp_path):
    """Mosaic training samples of epoch 0 (recomputed here from TrainSampler and the dataset): every
    target box's left and right outline columns are mostly its class colour in its tile."""
    root = tmp_path / "shapes"
    data = ["--data.root", str(root), "--data.embedded", json.dumps(vars(SMALL)), "--data.mosaic", "1"]
    out = browse.main([*COMMON, *data, "--n", "5", "--out", str(tmp_path / "train.png")])
    grid = read_image(str(out))
    cols, step = 3, SIZE + 2
    assert grid.shape == (3, 2 * step + 2, cols * step + 2)  # 5 tiles: 3 columns, 2 rows
    assert (grid[:, step + 2 :, 2 * step + 2 :] == 255).all()  # the sixth cell is empty

    dm = DetectionDataModule(root=str(root), image_size=SIZE, num_workers=0, mosaic=1.0, seed=0)  # seed_everything 0
    dm.setup("fit")
    keys = list(itertools.islice(TrainSampler(dm.train_set, 1, 0, seed=0, epoch=0), 5))
    _, targets = collate([dm.train_set[k] for k in keys])
    colours = browse.class_colours(dm.num_classes)
    checked = 0
    for k, target in enumerate(targets):
        tile = grid[:, 2 + (k // cols) * step :, 2 + (k % cols) * step :][:, :SIZE, :SIZE]
        for (x0, y0, x1, y1), c in zip(target["boxes"].tolist(), target["labels"].tolist()):
            rows = slice(int(y0), max(int(y1 - 1), int(y0)) + 1)
            for x in (int(x0), int(max(x1 - 1, x0))):
                column = tile[:, rows, x].T  # (h, 3)
                assert (column == torch.tensor(colours[c])).all(1).float().mean() >= 0.5, (k, c, x)
            checked += 1
    assert checked >= 10  # four images per mosaic: plenty of boxes


def test_class_colours_are_distinct():
    colours = browse.class_colours(80)
    assert len(set(colours)) == 80 and all(0 <= v <= 255 for c in colours for v in c)


def test_browse_rejects_a_bad_count(tmp_path):
    with pytest.raises(SystemExit):
        browse.main([*COMMON, "--data.root", str(tmp_path / "s"), "--n", "0"])
