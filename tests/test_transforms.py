"""Mosaic, multi-scale, close_mosaic and the image cache (``detector.data.{transforms,mosaic,cache}``)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch

from detector.data import (
    CocoDetection,
    DetectionDataModule,
    ShapesConfig,
    train_transforms,
)
from detector.data.pipeline.cache import CachedImages
from detector.data.pipeline.samplers import ItemKey
from detector.data.pipeline.transforms import (
    apply,
    mosaic_transforms,
    random_batch_size,
    resize_batch,
    val_transforms,
)
from detector.structures import MAX_STRIDE

SIZE = 128
SMALL = ShapesConfig(num_train=8, num_val=4, seed=1, min_size=96, max_size=160)
# Saturated colours: a 50/50 blend of two of them (or with the grays 60 / 114) is >= 97 away
# from every other colour in some channel, so blended edge pixels never pass for another object.
COLOURS = np.array([c for c in itertools.product((0, 255), repeat=3)], np.uint8)  # (8, 3)
TOLERANCE = 40  # a pixel "is" colour c when every channel is within this of c


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    DetectionDataModule(root=str(root), embedded=SMALL, image_size=SIZE, num_workers=0)
    return root


# --- boxes follow the pixels ---------------------------------------------------------------


def _picture(k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gray (60) image with rectangles of colours 2k and 2k + 1 -> (image, boxes (2, 4), labels (2,))."""
    h, w = rng.integers(80, 200, size=2)
    image = np.full((h, w, 3), 60, np.uint8)
    boxes = []
    for side in (0, 1):  # one rectangle in the left half, one in the right half
        x0 = rng.integers(side * w // 2, side * w // 2 + w // 4)
        y0 = rng.integers(0, h // 2)
        x1, y1 = x0 + rng.integers(12, w // 4), y0 + rng.integers(12, h // 2)
        image[y0:y1, x0:x1] = COLOURS[2 * k + side]  # pixels [x0, x1): the box in pixel-edge coordinates
        boxes.append((x0, y0, x1, y1))
    return image, np.array(boxes, np.float32), np.array([2 * k, 2 * k + 1])


def _check_boxes_follow_pixels(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> None:
    assert image.shape == (SIZE, SIZE, 3) and len(set(labels.tolist())) == len(labels)
    for c, colour in enumerate(COLOURS):
        mask = np.abs(image.astype(int) - colour).max(-1) < TOLERANCE  # (S, S) pixels of object c
        if c not in labels:  # a visible object always keeps its box; a sliver may lose it
            assert mask.sum() < 16 or min(np.ptp(np.nonzero(mask)[0]), np.ptp(np.nonzero(mask)[1])) < 3, c
            continue
        x0, y0, x1, y1 = boxes[list(labels).index(c)]
        inner = mask[int(np.ceil(y0)) + 2 : int(y1) - 2, int(np.ceil(x0)) + 2 : int(x1) - 2]
        assert inner.size == 0 or inner.mean() >= 0.9, (c, inner.mean())
        ys, xs = np.nonzero(mask)
        # the box is the object's visible extent (pixel edges), to within the 1-px interpolation blur
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x0, y0, x1, y1], atol=2.0), c


def test_mosaic_boxes_follow_pixels():
    sources = set()  # which of the four pictures contributed a box, over all seeds
    for seed in range(6):
        rng = np.random.default_rng(seed)
        tiles = [_picture(k, rng) for k in range(4)]
        out = apply(mosaic_transforms(SIZE, color_jitter=False, seed=seed), *tiles[0], extras=tiles[1:])
        _check_boxes_follow_pixels(*out)
        sources |= {int(lab) // 2 for lab in out[2]}
    assert sources == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", range(4))
def test_affine_boxes_follow_pixels(seed):
    image, boxes, labels = _picture(0, np.random.default_rng(seed))
    _check_boxes_follow_pixels(*apply(train_transforms(SIZE, color_jitter=False, seed=seed), image, boxes, labels))


def test_mosaic_items_are_pure_functions_of_the_key(shapes_root):
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, mosaic=1.0)
    dm.setup("fit")
    first = dm.train_set[ItemKey(3, 1)]
    dm.train_set[ItemKey(5, 1)], dm.train_set[ItemKey(3, 2)]  # other items in between
    again = dm.train_set[ItemKey(3, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert not torch.equal(first[0], dm.train_set[ItemKey(3, 2)][0])


# --- multi-scale ---------------------------------------------------------------------------


def test_random_batch_sizes_are_multiples_of_32_in_range():
    sizes = [random_batch_size(7, step, 256, 416) for step in range(200)]
    assert set(sizes) == {256, 288, 320, 352, 384, 416}  # every allowed size, nothing else
    assert sizes == [random_batch_size(7, step, 256, 416) for step in range(200)]  # (seed, step) -> size
    assert sizes != [random_batch_size(8, step, 256, 416) for step in range(200)]
    assert {random_batch_size(0, s, 250, 330) for s in range(50)} == {256, 288, 320}


@pytest.mark.parametrize("size", [32, 96])
def test_resize_batch_scales_boxes_exactly_with_the_image(size):
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 8:40, 16:48] = 1.0  # box [16, 8, 48, 40)
    targets = [{"boxes": torch.tensor([[16.0, 8.0, 48.0, 40.0]]), "letterbox": torch.tensor([0.5, 0.0, 6.0])}] * 2
    out, out_targets = resize_batch(images, targets, size)
    k = size / 64
    assert out.shape == (2, 3, size, size)
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)  # the rectangle's edges, at half intensity
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == out_targets[0]["boxes"][0].tolist()
    assert out_targets[0]["boxes"][0].tolist() == [16 * k, 8 * k, 48 * k, 40 * k]
    assert out_targets[1]["letterbox"].tolist() == [0.5 * k, 0.0, 6.0 * k]
    assert targets[0]["boxes"][0].tolist() == [16.0, 8.0, 48.0, 40.0]  # inputs untouched


def test_multi_scale_hook_resizes_training_batches_only(shapes_root):
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, batch_size=2, num_workers=0, multi_scale=(64, 160))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    for step in range(4):
        dm.trainer = SimpleNamespace(training=True, global_step=step)
        images, targets = dm.on_after_batch_transfer(batch, 0)
        size = random_batch_size(dm._seed, step, 64, 160)
        assert images.shape[-2:] == (size, size) and size % MAX_STRIDE == 0
        assert torch.allclose(targets[0]["boxes"], batch[1][0]["boxes"] * size / SIZE)
    dm.trainer = SimpleNamespace(training=False, global_step=0)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # validation keeps image_size


# --- close_mosaic with persistent workers ----------------------------------------------------


class _BoxCounter(L.LightningModule):
    """Trains one weight; records how many boxes each training image has, per epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.counts: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.counts.setdefault(self.current_epoch, []).extend(len(t["boxes"]) for t in batch[1])
        return self.weight * batch[0].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_close_mosaic_reaches_persistent_workers(tmp_path):
    """Each picture is one solid colour with one full-image box: a mosaic item has 4 boxes, a plain one 1."""
    (tmp_path / "img").mkdir()
    images, annotations = [], []
    for k in range(8):
        cv2.imwrite(str(tmp_path / "img" / f"{k}.png"), np.full((64, 64, 3), 30 * k, np.uint8))
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": 64, "width": 64})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [0, 0, 64, 64]})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    dm = DetectionDataModule(
        root=str(tmp_path), train_images="img", train_annotations="train.json", val_images="img",
        val_annotations="train.json", image_size=64, batch_size=4, num_workers=2, mosaic=1.0, close_mosaic=1,
    )  # fmt: skip
    counter = _BoxCounter()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(counter, datamodule=dm)
    assert dm.train_dataloader().persistent_workers
    assert counter.counts == {0: [4] * 8, 1: [1] * 8}  # workers started in epoch 0 switch in epoch 1


def test_close_mosaic_needs_max_epochs(shapes_root):
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0, mosaic=0.5, close_mosaic=2)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(max_epochs=-1, current_epoch=0)
    with pytest.raises(ValueError, match="close_mosaic needs a finite trainer.max_epochs"):
        dm.train_dataloader()


# --- cache ---------------------------------------------------------------------------------


def test_cache_serves_what_decoding_gives(shapes_root):
    base = CocoDetection(shapes_root / "val", shapes_root / "annotations/val.json")
    cached = CachedImages(base, SIZE)
    assert len(cached) == len(base)
    assert cached.nbytes == sum(cached[i]["image"].size for i in range(len(cached)))
    pipeline = val_transforms(SIZE)
    for i in range(len(base)):
        raw, hit = base[i], cached[i]
        assert max(hit["image"].shape[:2]) == SIZE and hit["orig_size"] == raw["image"].shape[:2]
        assert np.array_equal(hit["orig_boxes"], raw["boxes"]) and np.array_equal(hit["labels"], raw["labels"])
        want = apply(pipeline, raw["image"], raw["boxes"], raw["labels"])
        got = apply(pipeline, hit["image"], hit["boxes"], hit["labels"])
        assert np.array_equal(got[0], want[0])  # the same pixels as decoding + letterboxing
        assert np.allclose(got[1], want[1], atol=1e-3) and np.array_equal(got[2], want[2])


def test_cached_datamodule_gives_the_same_batches(shapes_root):
    plain, cached = (
        DetectionDataModule(root=str(shapes_root), image_size=SIZE, batch_size=4, num_workers=0, cache=c)
        for c in (False, True)
    )
    for dm in (plain, cached):
        dm.setup("fit")
    assert isinstance(cached.val_set.base, CachedImages) and isinstance(cached.train_set.base, CachedImages)
    for (a, ta), (b, tb) in zip(plain.val_dataloader(), cached.val_dataloader()):
        assert torch.equal(a, b)
        for x, y in zip(ta, tb):
            assert x.keys() == y.keys() and all(torch.allclose(x[k].float(), y[k].float(), atol=1e-3) for k in x)


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mosaic": 1.5}, "mosaic is a probability"),
        ({"mosaic": -0.1}, "mosaic is a probability"),
        ({"close_mosaic": -1}, "close_mosaic must be >= 0"),
        ({"multi_scale": (416, 256)}, "multi_scale must be"),
        ({"multi_scale": (300, 310)}, "multi_scale must be"),
        ({"multi_scale": (0, 64)}, "multi_scale must be"),
    ],
)
def test_bad_augment_arguments_fail_clearly(shapes_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectionDataModule(root=str(shapes_root), num_workers=0, **kwargs)
