"""``TransformedDataset``: reader samples -> augmented ``(image (3, S, S) uint8, target)`` pairs,
each item's randomness a pure function of (seed, epoch, index)."""

from __future__ import annotations

import random

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from detector.data.pipeline.cache import CachedImages
from detector.data.pipeline.mosaic import MosaicTiler
from detector.data.pipeline.samplers import ItemKey, item_rng
from detector.data.pipeline.transforms import (
    Augment,
    apply,
    letterbox_params,
    mosaic_transforms,
    train_transforms,
    val_transforms,
)
from detector.data.readers.base import DetectionSource
from detector.data.readers.folder import ImageFolder
from detector.structures import Target


class TransformedDataset(Dataset):
    """Applies an albumentations pipeline to ``CocoDetection`` samples -> ``(image (3, S, S) uint8, target)``.

    Keys are ``ItemKey(index, epoch)`` (what ``TrainSampler`` yields) or a plain index (epoch
    ``self.epoch``, 0 unless set). Per-item randomness: before anything random happens for an
    item, ``rng = item_rng(seed, epoch, index)`` (a ``numpy.random.Generator``, a pure function
    of the three) becomes the random state of the whole pipeline, so ``self.transform.random_generator``
    *is* the item's generator; anything else random for the item (the mosaic partners and the mosaic
    pipeline's seed) draws from it too. Samples are thus identical whichever worker loads them and
    however many workers there are. Reseeding costs ~15 us per item (~1 % of the augmentation).
    """

    def __init__(
        self,
        base: DetectionSource | CachedImages | ImageFolder,
        transform: A.Compose,
        size: int,
        mosaic: MosaicTiler | None = None,
        seed: int = 0,
    ):
        self.base, self.transform, self.size, self.mosaic, self.seed = base, transform, size, mosaic, seed
        self.epoch = 0  # the epoch of plain integer keys

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | ItemKey) -> tuple[torch.Tensor, Target]:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        rng = item_rng(self.seed, epoch, i)  # this item's random stream
        self.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        sample = self.base[i]
        h, w = sample.get("orig_size", sample["image"].shape[:2])  # CachedImages: image pre-resized
        tiled = self.mosaic(self.base, sample, rng, epoch) if self.mosaic else None
        image, boxes, labels = tiled or apply(self.transform, sample["image"], sample["boxes"], sample["labels"])
        target: Target = {
            "boxes": torch.from_numpy(boxes),  # (N, 4) xyxy input pixels
            "labels": torch.from_numpy(labels),  # (N,)
            "image_id": torch.tensor(sample["image_id"], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "letterbox": torch.tensor(letterbox_params((h, w), self.size), dtype=torch.float32),
            "orig_boxes": torch.from_numpy(sample.get("orig_boxes", sample["boxes"])),  # (M, 4) original pixels
            "orig_labels": torch.from_numpy(sample["labels"]),  # (M,)
        }
        # numpy transpose: torch's parallel uint8 permute stalls behind cv2's thread pool (~6 ms/image)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target  # (3, S, S) uint8


def training_set(
    source: DetectionSource, size: int, augment: Augment | None, mosaic: float, cache: bool, seed: int
) -> TransformedDataset:
    """The training dataset of ``source`` at input side ``size``: ``train_transforms(size, augment=augment)``,
    a ``MosaicTiler`` when ``mosaic`` (its probability) > 0, images served from RAM when ``cache``."""
    base = CachedImages(source, size) if cache else source
    tiler = MosaicTiler(mosaic_transforms(size, augment=augment), mosaic) if mosaic > 0 else None
    return TransformedDataset(base, train_transforms(size, augment=augment), size, mosaic=tiler, seed=seed)


def evaluation_set(source: DetectionSource | ImageFolder, size: int, cache: bool = False) -> TransformedDataset:
    """The letterboxed (``val_transforms``) dataset of ``source``; with ``cache``, a ``DetectionSource``'s images
    are served from RAM (an ``ImageFolder``, read once by ``predict``, always from disk)."""
    base = CachedImages(source, size) if cache and isinstance(source, DetectionSource) else source
    return TransformedDataset(base, val_transforms(size), size)
