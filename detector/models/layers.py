"""Darknet building blocks: conv-BN-LeakyReLU and the residual bottleneck (YOLOv3, arXiv 1804.02767)."""

from __future__ import annotations

from torch import Tensor, nn


class ConvBNAct(nn.Sequential):
    """``Conv2d(k, stride, padding k//2, no bias) -> BatchNorm2d -> LeakyReLU(0.1)``: [B, c_in, H, W] -> [B, c_out, H/s, W/s]."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
            nn.BatchNorm2d(c_out, momentum=0.03, eps=1e-3),
            nn.LeakyReLU(0.1, inplace=True),
        )


class Residual(nn.Module):
    """Darknet-53 residual block: ``x + conv3x3(conv1x1(x, c/2), c)``, shape-preserving."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block = nn.Sequential(ConvBNAct(c, c // 2, 1), ConvBNAct(c // 2, c, 3))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, c, H, W]`` -> ``[B, c, H, W]``: the input plus the block's output."""
        return x + self.block(x)
