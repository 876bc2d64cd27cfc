"""Our YOLOv3 networks as darknet's layer list (the sections of a ``.cfg`` file), in darknet's order.

Darknet (Redmon, https://github.com/pjreddie/darknet) describes a network as numbered sections:
``[convolutional]``, ``[shortcut]``, ``[maxpool]``, ``[route]``, ``[upsample]``, ``[yolo]``. Only
convolutions carry weights, and a ``.weights`` file stores them in section order. Our modules are
registered in another order (backbone, then all conv sets, all heads, all routes), so
:func:`darknet_layers` walks the network the way ``cfg/yolov3.cfg`` and ``cfg/yolov3-tiny.cfg``
list it: the backbone (Darknet-53: stem, then per stage a stride-2 conv and residual blocks of
1x1 conv, 3x3 conv, shortcut; the tiny trunk: 3x3 convs and max-pools), then per scale, deep
(stride 32) first: the conv set, the head's 3x3 conv, the head's 1x1 output conv (bias, no BN),
``[yolo]``, and before the next scale ``[route] -4`` (back to the set's output), the 1x1 route
conv, ``[upsample]`` and ``[route] -1, <backbone feature>`` (upsampled map first, as our concat).
For ``yolov3`` this gives darknet's 107 sections (75 conv), for ``yolov3-tiny`` its 24 (13 conv).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ..structures import check_image_size
from .darknet import Darknet53, TinyDarknet
from .layers import ConvBNAct, Residual

if TYPE_CHECKING:  # yolo.py imports this module's neighbour darknet_weights at run time
    from .yolo import YOLOv3


@dataclass(frozen=True)
class DarknetLayer:
    """One cfg section: ``kind`` (the section name), its ``options`` (key -> text) and, for a
    convolution, our ``conv`` and its ``bn`` (None for darknet's linear conv with a bias)."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)
    conv: nn.Conv2d | None = None
    bn: nn.BatchNorm2d | None = None


def _conv(module: nn.Module) -> DarknetLayer:
    """A ``ConvBNAct`` (BN, leaky 0.1) or a plain biased ``Conv2d`` (linear) as a ``[convolutional]``."""
    if isinstance(module, ConvBNAct):
        conv, bn, act = module
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.LeakyReLU)
        if act.negative_slope != 0.1 or conv.bias is not None:
            raise ValueError(f"darknet's leaky conv has slope 0.1 and no conv bias: {module}")
        extra, bn_out = {"batch_normalize": "1", "activation": "leaky"}, bn
    elif isinstance(module, nn.Conv2d) and module.bias is not None:
        conv, extra, bn_out = module, {"activation": "linear"}, None
    else:
        raise ValueError(f"no darknet [convolutional] for {module}")
    k, s = conv.kernel_size[0], conv.stride[0]
    if conv.kernel_size != (k, k) or conv.stride != (s, s) or conv.padding != (k // 2, k // 2) or conv.groups != 1:
        raise ValueError(f"darknet convs are square, 'pad=1' (padding k//2) and ungrouped: {conv}")
    options = {"filters": str(conv.out_channels), "size": str(k), "stride": str(s), "pad": "1", **extra}
    return DarknetLayer("convolutional", options, conv, bn_out)


def backbone_sections(backbone: nn.Module) -> tuple[list[DarknetLayer], list[int]]:
    """The backbone's sections and the section index of each feature map it returns, shallow to deep."""
    layers: list[DarknetLayer] = []
    ends: list[int] = []
    if isinstance(backbone, Darknet53):
        layers.append(_conv(backbone.stem))
        for stage in backbone.stages:
            down, *blocks = stage.children()
            layers.append(_conv(down))
            for block in blocks:
                assert isinstance(block, Residual)
                layers += [_conv(m) for m in block.block]
                layers.append(DarknetLayer("shortcut", {"from": "-3", "activation": "linear"}))
            ends.append(len(layers) - 1)
        return layers, ends[-3:]
    if isinstance(backbone, TinyDarknet):
        for part in (backbone.to16, backbone.to32):
            for m in part:
                if isinstance(m, nn.MaxPool2d):
                    layers.append(DarknetLayer("maxpool", {"size": str(m.kernel_size), "stride": str(m.stride)}))
                elif not isinstance(m, nn.ConstantPad2d):  # the pad is part of darknet's size-2 stride-1 pool
                    layers.append(_conv(m))
            ends.append(len(layers) - 1)
        return layers, ends
    raise ValueError(
        f"the darknet format covers the Darknet53 and TinyDarknet backbones, not {type(backbone).__name__}"
    )


def darknet_layers(model: YOLOv3) -> list[DarknetLayer]:
    """``model`` as darknet's sections, in cfg order (see the module docstring)."""
    layers, ends = backbone_sections(model.backbone)
    n_scales, n_anchors = len(model.heads), model.num_anchors
    anchors = ",  ".join(f"{w:g},{h:g}" for w, h in model.anchors.view(-1, 2).tolist())
    for j, (cset, head) in enumerate(zip(model.sets, model.heads)):  # deep (stride 32) first
        if j > 0:
            layers.append(DarknetLayer("upsample", {"stride": "2"}))
            layers.append(DarknetLayer("route", {"layers": f"-1, {ends[-1 - j]}"}))
        layers += [_conv(m) for m in cset.children()]
        layers += [_conv(m) for m in head.children()]  # the 3x3 conv, then the output 1x1
        scale = n_scales - 1 - j  # darknet's mask indexes the anchors listed shallow to deep
        mask = ",".join(str(scale * n_anchors + a) for a in range(n_anchors))
        options = {
            "mask": mask,
            "anchors": anchors,
            "classes": str(model.num_classes),
            "num": str(n_scales * n_anchors),
        }
        layers.append(DarknetLayer("yolo", {**options, "ignore_thresh": ".7", "truth_thresh": "1"}))
        if j < len(model.routes):
            route_conv = next(model.routes[j].children())  # then the nn.Upsample
            layers += [DarknetLayer("route", {"layers": "-4"}), _conv(route_conv)]
    return layers


def cfg_text(model: YOLOv3, image_size: int = 416) -> str:
    """The ``.cfg`` file that darknet (``darknet detector test``) or OpenCV 4's ``readNetFromDarknet``
    reads with the ``.weights`` of :func:`detector.models.darknet_weights.save_darknet`.

    Inputs are RGB in 0..1, letterboxed to ``image_size`` (a multiple of 32), as in our training.
    """
    size = str(check_image_size(image_size))
    net = {"batch": "1", "subdivisions": "1", "width": size, "height": size, "channels": "3"}
    sections = [("net", net)] + [(layer.kind, layer.options) for layer in darknet_layers(model)]
    return "\n".join(f"[{kind}]\n" + "".join(f"{k}={v}\n" for k, v in opts.items()) for kind, opts in sections)
