"""YOLOv3: backbone, the upsample-and-concatenate neck, and one detection head per scale.

Paper: Redmon & Farhadi, "YOLOv3: An Incremental Improvement", arXiv 1804.02767.
The network maps images ``[B, 3, H, W]`` to one raw tensor per scale, shallow (stride 8) to
deep (stride 32): ``[B, A, H/s, W/s, 5 + C]`` = (tx, ty, tw, th, objectness, class logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .darknet import Darknet53, TinyDarknet
from .darknet_weights import is_darknet_file, load_darknet
from .layers import ConvBNAct

# The nine COCO anchors of yolov3.cfg (pixels at 416), three per scale, stride 8 / 16 / 32.
COCO_ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]
TINY_ANCHORS = [[(10, 14), (23, 27), (37, 58)], [(81, 82), (135, 169), (344, 319)]]
STRIDES = (8, 16, 32)  # of the backbone's feature maps, shallow to deep (a two-scale network uses the last two)


@dataclass(frozen=True)
class Preset:
    """One named architecture: a backbone and the neck, heads and anchors sized for it.

    backbone:   builds the preset's own backbone (used when no ``backbone`` is given to :class:`YOLOv3`).
    mids:       the neck's middle channels per scale, shallow to deep; their number is the number of scales.
    set_layers: convs in each scale's alternating 1x1/3x3 "conv set" (5 in YOLOv3).
    anchors:    default anchors per scale, pixels.
    """

    backbone: Callable[[], Backbone]
    mids: tuple[int, ...]
    set_layers: tuple[int, ...]
    anchors: Sequence[Sequence[tuple[float, float]]]


PRESETS: dict[str, Preset] = {
    "yolov3": Preset(
        partial(Darknet53, (32, 64, 128, 256, 512, 1024), (1, 2, 8, 8, 4)), (128, 256, 512), (5, 5, 5), COCO_ANCHORS
    ),
    "yolov3-tiny": Preset(TinyDarknet, (128, 256), (0, 1), TINY_ANCHORS),
    # Darknet-53 at 1/4 width and ~1/4 depth: trains at 30+ images/s at 320 px on 2 CPU cores.
    "nano": Preset(
        partial(Darknet53, (8, 16, 32, 64, 128, 256), (1, 1, 2, 2, 1)), (32, 64, 128), (3, 3, 3), COCO_ANCHORS
    ),
}


def _out_channels(backbone: nn.Module, preset: str) -> list[int]:
    """The backbone's ``out_channels``, checked against the preset's number of scales."""
    chans = getattr(backbone, "out_channels", None)
    name = type(backbone).__name__
    if not isinstance(chans, (list, tuple)) or not chans or not all(isinstance(c, int) and c > 0 for c in chans):
        raise ValueError(
            f"backbone {name} must set out_channels (its feature maps' channels, shallow to deep), got {chans!r}"
        )
    scales = len(PRESETS[preset].mids)
    if len(chans) != scales:
        fitting = sorted(k for k, p in PRESETS.items() if len(p.mids) == len(chans))
        raise ValueError(
            f"backbone {name} returns {len(chans)} feature maps (out_channels {list(chans)}), but preset {preset!r} "
            f"has {scales} scales; choose a preset with {len(chans)}: {fitting}"
        )
    return list(chans)


def conv_set(c_in: int, mid: int, layers: int) -> nn.Sequential:
    """Alternating 1x1 (-> mid) and 3x3 (-> 2·mid) convs, starting with 1x1; ``layers`` may be 0."""
    mods, c = [], c_in
    for i in range(layers):
        c_out, k = (mid, 1) if i % 2 == 0 else (2 * mid, 3)
        mods.append(ConvBNAct(c, c_out, k))
        c = c_out
    return nn.Sequential(*mods)


class YOLOv3(nn.Module):
    """YOLOv3 detector network: a backbone, the upsample-and-concatenate neck, one head per scale.

    As torchvision's ``RetinaNet(backbone, ...)``, the backbone may be given: any
    :class:`~detector.models.Backbone` (``out_channels`` and feature maps at strides 8, 16, 32, or
    16, 32). The preset then supplies the rest: neck widths, conv-set depths and default anchors;
    its number of scales must equal the backbone's number of feature maps.

    Args:
        num_classes: C, the number of object classes.
        preset: a key of ``PRESETS`` ("yolov3", "yolov3-tiny", "nano").
        anchors: anchors per scale in pixels, shallow to deep; the preset's when None.
        weights: optional path of a local file to load, never downloaded: a state dict or Lightning
            checkpoint, or darknet weights (``yolov3.weights``, ``darknet53.conv.74``; see
            :func:`detector.models.darknet_weights.load_darknet`), told apart by their content.
        backbone: the backbone; the preset's own (built here) when None.
    """

    anchors: Tensor  # [S, A, 2] pixels, a registered buffer (declared so type checkers see a Tensor)

    def __init__(
        self,
        num_classes: int,
        preset: str = "nano",
        anchors: list[list[tuple[float, float]]] | None = None,
        weights: str | None = None,
        backbone: Backbone | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        spec = PRESETS[preset]
        anchors = [list(a) for a in (anchors if anchors is not None else spec.anchors)]
        if len(anchors) != len(spec.mids) or len({len(a) for a in anchors}) != 1:
            raise ValueError(
                f"preset {preset!r} needs {len(spec.mids)} scales with the same number of anchors each, got {anchors}"
            )
        self.preset, self.num_classes = preset, num_classes
        self.num_anchors = len(anchors[0])
        self.strides = list(STRIDES[-len(spec.mids) :])
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))  # [S, A, 2] pixels
        self.backbone = backbone if backbone is not None else spec.backbone()
        chans, mids = _out_channels(self.backbone, preset), spec.mids
        n_out = self.num_anchors * (5 + num_classes)
        self.sets, self.heads, self.routes = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(mids))):  # deep to shallow
            c_in = chans[i] + (mids[i + 1] // 2 if i + 1 < len(mids) else 0)
            self.sets.append(conv_set(c_in, mids[i], spec.set_layers[i]))
            c_set = mids[i] if spec.set_layers[i] else c_in
            self.heads.append(nn.Sequential(ConvBNAct(c_set, 2 * mids[i], 3), nn.Conv2d(2 * mids[i], n_out, 1)))
            if i > 0:
                self.routes.append(nn.Sequential(ConvBNAct(c_set, mids[i] // 2, 1), nn.Upsample(scale_factor=2.0)))
        self._init_bias()
        if weights:
            self.load_weights(weights)

    def _init_bias(self, image_size: int = 416) -> None:
        """Prior biases (as in RetinaNet, arXiv 1708.02002 §4.1): ~8 objects per image per scale, uniform classes."""
        for head, stride in zip(self.heads, reversed(self.strides)):
            bias = head[-1].bias.view(self.num_anchors, -1)  # type: ignore[index]  # heads are Sequentials
            with torch.no_grad():
                bias[:, 4] = math.log(8 / (image_size / stride) ** 2)
                bias[:, 5:] = math.log(0.6 / max(self.num_classes - 0.99, 1e-3))

    def load_weights(self, path: str) -> None:
        """Load a local state dict or Lightning checkpoint (``state_dict`` keys prefixed ``model.``),
        or darknet weights (any file that is neither a zip archive nor a pickle).

        Tensors whose shapes differ (e.g. heads for another number of classes) are skipped and listed.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"pretrained weights file {path!r} does not exist")
        if is_darknet_file(path):
            print(load_darknet(self, path))
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        own = self.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(fits))
        if not fits:
            raise ValueError(f"no tensor of {path!r} fits this model: is it a YOLOv3 checkpoint of the same preset?")
        self.load_state_dict(fits, strict=False)
        if skipped:
            print(
                f"load_weights: {len(fits)} tensors loaded, {len(skipped)} skipped (shape or name differs): {skipped[:5]} ..."
            )

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B, 3, H, W]`` (H, W multiples of 32) -> per scale ``[B, A, H/s, W/s, 5 + C]``, stride 8 first."""
        feats = self.backbone(images)
        if not torch.jit.is_tracing():  # export traces one input size, which the check cannot change
            _check_features(feats, images, self.strides, type(self.backbone).__name__)
        outs, x = [], None
        for j, (cset, head) in enumerate(zip(self.sets, self.heads)):
            f = feats[-1 - j]
            x = cset(f if x is None else torch.cat([x, f], 1))
            y = head(x)
            b, _, h, w = y.shape
            outs.append(y.view(b, self.num_anchors, -1, h, w).permute(0, 1, 3, 4, 2))
            if j < len(self.routes):
                x = self.routes[j](x)
        return outs[::-1]


def _check_features(feats: list[Tensor], images: Tensor, strides: list[int], name: str) -> None:
    """A backbone's maps must match the neck: one per scale, the deepest at the last stride (the neck's
    upsample-and-concatenate then pins the others); otherwise boxes would decode at wrong strides."""
    if len(feats) != len(strides):
        raise ValueError(f"backbone {name} returned {len(feats)} feature maps for a {len(strides)}-scale neck")
    deep, side = tuple(feats[-1].shape[-2:]), tuple(images.shape[-2:])
    if deep != (side[0] // strides[-1], side[1] // strides[-1]):
        raise ValueError(
            f"backbone {name}: its deepest feature map is {deep} for a {side} input, not {side[0] // strides[-1]}, "
            f"{side[1] // strides[-1]} (stride {strides[-1]}; input sides must be multiples of 32)"
        )
