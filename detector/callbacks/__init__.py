"""Callbacks used by the configs: ``class_path: detector.callbacks.<Name>``."""

from .analysis import DetectionAnalysis
from .diagnostics import ImbalanceDiagnostics, ImbalanceStats
from .ema import EMA
from .finetune import FreezeBackbone
from .monitors import EpochTimer, LearningRateMonitor, ThroughputMonitor
from .predictions import CocoPredictionWriter
from .results import ResultsWriter
from .wandb_media import WandbClassAP, WandbDetectionImages
from .wandb_run import WandbRunInfo

__all__ = [
    "EMA",
    "CocoPredictionWriter",
    "DetectionAnalysis",
    "EpochTimer",
    "FreezeBackbone",
    "ImbalanceDiagnostics",
    "ImbalanceStats",
    "LearningRateMonitor",
    "ResultsWriter",
    "ThroughputMonitor",
    "WandbClassAP",
    "WandbDetectionImages",
    "WandbRunInfo",
]
