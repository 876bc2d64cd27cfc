"""``python -m detector.browse``: a grid of augmented samples with their boxes, written to a PNG.

Check the augmentation before a long run (mmdetection's ``browse_dataset``)::

    python -m detector.browse --config configs/default.yaml --config configs/augment/aerial.yaml
    python -m detector.browse --config configs/default.yaml --data.mosaic 1 --n 9 --out mosaic.png
    python -m detector.browse --config configs/default.yaml --split val

It reads the same config files and ``--data.*`` overrides as ``train.py`` (the ``trainer``
and ``model`` sections are read and ignored; no model is built) and seeds as training does
(``seed_everything``). ``--split train`` shows the first ``n`` samples of epoch 0 exactly as
the training loader yields them: the ``TrainSampler`` order, each item augmented from its own
``item_rng(seed, 0, index)``, mosaic included, then ``collate``. ``--split val`` shows the first
``n`` validation images, letterboxed. Multi-scale resizing (on device, per batch) is not shown.

Each box is drawn on the object's outermost pixels (``[x0, y0, x1 - 1, y1 - 1]`` of its
pixel-edge box, ``torchvision.utils.draw_bounding_boxes``, 2 px wide, inward), in its class
colour (``class_colours``) with the class name; the tiles are laid out row by row by
``torchvision.utils.make_grid`` (``ceil(sqrt(n))`` columns, 2 px white gaps).
"""

from __future__ import annotations

import colorsys
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from detector.data import DetectionDataModule, collate
from detector.data.pipeline.samplers import TrainSampler
from detector.structures import Target

IGNORED_SECTIONS = ("trainer", "model", "ckpt_path", "optimizer", "lr_scheduler")  # of training configs
PADDING = 2  # px between tiles (make_grid)
LINE_WIDTH = 2  # px of a drawn box


def build_parser() -> ArgumentParser:
    """The parser: ``--config`` files and ``--data.*`` as in ``train.py``, plus ``--split``, ``--n``, ``--out``."""
    parser = ArgumentParser(prog="python -m detector.browse", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="training config file(s), layered in order")
    parser.add_argument("--seed_everything", type=bool | int, default=0, help="as in train.py")
    parser.add_class_arguments(DetectionDataModule, "data")
    for key in IGNORED_SECTIONS:
        parser.add_argument(f"--{key}", type=Any, default=None, help="read from training configs and ignored")
    parser.add_argument("--split", type=Literal["train", "val"], default="train", help="samples of this split")
    parser.add_argument("--n", type=int, default=16, help="number of samples in the grid")
    parser.add_argument("--out", type=str | None, default=None, help="PNG path (default: runs/browse_<split>.png)")
    return parser


def load_samples(dm: DetectionDataModule, split: str, n: int) -> tuple[Tensor, list[Target]]:
    """The first ``n`` samples of ``split`` as the loader yields them: ``images (B, 3, S, S)`` float
    in [0, 1] and the targets (``detector.data.pipeline.collate``). Training: epoch 0 of ``TrainSampler``."""
    if split == "train":
        dm.setup("fit")
        dataset = dm.train_set
        assert dataset is not None  # setup("fit") built it
        keys: list[Any] = list(itertools.islice(TrainSampler(dataset, 1, 0, seed=dataset.seed, epoch=0), n))
    else:
        dm.setup("validate")
        dataset = dm.val_set
        assert dataset is not None  # setup("validate") built it
        keys = list(range(min(n, len(dataset))))
    if not keys:
        raise ValueError(f"the {split} split has no images")
    return collate([dataset[k] for k in keys])


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """One saturated RGB colour per class: hues ``c * 0.618...`` (golden ratio) apart, all distinct."""
    hues = [(c * (math.sqrt(5) - 1) / 2) % 1.0 for c in range(num_classes)]
    return [tuple(round(255 * v) for v in colorsys.hsv_to_rgb(h, 0.9, 1.0)) for h in hues]  # type: ignore[misc]


def draw_grid(images: Tensor, targets: list[Target], class_names: list[str], cols: int | None = None) -> Tensor:
    """``images (B, 3, S, S)`` in [0, 1] with their target boxes -> one ``uint8 (3, H, W)`` grid.

    ``cols`` tiles per row (default ``ceil(sqrt(B))``); ``H = rows * (S + 2) + 2``, ``W = cols * (S + 2) + 2``.
    """
    colours = class_colours(len(class_names))
    tiles = []
    for image, target in zip(images, targets):
        tile = image.mul(255).round().to(torch.uint8)  # (3, S, S): collate divided the uint8 image by 255
        boxes = target["boxes"]
        if len(boxes):
            inner = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:] - 1, boxes[:, :2])], 1)  # outermost pixels
            labels = target["labels"].tolist()
            tile = draw_bounding_boxes(
                tile,
                inner,
                labels=[class_names[c] for c in labels],
                colors=[colours[c] for c in labels],
                width=LINE_WIDTH,
            )
        tiles.append(tile)
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    return make_grid(tiles, nrow=cols, padding=PADDING, pad_value=255)


def main(args: list[str] | None = None) -> Path:
    """Parse ``args`` (default ``sys.argv[1:]``), draw the grid, write it; returns the PNG path."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    if cfg.n <= 0:
        parser.error(f"--n must be > 0, got {cfg.n}")
    if cfg.seed_everything is not False:
        L.seed_everything(None if cfg.seed_everything is True else cfg.seed_everything, workers=True, verbose=False)
    try:
        dm: DetectionDataModule = parser.instantiate(cfg).data
        images, targets = load_samples(dm, cfg.split, cfg.n)
    except (ValueError, FileNotFoundError) as err:  # our argument and data checks: a user mistake
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.out or f"runs/browse_{cfg.split}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(draw_grid(images, targets, dm.class_names), str(out))
    ids = " ".join(str(int(t["image_id"])) for t in targets)
    print(f"{out}: {len(targets)} {cfg.split} samples, {sum(len(t['boxes']) for t in targets)} boxes; image ids: {ids}")
    return out


if __name__ == "__main__":
    main()
