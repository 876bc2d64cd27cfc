"""Darknet ``.weights`` files (``yolov3.weights``, ``yolov3-tiny.weights``, ``darknet53.conv.74``) in
and out of our networks.

Format (darknet's ``src/parser.c``, ``load_weights_upto`` / ``save_weights_upto``): a header of
int32 ``major, minor, revision``, then ``seen`` (images trained on) as int64 when
``major·10 + minor >= 2`` and ``major, minor < 1000``, else int32 (a 20- or 16-byte header); then
float32 arrays, per ``[convolutional]`` section in cfg order (see :mod:`.darknet_cfg`):
with batch norm ``beta[n], gamma[n], running_mean[n], running_var[n]``, without it ``bias[n]``,
then ``weight[n, c, k, k]`` (PyTorch's own layout). A file may hold only the first convolutions:
``darknet partial yolov3.cfg yolov3.weights darknet53.conv.74 74`` keeps sections 0..73, the 52
convolutions of Darknet-53. Little-endian (the machines darknet runs on).

Batch norm: darknet's GPU code (and its training) normalises with ``(x − mean) / √(var + 1e-5)``,
ours with ``√(var + eps)``, eps = 1e-3. Reading scales gamma by ``√(var + eps) / √(var + 1e-5)``
(writing by the inverse), so the layer computes darknet's function exactly in eval mode, also for
channels with a tiny variance, where the two eps differ most.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .darknet_cfg import DarknetLayer, backbone_sections, darknet_layers

if TYPE_CHECKING:
    from .yolo import YOLOv3

DARKNET_BN_EPS = 1e-5


@dataclass(frozen=True)
class Header:
    """A ``.weights`` header; ``nbytes`` is 20 (int64 ``seen``) or 16 (int32 ``seen``)."""

    major: int
    minor: int
    revision: int
    seen: int
    nbytes: int


def read_header(path: str | Path) -> Header:
    """Darknet's header rule: ``seen`` is int64 when ``major·10 + minor >= 2`` and both are < 1000."""
    with open(path, "rb") as f:
        header_bytes = f.read(20)
    if len(header_bytes) < 16:
        raise ValueError(f"{str(path)!r} is too short ({len(header_bytes)} bytes) for a darknet weights header")
    major, minor, revision = struct.unpack("<3i", header_bytes[:12])
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        if len(header_bytes) < 20:
            raise ValueError(f"{str(path)!r} is too short ({len(header_bytes)} bytes) for a 20-byte darknet header")
        return Header(major, minor, revision, struct.unpack("<q", header_bytes[12:20])[0], 20)
    return Header(major, minor, revision, struct.unpack("<i", header_bytes[12:16])[0], 16)


def is_darknet_file(path: str | Path) -> bool:
    """False for PyTorch files (a zip archive, or a legacy pickle starting with 0x80), True otherwise."""
    with open(path, "rb") as f:
        first = f.read(1)
    return not (zipfile.is_zipfile(path) or first == b"\x80")


def _convs(model: YOLOv3) -> list[tuple[int, DarknetLayer]]:
    """(cfg section index, layer) of every ``[convolutional]``, in cfg order."""
    return [(i, layer) for i, layer in enumerate(darknet_layers(model)) if layer.kind == "convolutional"]


def _numel(layer: DarknetLayer) -> int:
    assert layer.conv is not None
    return layer.conv.weight.numel() + layer.conv.out_channels * (4 if layer.bn is not None else 1)


def _darknet_arrays(layer: DarknetLayer) -> list[Tensor]:
    """The layer's arrays in file order, gamma converted to darknet's eps (see the module docstring)."""
    conv, bn = layer.conv, layer.bn
    assert conv is not None
    if bn is None:
        assert conv.bias is not None
        return [conv.bias, conv.weight]
    var = bn.running_var.double()  # type: ignore[union-attr]  # BatchNorm2d tracks running stats
    gamma = bn.weight.double() * (var + DARKNET_BN_EPS).sqrt() / (var + bn.eps).sqrt()
    return [bn.bias, gamma, bn.running_mean, bn.running_var, conv.weight]  # type: ignore[list-item]


@torch.no_grad()
def _assign(layer: DarknetLayer, flat: Tensor, where: str) -> None:
    """Copy one conv's floats (darknet order) into our tensors."""
    conv, bn = layer.conv, layer.bn
    assert conv is not None
    n = conv.out_channels
    if bn is None:
        assert conv.bias is not None
        conv.bias.copy_(flat[:n])
        conv.weight.copy_(flat[n:].view_as(conv.weight))
        return
    beta, gamma, mean, var = flat[: 4 * n].double().view(4, n)
    if not (var >= 0).all():
        raise ValueError(f"{where}: negative running variance: is this a darknet weights file of this network?")
    bn.bias.copy_(beta)
    bn.weight.copy_(gamma * (var + bn.eps).sqrt() / (var + DARKNET_BN_EPS).sqrt())
    bn.running_mean.copy_(mean)  # type: ignore[union-attr]
    bn.running_var.copy_(var)  # type: ignore[union-attr]
    conv.weight.copy_(flat[4 * n :].view_as(conv.weight))


def _other_classes(convs: list[DarknetLayer], n: int, num_anchors: int) -> int | None:
    """The class count C' of a whole-network file of ``n`` floats whose output convs are for C' classes."""
    outs = [c.conv for c in convs if c.bn is None and c.conv is not None]
    base = sum(_numel(c) for c in convs) - sum(_numel(c) for c in convs if c.bn is None)
    unit = sum((c.weight[0].numel() + 1) * num_anchors for c in outs)  # floats per unit of 5 + C
    rest = n - base
    return rest // unit - 5 if rest > 0 and rest % unit == 0 and rest // unit > 5 else None


def _plan(model: YOLOv3, n: int, cutoff: int | None, where: str) -> tuple[int, int | None]:
    """How many convs a file of ``n`` floats fills, and the class count of its output convs when not ours."""
    pairs = _convs(model)
    convs, index = [layer for _, layer in pairs], [i for i, _ in pairs]
    cum = list(accumulate((_numel(c) for c in convs), initial=0))  # cum[k]: floats of the first k convs
    if cutoff is not None:
        k = sum(i < cutoff for i in index)
        if n == cum[k]:
            return k, None
        raise ValueError(
            f"{where} holds {n} floats, but the first {cutoff} darknet layers ({k} conv) of preset "
            f"{model.preset!r} with {model.num_classes} classes take {cum[k]}"
        )
    if n in cum[1:]:
        return cum.index(n), None
    other = _other_classes(convs, n, model.num_anchors)
    if other is not None:
        return len(convs), other
    n_bb = len(backbone_sections(model.backbone)[0])  # sections of the backbone: 75 for Darknet-53 (.conv.74 keeps 74)
    k_bb = sum(i < n_bb for i in index)
    raise ValueError(
        f"{where} holds {n} floats, but preset {model.preset!r} with {model.num_classes} classes takes "
        f"{cum[-1]} (whole network, {len(convs)} conv) or {cum[k_bb]} (backbone, first {n_bb} layers, {k_bb} conv) "
        "or another whole number of leading conv layers: is the file for another cfg or preset?"
    )


def darknet_size(model: YOLOv3, cutoff: int | None = None) -> int:
    """Bytes of the file :func:`save_darknet` writes (20-byte header, 4 per float): 248007048 for
    ``yolov3`` with 80 classes, 162482580 with ``cutoff=74`` (``darknet53.conv.74``)."""
    return 20 + 4 * sum(_numel(layer) for i, layer in _convs(model) if cutoff is None or i < cutoff)


def load_darknet(model: YOLOv3, path: str | Path, cutoff: int | None = None) -> str:
    """Load a darknet ``.weights`` file into ``model`` and return a one-line summary.

    What the file holds is found from its size: the whole network (for ``model.num_classes``, or for
    another class count, whose output convs are then skipped and keep their initialisation) or the
    first k conv layers (``darknet53.conv.74``: the backbone). ``cutoff`` (or a file name ending in
    ``.conv.<N>``, darknet's ``partial`` convention) asks for exactly the first N cfg sections.
    Raises ``ValueError`` naming the floats found and expected when the file does not fit.
    """
    path = Path(path)
    where = f"darknet weights {str(path)!r}"
    if cutoff is None and path.suffixes[-2:-1] == [".conv"] and path.suffix[1:].isdigit():
        cutoff = int(path.suffix[1:])
    header = read_header(path)
    size = path.stat().st_size - header.nbytes
    if size % 4:
        raise ValueError(
            f"{where}: {size} bytes after the {header.nbytes}-byte header is not a whole number of float32"
        )
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=header.nbytes))
    k, other = _plan(model, flat.numel(), cutoff, where)
    if not torch.isfinite(flat).all():
        raise ValueError(f"{where} holds NaN or Inf values")
    offset, skipped = 0, 0
    for i, layer in _convs(model)[:k]:
        assert layer.conv is not None
        numel = _numel(layer)
        if other is not None and layer.bn is None:  # an output conv for another class count
            numel = (layer.conv.weight[0].numel() + 1) * model.num_anchors * (5 + other)
            skipped += 1
        else:
            _assign(layer, flat[offset : offset + numel], f"{where}, layer {i}")
        offset += numel
    what = "whole network" if k == len(_convs(model)) else f"first {k} conv layers"
    note = f"; {skipped} output convs for {other} classes skipped (model: {model.num_classes})" if other else ""
    return f"loaded {where} (header {header.major}.{header.minor}.{header.revision}, seen {header.seen}): {what}{note}"


@torch.no_grad()
def save_darknet(model: YOLOv3, path: str | Path, cutoff: int | None = None, seen: int = 0) -> int:
    """Write ``model`` (its first ``cutoff`` cfg sections when given) as darknet weights; return the floats written.

    The header is darknet's own (``0.2.0``, int64 ``seen``).
    """
    with open(path, "wb") as f:
        f.write(struct.pack("<3iq", 0, 2, 0, seen))
        count = 0
        for i, layer in _convs(model):
            if cutoff is not None and i >= cutoff:
                break
            for t in _darknet_arrays(layer):
                array = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
                f.write(array.tobytes())
                count += array.size
    return count
