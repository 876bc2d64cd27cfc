"""YOLOv3 networks, their backbones and presets."""

from .backbone import Backbone
from .darknet import Darknet53, TinyDarknet
from .yolo import COCO_ANCHORS, PRESETS, Preset, YOLOv3

__all__ = ["COCO_ANCHORS", "PRESETS", "Backbone", "Darknet53", "Preset", "TinyDarknet", "YOLOv3"]
