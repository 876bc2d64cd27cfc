"""Datasets, transforms, collate and the LightningDataModule (see each module's docstring)."""

from detector.data.datamodule import DetectionDataModule
from detector.data.pipeline.collate import TARGET_KEYS, collate
from detector.data.pipeline.dataset import TransformedDataset
from detector.data.pipeline.transforms import letterbox_params, train_transforms, val_transforms
from detector.data.readers.base import DetectionSource
from detector.data.readers.checks import CheckReport
from detector.data.readers.coco import CocoDetection, load_coco_json
from detector.data.readers.formats import open_dataset
from detector.data.readers.voc import VocDetection
from detector.data.readers.yolo import YoloDetection
from detector.data.shapes import SHAPES_CLASSES, ShapesConfig, ensure_shapes

__all__ = [
    "SHAPES_CLASSES",
    "TARGET_KEYS",
    "CheckReport",
    "CocoDetection",
    "DetectionSource",
    "DetectionDataModule",
    "ShapesConfig",
    "TransformedDataset",
    "VocDetection",
    "YoloDetection",
    "collate",
    "ensure_shapes",
    "letterbox_params",
    "load_coco_json",
    "open_dataset",
    "train_transforms",
    "val_transforms",
]
