"""Backbones: Darknet-53 (YOLOv3, arXiv 1804.02767) with width/depth multipliers, and the
conv + max-pool trunk of YOLOv3-tiny. Each returns its feature maps from shallow to deep."""

from __future__ import annotations

from torch import Tensor, nn

from .backbone import Backbone
from .layers import ConvBNAct, Residual


class Darknet53(Backbone):
    """Darknet-53: a stem conv, then five stride-2 stages of residual blocks.

    ``widths`` are the stem and stage output channels (Darknet-53: 32, 64, 128, 256, 512, 1024),
    ``depths`` the residual blocks per stage (1, 2, 8, 8, 4). ``forward`` returns the outputs of
    the last three stages: ``[B, widths[3], H/8, W/8]``, ``[B, widths[4], H/16, W/16]``,
    ``[B, widths[5], H/32, W/32]``.
    """

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) != 6 or len(depths) != 5:
            raise ValueError(f"Darknet53 needs 6 widths and 5 depths, got {widths} and {depths}")
        self.stem = ConvBNAct(3, widths[0], 3)
        self.stages = nn.ModuleList(
            nn.Sequential(
                ConvBNAct(widths[i], widths[i + 1], 3, 2), *(Residual(widths[i + 1]) for _ in range(depths[i]))
            )
            for i in range(5)
        )
        self.out_channels = list(widths[3:])

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> the last three stages' features, strides 8, 16 and 32."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[2:]


class TinyDarknet(Backbone):
    """YOLOv3-tiny trunk: 3x3 convs (16 .. 1024 channels) with 2x2 max-pools.

    ``forward`` returns ``[B, 256, H/16, W/16]`` and ``[B, 1024, H/32, W/32]`` (before the neck's 1x1).
    """

    def __init__(self) -> None:
        super().__init__()
        chans = (16, 32, 64, 128, 256)
        layers: list[nn.Module] = []
        c_in = 3
        for c in chans:
            layers += [ConvBNAct(c_in, c, 3), nn.MaxPool2d(2, 2)]
            c_in = c
        self.to16 = nn.Sequential(*layers[:-1])  # stops after the 256-channel conv, stride 16
        self.to32 = nn.Sequential(
            nn.MaxPool2d(2, 2),
            ConvBNAct(256, 512, 3),
            # darknet's size-2 stride-1 pool keeps the resolution and ignores the cells past the
            # right/bottom edge: padding with -inf (never the max) rather than 0 (the max of a
            # negative leaky output) gives darknet's edge values
            nn.ConstantPad2d((0, 1, 0, 1), float("-inf")),
            nn.MaxPool2d(2, 1),
            ConvBNAct(512, 1024, 3),
        )
        self.out_channels = [256, 1024]

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> ``[B, 256, H/16, W/16]`` and ``[B, 1024, H/32, W/32]``."""
        p16 = self.to16(x)
        return [p16, self.to32(p16)]
