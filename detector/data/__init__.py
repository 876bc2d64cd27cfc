"""Datasets, transforms, collate and the LightningDataModule (see each module's docstring)."""

from detector.data.base import DetectionSource
from detector.data.checks import CheckReport
from detector.data.coco import CocoDetection, load_coco_json
from detector.data.collate import TARGET_KEYS, collate
from detector.data.datamodule import DetectionDataModule
from detector.data.dataset import TransformedDataset
from detector.data.formats import open_dataset
from detector.data.shapes import SHAPES_CLASSES, ShapesConfig, ensure_shapes
from detector.data.transforms import letterbox_params, train_transforms, val_transforms
from detector.data.voc import VocDetection
from detector.data.yolo import YoloDetection

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
