"""Datasets, transforms, collate and the LightningDataModule (see each module's docstring)."""

from detector.data.coco import CocoDetection, load_coco_json
from detector.data.collate import TARGET_KEYS, collate
from detector.data.datamodule import DetectionDataModule, TransformedDataset
from detector.data.shapes import SHAPES_CLASSES, ShapesConfig, ensure_shapes
from detector.data.transforms import letterbox_params, train_transforms, val_transforms

__all__ = [
    "SHAPES_CLASSES",
    "TARGET_KEYS",
    "CocoDetection",
    "DetectionDataModule",
    "ShapesConfig",
    "TransformedDataset",
    "collate",
    "ensure_shapes",
    "letterbox_params",
    "load_coco_json",
    "train_transforms",
    "val_transforms",
]
