"""Transforms (letterbox bookkeeping, box/pixel consistency), collate and the DataModule contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detector.data import (
    CocoDetection,
    DetectionDataModule,
    ShapesConfig,
    collate,
    letterbox_params,
    train_transforms,
    val_transforms,
)
from detector.data.pipeline.collate import LAYOUT, OPTIONAL_KEYS, TARGET_KEYS
from detector.data.pipeline.transforms import PAD_VALUE, apply
from detector.ops.boxes import unletterbox
from detector.structures import Target

SIZE = 128
SMALL = ShapesConfig(num_train=8, num_val=4, seed=1, min_size=96, max_size=160)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    DetectionDataModule(root=str(root), embedded=SMALL, image_size=SIZE, num_workers=0)
    return root


# --- letterbox ---------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(300, 417), (417, 300), (257, 333), (320, 320), (50, 100), (641, 97)])
def test_letterbox_params_match_the_val_pipeline(hw):
    h, w = hw
    size = 320
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, size=(20, 2, 2)) * (w, h)
    boxes = np.concatenate([xy.min(1), xy.max(1) + 1], 1).clip(0, (w, h, w, h)).astype(np.float32)
    boxes = np.concatenate([boxes, [[0, 0, w, h]]]).astype(np.float32)
    image, out, labels = apply(val_transforms(size), np.full((h, w, 3), 255, np.uint8), boxes, np.arange(len(boxes)))
    assert image.shape == (size, size, 3) and len(out) == len(boxes)

    scale, pad_x, pad_y = letterbox_params((h, w), size)
    mapped = boxes * scale + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)
    # the short side is resized to round(side * scale) pixels: at most 0.5 input px off
    assert np.abs(out - mapped).max() <= 0.5 + 1e-3
    back = unletterbox(torch.from_numpy(out), torch.tensor([scale, pad_x, pad_y]), torch.tensor([h, w]))
    assert (back - torch.from_numpy(boxes)).abs().max() <= 0.5 / scale + 1e-3  # bound in original px

    # the image lands exactly where the recorded pads say; the rest is gray
    x1, y1 = out[-1, 2:].round().astype(int)
    assert (out[-1, :2] == (pad_x, pad_y)).all()
    assert (image[int(pad_y) : y1, int(pad_x) : x1] == 255).all()
    gray = np.ones((size, size), bool)
    gray[int(pad_y) : y1, int(pad_x) : x1] = False
    assert (image[gray] == PAD_VALUE).all()


# --- train transforms keep boxes on their pixels -------------------------------------------

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_train_boxes_follow_the_pixels(seed):
    h, w = (180, 260) if seed % 2 else (260, 180)
    image = np.full((h, w, 3), 60, np.uint8)
    boxes = np.array([[5, 8, 60, 50], [90, 20, 170, 44], [30, 120, 55, 175], [110, 100, 175, 170]], np.float32)
    for (x0, y0, x1, y1), colour in zip(boxes.astype(int), COLOURS):
        image[y0:y1, x0:x1] = colour  # box [x0, x1) in pixel-edge coordinates
    labels = np.arange(4)
    out, out_boxes, out_labels = apply(train_transforms(SIZE, color_jitter=False, seed=seed), image, boxes, labels)
    assert out.shape == (SIZE, SIZE, 3) and len(out_boxes) >= 1
    for (x0, y0, x1, y1), label in zip(out_boxes, out_labels):
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE and min(x1 - x0, y1 - y0) >= 2
        inner = out[int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1].reshape(-1, 3)
        if len(inner):
            assert np.abs(inner.mean(0) - COLOURS[label]).max() < 12, (label, inner.mean(0))
        # the ring just outside the box (where inside the image) is not the object's colour
        ring = np.ones((SIZE, SIZE), bool)
        ring[max(int(y0) - 2, 0) : int(np.ceil(y1)) + 2, max(int(x0) - 2, 0) : int(np.ceil(x1)) + 2] = False
        ring[: max(int(y0) - 3, 0)] = ring[int(np.ceil(y1)) + 3 :] = False
        ring[:, : max(int(x0) - 3, 0)] = ring[:, int(np.ceil(x1)) + 3 :] = False
        if ring.any():
            assert (np.abs(out[ring].astype(int) - COLOURS[label]).max(1) < 30).mean() < 0.2


def test_train_transforms_drop_tiny_boxes_and_jitter_colour():
    image = np.full((128, 128, 3), 100, np.uint8)
    boxes = np.array([[10, 10, 11, 60], [20, 20, 80, 80]], np.float32)
    out, out_boxes, labels = apply(train_transforms(SIZE, seed=0), image, boxes, np.array([0, 1]))
    assert labels.tolist() == [1] and out_boxes.shape == (1, 4)
    jittered = [apply(train_transforms(SIZE, seed=s), image, boxes, np.array([0, 1]))[0][64, 64] for s in range(4)]
    assert len({tuple(p) for p in jittered}) > 1


# --- collate -------------------------------------------------------------------------------


def test_collate_contract_with_empty_target():
    sample = lambda n: (  # noqa: E731
        torch.full((3, 64, 64), 255, dtype=torch.uint8),
        {
            "boxes": torch.ones(n, 4),
            "labels": torch.zeros(n, dtype=torch.int64),
            "image_id": torch.tensor(n),
            "orig_size": torch.tensor([50, 70]),
            "letterbox": torch.tensor([0.9, 0.0, 9.5]),
        },
    )
    images, targets = collate([sample(2), sample(0)])
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 64) and images.is_contiguous()
    assert images.max() == 1.0 and len(targets) == 2
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].shape == (0,)
    assert targets[0]["image_id"].shape == () and targets[0]["image_id"].dtype == torch.int64
    with pytest.raises(ValueError, match="lacks keys"):
        collate([(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)})])


def test_target_keys_are_those_of_the_typeddict():
    """``collate`` reads its keys from ``Target`` (required / optional as declared there, in its order)."""
    assert TARGET_KEYS == ("boxes", "labels", "image_id", "orig_size", "letterbox")
    assert OPTIONAL_KEYS == ("orig_boxes", "orig_labels")
    assert list(LAYOUT) == list(Target.__annotations__)


def test_collate_converts_and_passes_optional_keys():
    """Arrays and numbers become tensors of the contract's dtype and shape; optional keys pass, extra keys do not."""
    target = {
        "boxes": np.array([[1, 2, 3, 4]], np.float64),
        "labels": [2],
        "image_id": 7,
        "orig_size": (50, 70),
        "letterbox": np.array([0.5, 1.0, 2.0]),
        "orig_boxes": np.array([[2, 4, 6, 8], [0, 0, 1, 1]], np.float32),
        "orig_labels": np.array([2, 0]),
        "extra": 1,
    }
    _, (t,) = collate([(torch.zeros(3, 4, 4, dtype=torch.uint8), target)])
    assert list(t) == list(Target.__annotations__)
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    assert layout == {
        "boxes": (torch.float32, (1, 4)),
        "labels": (torch.int64, (1,)),
        "image_id": (torch.int64, ()),
        "orig_size": (torch.int64, (2,)),
        "letterbox": (torch.float32, (3,)),
        "orig_boxes": (torch.float32, (2, 4)),
        "orig_labels": (torch.int64, (2,)),
    }
    assert t["orig_boxes"].tolist() == [[2, 4, 6, 8], [0, 0, 1, 1]] and int(t["image_id"]) == 7


# --- datamodule ----------------------------------------------------------------------------


def _check_batch(images, targets, dm, batch_size):
    assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE) and images.is_contiguous()
    assert len(targets) == images.shape[0] <= batch_size
    assert 0.0 <= images.min() and images.max() <= 1.0
    for t in targets:
        assert set(t) == {"boxes", "labels", "image_id", "orig_size", "letterbox", "orig_boxes", "orig_labels"}
        n = len(t["labels"])
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
        assert t["labels"].dtype == torch.int64 and ((t["labels"] >= 0) & (t["labels"] < dm.num_classes)).all()
        assert ((t["boxes"] >= 0) & (t["boxes"] <= SIZE)).all()
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert t["image_id"].dtype == torch.int64 and t["image_id"].shape == ()
        assert t["orig_size"].dtype == torch.int64 and t["orig_size"].shape == (2,)
        assert t["letterbox"].dtype == torch.float32 and t["letterbox"].shape == (3,)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_yields_the_contract(shapes_root, num_workers):
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, batch_size=3, num_workers=num_workers)
    assert dm.class_names == ["circle", "rectangle", "triangle", "cross", "star"]
    assert dm.category_ids == [1, 2, 3, 5, 8] and dm.num_classes == 5
    dm.setup("fit")
    seen = 0
    for images, targets in dm.train_dataloader():
        _check_batch(images, targets, dm, 3)
        seen += len(targets)
    assert seen == SMALL.num_train  # drop_last=False

    val = CocoDetection(shapes_root / "val", shapes_root / "annotations/val.json")
    ids = []
    for images, targets in dm.val_dataloader():
        _check_batch(images, targets, dm, 3)
        for t in targets:
            i = len(ids)
            ids.append(int(t["image_id"]))
            raw = val[i]
            assert t["orig_size"].tolist() == list(raw["image"].shape[:2])
            assert t["letterbox"].tolist() == pytest.approx(letterbox_params(raw["image"].shape[:2], SIZE))
            back = unletterbox(t["boxes"], t["letterbox"], t["orig_size"])
            assert torch.allclose(back, torch.from_numpy(raw["boxes"]), atol=0.5 / float(t["letterbox"][0]) + 1e-3)
            assert t["labels"].tolist() == raw["labels"].tolist()
            assert torch.equal(t["orig_boxes"], torch.from_numpy(raw["boxes"]))  # exact, for evaluation
            assert torch.equal(t["orig_labels"], torch.from_numpy(raw["labels"]))
    assert ids == val.image_ids  # ordered


def test_workers_do_not_repeat_augmentations(shapes_root, tmp_path):
    coco = json.loads((shapes_root / "annotations/train.json").read_text())
    first = coco["images"][0]
    coco["images"] = [{**first, "id": k + 1} for k in range(4)]  # the same picture four times
    coco["annotations"] = []
    (tmp_path / "same.json").write_text(json.dumps(coco))
    dm = DetectionDataModule(
        root=str(shapes_root),
        train_annotations=str(tmp_path / "same.json"),
        image_size=SIZE,
        batch_size=1,
        num_workers=2,
    )
    dm.setup("fit")
    loader = torch.utils.data.DataLoader(dm.train_set, batch_size=1, num_workers=2, collate_fn=collate)
    first_two = [images for images, _ in loader][:2]  # item 0 from worker 0, item 1 from worker 1
    assert not torch.equal(first_two[0], first_two[1])


def test_test_split_defaults_to_val(shapes_root):
    dm = DetectionDataModule(root=str(shapes_root), image_size=SIZE, num_workers=0)
    assert dm.splits["test"] == dm.splits["val"]
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == SMALL.num_val


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_size": 100}, ValueError, "image_size must be a positive multiple of 32"),
        ({"image_size": 0}, ValueError, "image_size must be a positive multiple of 32"),
        ({"batch_size": 0}, ValueError, "batch_size must be > 0"),
        ({"root": "/nonexistent/shapes"}, FileNotFoundError, "data root not found: /nonexistent/shapes"),
        ({"train_annotations": "annotations/missing.json"}, FileNotFoundError, "annotation file not found"),
    ],
)
def test_bad_arguments_fail_clearly(shapes_root, kwargs, error, match):
    with pytest.raises(error, match=match):
        DetectionDataModule(**{"root": str(shapes_root), "num_workers": 0, **kwargs})


def test_image_size_error_is_one_line(shapes_root):
    """The size rule is ``structures.check_image_size``'s: one line naming the argument and the value."""
    for bad in (100, 0, -64):
        with pytest.raises(ValueError) as err:
            DetectionDataModule(root=str(shapes_root), image_size=bad, num_workers=0)
        assert str(err.value) == f"image_size must be a positive multiple of 32 (the largest stride), got {bad}"


def test_signature_is_cli_friendly(shapes_root):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DetectionDataModule, "data")
    cfg = parser.parse_args(
        ["--data.root", str(shapes_root), "--data.embedded.num_train", "8", "--data.image_size", "128"]
    )
    assert cfg.data.embedded.num_train == 8 and cfg.data.embedded.num_val == 200 and cfg.data.image_size == 128
