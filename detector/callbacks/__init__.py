"""Callbacks used by the configs: ``class_path: detector.callbacks.<Name>``."""

from .monitors import LearningRateMonitor
from .predictions import CocoPredictionWriter

__all__ = ["CocoPredictionWriter", "LearningRateMonitor"]
