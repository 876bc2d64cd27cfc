"""YOLOv3 networks and their presets."""

from .yolo import COCO_ANCHORS, PRESETS, Preset, YOLOv3

__all__ = ["COCO_ANCHORS", "PRESETS", "Preset", "YOLOv3"]
