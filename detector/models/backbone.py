"""What the YOLOv3 neck needs from a backbone: feature maps at strides 8, 16, 32 and their channels."""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """Base class of the networks :class:`detector.models.YOLOv3` takes as its ``backbone``.

    A subclass sets ``out_channels`` in ``__init__``: the channels of the feature maps it returns,
    shallow to deep, e.g. ``[128, 256, 512]``. Its ``forward`` maps ``images [B, 3, H, W]`` (H, W
    multiples of 32) to those maps, ``[B, out_channels[i], H/s_i, W/s_i]`` with strides
    ``s = 8, 16, 32`` (three maps), or ``16, 32`` (two maps, for a two-scale neck such as
    ``yolov3-tiny``'s). The class is chosen by its import path in a config
    (``model.backbone.class_path``), so a new backbone needs no edit inside ``detector/``.
    """

    out_channels: list[int]

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> feature maps shallow to deep (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images) -> list of feature maps")
