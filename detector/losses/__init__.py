"""Pluggable losses: elementwise classification/objectness losses, box losses and PISA wrappers."""

from .base import BoxLoss, BoxSet, ClassificationLoss, SampleInfo
from .box import CIoULoss, DarknetBoxLoss, DIoULoss, GIoULoss
from .classification import BCE, FocalLoss, SoftmaxCrossEntropy
from .ghm import GHMC
from .objectness import BCEObjectness, MSEObjectness
from .pisa import CARL, ISR
from .recipe import load_recipe
from .yolo_loss import YOLOLoss

__all__ = [
    "BCE",
    "BCEObjectness",
    "BoxLoss",
    "BoxSet",
    "CARL",
    "CIoULoss",
    "ClassificationLoss",
    "DIoULoss",
    "DarknetBoxLoss",
    "FocalLoss",
    "GHMC",
    "GIoULoss",
    "ISR",
    "MSEObjectness",
    "SampleInfo",
    "SoftmaxCrossEntropy",
    "YOLOLoss",
    "load_recipe",
]
