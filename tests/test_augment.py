"""``data.augment``: the default is today's pipeline pixel for pixel, a YAML pipeline moves boxes with
the pixels, and transforms that cannot keep boxes on their pixels are rejected in one line."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import yaml

from detector.cli import DetectorCLI, cli_kwargs
from detector.data import DetectionDataModule, ShapesConfig, TransformedDataset
from detector.data.pipeline.mosaic import MosaicTiler
from detector.data.pipeline.samplers import ItemKey
from detector.data.pipeline.transforms import (
    MOSAIC_KEY,
    apply,
    augment_hparams,
    check_augment,
    default_augment,
    mosaic_transforms,
    train_transforms,
)
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96
SMALL = ShapesConfig(num_train=8, num_val=2, seed=2, min_size=80, max_size=150)


# --- the pipeline of the commit before data.augment, frozen here as the reference ------------------


def _before_augment(color_jitter: bool) -> list:
    transforms = [
        A.Affine(scale=(0.6, 1.4), translate_percent=(-0.1, 0.1), keep_ratio=True, border_mode=0, fill=114, p=1.0),
        A.HorizontalFlip(p=0.5),
    ]
    if color_jitter:
        transforms.append(A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=40, val_shift_limit=30, p=1.0))
    return transforms


def _before_compose(first: list, color_jitter: bool, seed: int | None) -> A.Compose:
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_width=2.0, min_height=2.0, clip=True)
    return A.Compose(first + _before_augment(color_jitter), bbox_params=bbox_params, seed=seed)


def _before_train(size: int, color_jitter: bool = True, seed: int | None = None) -> A.Compose:
    letterbox = [
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=114),
    ]
    return _before_compose(letterbox, color_jitter, seed)


def _before_mosaic(size: int, seed: int | None = None) -> A.Compose:
    mosaic = A.Mosaic(
        grid_yx=(2, 2), target_size=(size, size), cell_shape=(size, size), center_range=(0.3, 0.7),
        fit_mode="cover", interpolation=cv2.INTER_LINEAR, fill=114, metadata_key=MOSAIC_KEY, p=1.0,
    )  # fmt: skip
    return _before_compose([mosaic], True, seed)


def _sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noise image of random shape with 6 random boxes (some thin, so the size filter acts)."""
    h, w = rng.integers(40, 300, size=2)
    xy = rng.uniform(0, 1, size=(6, 2, 2)) * (w, h)
    boxes = np.concatenate([xy.min(1), xy.max(1) + 1], 1).clip(0, (w, h, w, h)).astype(np.float32)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes, rng.integers(0, 5, 6)


def _same(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("seed", range(8))
def test_default_pipeline_is_the_one_before_data_augment(seed):
    rng = np.random.default_rng(100 + seed)
    image, boxes, labels = _sample(rng)
    for size in (64, 320):
        got = apply(train_transforms(size, seed=seed), image, boxes, labels)
        assert _same(got, apply(_before_train(size, seed=seed), image, boxes, labels)), size
        no_jitter = apply(train_transforms(size, color_jitter=False, seed=seed), image, boxes, labels)
        assert _same(no_jitter, apply(_before_train(size, color_jitter=False, seed=seed), image, boxes, labels))
    extras = [_sample(rng) for _ in range(3)]
    got = apply(mosaic_transforms(SIZE, seed=seed), image, boxes, labels, extras)
    assert _same(got, apply(_before_mosaic(SIZE, seed=seed), image, boxes, labels, extras))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    DetectionDataModule(root=str(root), embedded=SMALL, image_size=SIZE, num_workers=0)
    return root


def test_default_training_items_are_the_ones_before_data_augment(shapes_root):
    """Through the dataset: per-item reseeding (item_rng), mosaic partners and all, for 3 epochs."""
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, mosaic=0.5, seed=7)
    dm.setup("fit")
    before = TransformedDataset(
        dm.train_set.base, _before_train(SIZE), SIZE, mosaic=MosaicTiler(_before_mosaic(SIZE), 0.5), seed=7
    )
    for key in (ItemKey(i, e) for e in range(3) for i in range(len(before))):
        (a, ta), (b, tb) = dm.train_set[key], before[key]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def _cli(tmp_path: Path, *args: str) -> DetectorCLI:
    base = ["--config", str(ROOT / "configs/default.yaml"), "--data.image_size", str(SIZE), "--data.num_workers", "0"]
    base += ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    base += ["--trainer.default_root_dir", str(tmp_path / "runs")]
    return DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=[*base, *args], **cli_kwargs())


def test_default_written_out_in_yaml_is_the_default(shapes_root, tmp_path):
    data = ["--data.root", str(shapes_root), "--data.embedded", json.dumps(vars(SMALL)), "--data.mosaic", "0.5"]
    plain = _cli(tmp_path, *data).datamodule
    written = _cli(tmp_path, "--config", str(ROOT / "configs/augment/default.yaml"), *data).datamodule
    assert plain.augment is None and len(written.augment) == 3
    for dm in (plain, written):
        dm.setup("fit")
    for key in (ItemKey(i, e) for e in range(2) for i in range(len(plain.train_set))):
        (a, ta), (b, tb) = plain.train_set[key], written.train_set[key]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_configured_items_are_pure_functions_of_the_key(shapes_root):
    """The item's generator reaches every configured transform, inside OneOf too (set_random_state)."""
    augment = [A.OneOf([A.Blur(p=1.0), A.VerticalFlip(p=1.0)], p=0.7), A.RandomBrightnessContrast(p=0.5)]
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, augment=augment, seed=3)
    dm.setup("fit")
    first = [dm.train_set[ItemKey(i, 1)][0] for i in range(len(dm.train_set))]
    again = [dm.train_set[ItemKey(i, 1)][0] for i in reversed(range(len(dm.train_set)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, dm.train_set[ItemKey(i, 2)][0]) for i, a in enumerate(first))


# --- a YAML pipeline moves the boxes with the pixels -------------------------------------------------


def _bright_rectangles(root: Path) -> None:
    """Two 72 x 120 gray images, each with one white rectangle and its box (COCO files)."""
    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for k, (x, y, w, h) in enumerate([(10, 6, 40, 20), (70, 40, 30, 28)]):
        image = np.full((72, 120, 3), 60, np.uint8)
        image[y : y + h, x : x + w] = 255
        cv2.imwrite(str(root / "img" / f"{k}.png"), image)
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": 72, "width": 120})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [x, y, w, h]})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (root / "train.json").write_text(json.dumps(coco))


def test_yaml_vertical_flip_moves_boxes_with_pixels(tmp_path):
    _bright_rectangles(tmp_path / "data")
    pipeline = {"data": {"augment": [{"class_path": "albumentations.VerticalFlip", "init_args": {"p": 1.0}}]}}
    (tmp_path / "flip.yaml").write_text("# vertical flip only\n" + yaml.safe_dump(pipeline))
    files = [f"--data.{s}_{k}={v}" for s in ("train", "val") for k, v in (("images", "img"), ("annotations", "train.json"))]  # fmt: skip
    data = ["--data.root", str(tmp_path / "data"), "--data.embedded", "null", *files]
    dm = _cli(tmp_path, "--config", str(tmp_path / "flip.yaml"), *data).datamodule
    dm.setup("fit")
    for i in range(2):
        (flipped, t), (plain, tv) = dm.train_set[ItemKey(i, 0)], dm.val_set[i]
        assert torch.equal(flipped, plain.flip(1))  # (3, S, S): rows reversed, nothing else
        x0, y0, x1, y1 = tv["boxes"][0].tolist()
        assert torch.allclose(t["boxes"], torch.tensor([[x0, SIZE - y1, x1, SIZE - y0]]), atol=1e-4)  # float32
        ys, xs = torch.nonzero(flipped.min(0).values > 160, as_tuple=True)  # the white rectangle
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # its pixel edges
        assert np.allclose(extent, t["boxes"][0], atol=1.0), (extent, t["boxes"][0])


@pytest.mark.parametrize("seed", range(3))
def test_mosaic_items_run_the_configured_augmentation(seed):
    """Mosaic, then ``augment``: a vertical flip (p = 1) flips the mosaic that no augmentation gives."""
    rng = np.random.default_rng(seed)
    image, boxes, labels = _sample(rng)
    extras = [_sample(rng) for _ in range(3)]
    plain = apply(mosaic_transforms(SIZE, augment=[], seed=seed), image, boxes, labels, extras)
    flip = apply(mosaic_transforms(SIZE, augment=[A.VerticalFlip(p=1.0)], seed=seed), image, boxes, labels, extras)
    assert np.array_equal(flip[0], plain[0][::-1]) and np.array_equal(flip[2], plain[2])
    x0, y0, x1, y1 = plain[1].T
    assert len(x0) and np.allclose(flip[1], np.stack([x0, SIZE - y1, x1, SIZE - y0], 1), atol=1e-4)


def test_size_changing_transforms_are_letterboxed_back(tmp_path):
    """A crop to 50 x 30 comes back to SIZE x SIZE by the template's final letterbox, boxes along."""
    image = np.full((120, 160, 3), 60, np.uint8)
    image[30:90, 40:120] = 255
    crop = [A.CenterCrop(height=50, width=30, p=1.0)]
    out, boxes, labels = apply(
        train_transforms(SIZE, augment=crop, seed=0), image, np.array([[40, 30, 120, 90.0]]), [3]
    )
    assert out.shape == (SIZE, SIZE, 3) and labels.tolist() == [3]
    ys, xs = np.nonzero(out.min(-1) > 160)
    assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], boxes[0], atol=1.0)
    # letterbox 160 x 120 -> 96 x 72 (pad_y 12): box [24, 30, 72, 66]; crop x 33..63, y 23..73 -> [0, 7, 30, 43];
    # letterbox 30 x 50 -> 58 x 96 (scale 1.92, pad_x 19)
    assert np.allclose(boxes[0], [19, 7 * 1.92, 19 + 58, 43 * 1.92], atol=1e-3), boxes[0]


# --- what cannot keep boxes on their pixels is rejected --------------------------------------------


@pytest.mark.parametrize(
    "augment, match",
    [
        ([A.Normalize()], "must keep uint8"),
        ([A.ToGray(num_output_channels=1, p=0.1)], "must keep uint8"),  # the probe runs every transform
        ([A.MaskDropout()], r"MaskDropout needs inputs \['mask'\]"),
        ([A.PadIfNeeded3D(min_zyx=(4, 4, 4))], "PadIfNeeded3D cannot move bounding boxes"),
        ([A.Compose([A.VerticalFlip()])], "Compose: list the transforms themselves"),
        ([A.OneOf([A.Blur(), A.Mosaic()])], "Mosaic: set data.mosaic instead"),
        (["VerticalFlip"], "'VerticalFlip' is not an albumentations transform"),
        (A.VerticalFlip(), "must be a list of albumentations transforms"),
    ],
)
def test_transforms_that_break_boxes_are_rejected_in_one_line(shapes_root, augment, match):
    with pytest.raises(ValueError, match=match) as err:
        DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, augment=augment)
    assert "\n" not in str(err.value)


def test_cli_rejects_a_transform_without_boxes_in_one_line(shapes_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(tmp_path, "--data.root", str(shapes_root), "--data.augment", "[{class_path: albumentations.MaskDropout}]")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.augment: MaskDropout needs inputs ['mask'] that the training pipeline does not supply"
    )


def test_apply_rejects_float_images_at_run_time():
    with pytest.raises(ValueError, match="must keep uint8"):
        apply(train_transforms(SIZE, augment=[A.ToFloat()], seed=0), np.zeros((50, 60, 3), np.uint8), [], [])


def test_accepted_pipelines_and_hparams_that_load_with_weights_only(shapes_root, tmp_path):
    aerial = yaml.safe_load((ROOT / "configs/augment/aerial.yaml").read_text())["data"]["augment"]
    assert [t["class_path"].split(".")[-1] for t in aerial][2:4] == ["VerticalFlip", "RandomRotate90"]
    pipeline = [*default_augment(), A.OneOf([A.Blur(), A.VerticalFlip()], p=0.3)]
    check_augment(pipeline)
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, augment=pipeline)
    torch.save(dict(dm.hparams), tmp_path / "h.pt")
    hparams = torch.load(tmp_path / "h.pt", weights_only=True)
    assert hparams["augment"] == augment_hparams(pipeline)
    rebuilt = [A.from_dict({"transform": d}) for d in hparams["augment"]]
    assert [repr(t) for t in rebuilt] == [repr(t) for t in pipeline]
    assert DetectionDataModule(root=str(shapes_root), num_workers=0).hparams["augment"] is None
