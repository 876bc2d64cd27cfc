"""The LightningDataModule: COCO-format files (or the embedded shapes set) -> batches.

Batches follow ``detector.data.collate`` (images float32 (B, 3, S, S) in [0, 1], targets a
list of dicts with boxes/labels/image_id/orig_size/letterbox). Class names, category ids
and the number of classes are known right after ``__init__`` (read from the training
annotation file), so a LightningCLI can link ``data.num_classes`` into the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from detector.data.coco import CocoDetection
from detector.data.collate import collate
from detector.data.shapes import ShapesConfig, ensure_shapes
from detector.data.transforms import apply, letterbox_params, train_transforms, val_transforms


class TransformedDataset(Dataset):
    """Applies an albumentations pipeline to ``CocoDetection`` samples -> ``(image (3, S, S) uint8, target)``.

    The pipeline's random stream is reseeded once per process/worker from ``torch.initial_seed()``,
    so workers differ from one another and follow ``seed_everything`` (albumentations keeps its
    own generator, which forked workers would otherwise all copy).
    """

    def __init__(self, base: CocoDetection, transform: A.Compose, size: int):
        self.base, self.transform, self.size = base, transform, size
        self._seeded_for: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.base)

    def _reseed(self) -> None:
        info = get_worker_info()
        key = (os.getpid(), info.id if info is not None else -1)
        if key != self._seeded_for:
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_for = key

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        self._reseed()
        sample = self.base[i]
        h, w = sample["image"].shape[:2]
        image, boxes, labels = apply(self.transform, sample["image"], sample["boxes"], sample["labels"])
        target = {
            "boxes": torch.from_numpy(boxes),  # (N, 4) xyxy input pixels
            "labels": torch.from_numpy(labels),  # (N,)
            "image_id": torch.tensor(sample["image_id"], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "letterbox": torch.tensor(letterbox_params((h, w), self.size), dtype=torch.float32),
            "orig_boxes": torch.from_numpy(sample["boxes"]),  # (M, 4) original pixels, for evaluation
            "orig_labels": torch.from_numpy(sample["labels"]),  # (M,)
        }
        # numpy transpose: torch's parallel uint8 permute stalls behind cv2's thread pool (~6 ms/image)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target  # (3, S, S) uint8


class DetectionDataModule(L.LightningDataModule):
    """Detection data in COCO JSON format; relative paths are resolved against ``root``.

    Args:
        root: dataset folder (created when ``embedded`` is set).
        train_images / train_annotations: training image folder and COCO JSON.
        val_images / val_annotations: validation image folder and COCO JSON.
        test_images / test_annotations: test split; ``None`` means the validation split.
        embedded: generate the built-in shapes dataset into ``root`` with this config.
        image_size: square model input side (letterboxed), a multiple of 32.
        batch_size: images per batch (per process under DDP).
        num_workers: dataloader worker processes (0 = load in the main process).
        pin_memory: pin batches in page-locked memory (useful on GPU).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        train_images: str = "train",
        train_annotations: str = "annotations/train.json",
        val_images: str = "val",
        val_annotations: str = "annotations/val.json",
        test_images: str | None = None,
        test_annotations: str | None = None,
        embedded: ShapesConfig | None = None,
        image_size: int = 320,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_args(image_size, batch_size, num_workers)
        # Single-threaded OpenCV, set before any worker is forked: loader processes must not crowd the
        # training threads, and a forked child of a process with a live cv2 thread pool can deadlock.
        cv2.setNumThreads(1)
        root_path = Path(root)
        if embedded is not None:
            ensure_shapes(root_path, embedded)
        elif not root_path.is_dir():
            raise FileNotFoundError(f"data root not found: {root_path} (set data.root, or data.embedded to generate shapes)")
        self.paths: dict[str, tuple[Path, Path]] = {
            "train": (root_path / train_images, root_path / train_annotations),
            "val": (root_path / val_images, root_path / val_annotations),
            "test": (root_path / (test_images or val_images), root_path / (test_annotations or val_annotations)),
        }
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._train_base = CocoDetection(*self.paths["train"])
        self.category_ids: list[int] = list(self._train_base.category_ids)
        self.class_names: list[str] = list(self._train_base.class_names)
        self.num_classes: int = len(self.category_ids)
        self.train_set: TransformedDataset | None = None
        self.val_set: TransformedDataset | None = None
        self.test_set: TransformedDataset | None = None

    def train_box_sizes(self) -> torch.Tensor:
        """Training box sizes ``[N, 2]`` (w, h) in input pixels, each image letterboxed to ``image_size``.

        Read from the annotations (no image is decoded), e.g. for anchor statistics.
        """
        base = self._train_base
        sizes = [
            torch.from_numpy(base._boxes[i][:, 2:] - base._boxes[i][:, :2]) * (self.image_size / max(h, w))
            for i, (h, w) in enumerate(base.sizes)
            if h and w
        ]
        return torch.cat(sizes) if sizes else torch.zeros(0, 2)

    def _split(self, split: str) -> TransformedDataset:
        size = self.image_size
        if split == "train":
            return TransformedDataset(self._train_base, train_transforms(size), size)
        base = CocoDetection(*self.paths[split], category_ids=self.category_ids)
        return TransformedDataset(base, val_transforms(size), size)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._split("train")
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._split("val")
        if stage in ("test", "predict", None) and self.test_set is None:
            self.test_set = self._split("test")

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DetectionDataModule: call setup() for this stage before asking for its dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (the validation split unless ``test_*`` are set), in order."""
        return self._loader(self.test_set, shuffle=False)


def _check_args(image_size: int, batch_size: int, num_workers: int) -> None:
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32 (the largest stride), got {image_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
