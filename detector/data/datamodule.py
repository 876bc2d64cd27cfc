"""The LightningDataModule: COCO, YOLO or VOC files (or the embedded shapes set) -> batches.

Batches follow ``detector.data.pipeline.collate`` (images float32 (B, 3, S, S) in [0, 1], targets a
list of ``detector.structures.Target``). Class names and category ids are known right after
``__init__`` (read from the training annotation file, or given, e.g. from a checkpoint), so the
CLI links them into the model (``model.class_names``, ``model.category_ids``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import torch
from torch.utils.data import DataLoader

from detector.data.pipeline.dataset import TransformedDataset, evaluation_set, training_set
from detector.data.pipeline.mosaic import check_mosaic, mosaic_epochs
from detector.data.pipeline.samplers import ResumableDataLoader, check_loader_args, detection_loader, global_seed, world
from detector.data.pipeline.transforms import augment_config, check_multi_scale, random_batch_size, resize_batch
from detector.data.readers.base import DetectionSource
from detector.data.readers.checks import Verify
from detector.data.readers.folder import ImageFolder
from detector.data.readers.formats import Format, open_dataset
from detector.data.shapes import ShapesConfig, ensure_shapes
from detector.structures import check_image_size


class DetectionDataModule(L.LightningDataModule):
    """Detection data in COCO JSON, YOLO txt or Pascal VOC layout (``detector.data.readers.formats``);
    relative paths are resolved against ``root``. Class names come from the training split.

    Args:
        root: dataset folder (created when ``embedded`` is set); for YOLO the dataset YAML or its folder.
        format: "coco", "yolo" or "voc".
        train_split / val_split / test_split: split names (COCO: image folder and annotation stem;
            YOLO: keys of the YAML; VOC: ``ImageSets/Main/<split>.txt``); test ``None`` = validation.
        train_images / train_annotations, val_…, test_…: explicit image folders and annotation
            files overriding what the split name implies (COCO and VOC).
        class_names: VOC class list (default: the sorted object names of the training split).
        category_ids: with ``class_names``, the label -> (dataset id, name) mapping to use instead of
            the training split's, e.g. a checkpoint's (the CLI passes it for validate/test/predict
            ``--ckpt_path``). Then ``__init__`` reads no data: each split is opened when a stage needs
            it, so predicting on ``predict_images`` reads neither the dataset nor ``root``.
        keep_difficult: VOC: keep objects marked difficult (default: left out, as mmdetection).
        strict: bad input (missing/corrupt images, broken boxes, …) raises instead of being skipped
            and counted in one warning (``detector.data.readers.checks``).
        verify: "header" (cheap checks) or "decode" (decode every image once at start).
        embedded: generate the built-in shapes dataset into ``root`` with this config.
        image_size: square model input side (letterboxed), a multiple of 32.
        batch_size: images per batch (per process under DDP).
        num_workers: dataloader worker processes (0 = load in the main process).
        pin_memory: pin batches in page-locked memory (useful on GPU).
        augment: the training augmentation, a list of albumentations transforms (``class_path``/
            ``init_args`` in a config), run after the letterbox (or mosaic) with the template's box
            handling; ``None`` = ``default_augment()`` (scale/translate, horizontal flip, HSV jitter).
            See ``docs/augmentation.md``.
        mosaic: probability that a training image is a 2 x 2 mosaic of four images (0 = off).
        close_mosaic: no mosaic in the last this many training epochs (YOLOX), 0 = mosaic to the end.
        multi_scale: ``[low, high]``: each training batch is resized on device to a random multiple
            of 32 in this range (drawn from ``(seed, step)``); ``None`` = always ``image_size``.
        cache: decode every train/val image once into RAM, resized to ``image_size`` (see
            ``detector.data.pipeline.cache`` for the memory it takes).
        seed: seed of the training order and augmentation (``detector.data.pipeline.samplers``); ``None`` =
            the global seed of ``seed_everything`` (the CLI's ``seed_everything``), read at ``setup``.
        predict_images: ``predict`` on this folder of images (suffixes: ``readers.base.IMAGE_SUFFIXES``;
            absolute or relative to the working directory) instead of the test split; ``None`` = the test split.

    Training data is a pure function of (seed, epoch), resumable mid-epoch: ``state_dict`` records
    how many batches of which epoch the training loader has handed out, ``load_state_dict`` makes
    the next training loader continue from there. Evaluation and predict loaders visit every image
    exactly once, also under DDP (each rank a disjoint share, no padding).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        format: Format = "coco",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        keep_difficult: bool = False,
        strict: bool = False,
        verify: Verify = "header",
        embedded: ShapesConfig | None = None,
        image_size: int = 320,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        augment: list[A.BasicTransform | A.BaseCompose] | None = None,
        mosaic: float = 0.0,
        close_mosaic: int = 0,
        multi_scale: tuple[int, int] | None = None,
        cache: bool = False,
        seed: int | None = None,
        predict_images: str | None = None,
    ):
        super().__init__()
        # class_names/category_ids: the model logs the resolved mapping; a None here would clash
        self.save_hyperparameters(ignore=["class_names", "category_ids", "augment"])
        check_image_size(image_size)
        check_loader_args(batch_size, num_workers)
        check_mosaic(mosaic, close_mosaic)
        self.multi_scale = check_multi_scale(multi_scale)
        self.hparams["augment"] = augment_config(augment)  # plain data: checkpoints load with weights_only
        self.augment = augment
        # Single-threaded OpenCV, set before any worker is forked: loader processes must not crowd the
        # training threads, and a forked child of a process with a live cv2 thread pool can deadlock.
        cv2.setNumThreads(1)
        if embedded is not None and format != "coco":
            raise ValueError(f"data.embedded generates COCO files; set data.format: coco (got {format!r})")
        self._embedded, self._root_ready = embedded, False
        if category_ids is None or predict_images is None:  # data will be read: fail early on a missing root
            self._prepare_root()
        val = (val_split, val_images, val_annotations)
        self.splits: dict[str, tuple[str, str | None, str | None]] = {
            "train": (train_split, train_images, train_annotations),
            "val": val,
            "test": val
            if test_split is None and test_images is None and test_annotations is None
            else (test_split or val_split, test_images, test_annotations),
        }
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.mosaic, self.close_mosaic, self.cache = mosaic, close_mosaic, cache
        self._train_base: DetectionSource | None = None
        if category_ids is None:  # the training split defines the classes
            self._train_base = self._open("train", class_names=class_names)
            category_ids, class_names = self._train_base.category_ids, self._train_base.class_names
        elif class_names is None or len(class_names) != len(category_ids):
            raise ValueError(f"category_ids ({len(category_ids)} ids) need as many class_names, got {class_names}")
        self.category_ids: list[int] = list(category_ids)
        self.class_names: list[str] = list(class_names)
        self.num_classes: int = len(self.category_ids)
        self.train_set: TransformedDataset | None = None
        self.val_set: TransformedDataset | None = None
        self.test_set: TransformedDataset | None = None
        self.predict_set: TransformedDataset | None = None
        self.seed = seed
        self.predict_images = Path(predict_images) if predict_images is not None else None
        if self.predict_images is not None and not self.predict_images.is_dir():
            raise FileNotFoundError(f"predict_images folder not found: {self.predict_images}")
        self._train_loader: ResumableDataLoader | None = None
        self._resume: dict[str, int] | None = None  # from load_state_dict, for the next training loader

    def train_box_sizes(self) -> torch.Tensor:
        """Training box sizes ``[N, 2]`` (w, h) in input pixels, each image letterboxed to ``image_size``.

        Read from the annotations (no image is decoded), e.g. for anchor statistics.
        """
        base = self._train_source()
        sizes = [
            torch.from_numpy(base.boxes[i][:, 2:] - base.boxes[i][:, :2]) * (self.image_size / max(h, w))
            for i, (h, w) in enumerate(base.sizes)
            if h and w
        ]
        return torch.cat(sizes) if sizes else torch.zeros(0, 2)

    def _train_source(self) -> DetectionSource:
        """The training split, opened on first use when the class mapping was given."""
        if self._train_base is None:
            self._train_base = self._open("train", category_ids=self.category_ids, class_names=self.class_names)
        return self._train_base

    def _prepare_root(self) -> None:
        """Generate the embedded dataset into ``root``, or check that ``root`` exists (once)."""
        root = Path(self.hparams["root"])
        if self._root_ready:
            return
        if self._embedded is not None:
            ensure_shapes(root, self._embedded)
        elif not root.exists():
            raise FileNotFoundError(f"data root not found: {root} (set data.root, or data.embedded to generate shapes)")
        self._root_ready = True

    def _open(self, split: str, **mapping: Any) -> DetectionSource:
        """One split through ``open_dataset``; ``mapping``: the training split's class mapping."""
        name, images, annotations = self.splits[split]
        h = self.hparams
        self._prepare_root()
        return open_dataset(
            h["format"],
            h["root"],
            name,
            images=images,
            annotations=annotations,
            strict=h["strict"],
            verify=h["verify"],
            keep_difficult=h["keep_difficult"],
            **mapping,
        )

    def _split(self, split: str) -> TransformedDataset:
        if split == "train":
            train, aug = self._train_source(), self.augment
            return training_set(train, self.image_size, aug, self.mosaic, self.cache, self._seed)
        base = self._open(split, category_ids=self.category_ids, class_names=self.class_names)
        return evaluation_set(base, self.image_size, self.cache)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (all for ``None``), once each, and fix the training seed."""
        self._seed = self.seed if self.seed is not None else global_seed()
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self._split("train")
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = self._split("val")
        if (
            stage in ("test", "predict", None)
            and self.test_set is None
            and not (stage == "predict" and self.predict_images)
        ):
            self.test_set = self._split("test")
        if stage in ("predict", None) and self.predict_images is not None and self.predict_set is None:
            self.predict_set = evaluation_set(ImageFolder(self.predict_images), self.image_size)

    def _loader(self, dataset: TransformedDataset | None, train: bool = False) -> DataLoader:
        """Training: ``TrainSampler`` order, resumable; else every image once, in order (a share per rank)."""
        if dataset is None:
            raise RuntimeError("DetectionDataModule: call setup() for this stage before asking for its dataloader")
        epoch = self._start_epoch() if train else 0
        args = (self.batch_size, self.num_workers, self.pin_memory)
        return detection_loader(dataset, world(self.trainer), *args, train=train, seed=self._seed, epoch=epoch)

    def train_dataloader(self) -> DataLoader:
        """The resumable training loader (``TrainSampler`` order), continuing a checkpointed run where it stopped."""
        self._close_mosaic()
        loader = self._loader(self.train_set, train=True)
        assert isinstance(loader, ResumableDataLoader)  # what train=True builds
        if self._resume is not None:  # continue a checkpointed run where it stopped
            loader.resume(self._resume["epoch"], self._resume["batches"])
            self._resume = None
        self._train_loader = loader
        return loader

    def _start_epoch(self) -> int:
        if self._resume is not None:
            return self._resume["epoch"]
        return self.trainer.current_epoch if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """Where the training stream stands: ``{"epoch", "batches"}`` to run next (saved in checkpoints)."""
        if self._train_loader is None:
            return dict(self._resume) if self._resume is not None else {}
        epoch, batches = self._train_loader.progress()
        limit = len(self._train_loader)
        if self.trainer is not None and isinstance(self.trainer.num_training_batches, int):
            limit = min(limit, self.trainer.num_training_batches)  # limit_train_batches ends epochs early
        if batches >= limit:  # the epoch is over: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training loader start at ``state_dict``'s epoch and batch (``fit --ckpt_path``)."""
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def _close_mosaic(self) -> None:
        """Mosaic only in epochs ``< max_epochs - close_mosaic`` (before the workers copy the dataset)."""
        tiler = self.train_set.mosaic if self.train_set is not None else None
        if tiler is None or not self.close_mosaic:
            return
        max_epochs = self.trainer.max_epochs if self.trainer is not None else None
        tiler.mosaic_epochs = mosaic_epochs(max_epochs, self.close_mosaic)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Multi-scale training: resize each training batch (on its device) to a random size (see ``multi_scale``)."""
        if self.multi_scale is None or self.trainer is None or not self.trainer.training:
            return batch
        images, targets = batch
        size = random_batch_size(self._seed, self.trainer.global_step, *self.multi_scale)
        return resize_batch(images, targets, size)

    def val_dataloader(self) -> DataLoader:
        """Every validation image once, in file order (a disjoint share per rank under DDP)."""
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """Every test image once, in file order (a disjoint share per rank under DDP)."""
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_images`` folder when set, else the test split (the validation split unless
        ``test_*`` are set), in order."""
        return self._loader(self.predict_set if self.predict_images is not None else self.test_set)
