"""Box coding for YOLOv3 (arXiv 1804.02767 §2.1) and batched IoU helpers. Pure torch.

Coding of a box with centre (cx, cy) and size (w, h) in pixels, at grid cell (i, j) of a
scale with stride s and anchor (aw, ah):
    cx = (σ(tx) + i)·s,   cy = (σ(ty) + j)·s,   w = aw·exp(tw),   h = ah·exp(th).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_LOG_WH = 8.0  # exp(8) ≈ 3000 × anchor: keeps an untrained head's boxes finite


def flatten_outputs(outputs: list[Tensor]) -> Tensor:
    """Per-scale head outputs ``[B, A, H_s, W_s, K]`` -> one ``[B, N, K]``, N = Σ_s A·H_s·W_s.

    Rows are ordered scale, anchor, row, column: the layout of :func:`anchor_grid`.
    """
    return torch.cat([o.reshape(o.shape[0], -1, o.shape[-1]) for o in outputs], 1)


def anchor_grid(shapes: list[tuple[int, int]], anchors: Tensor, strides: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row constants of the flat layout.

    Args:
        shapes: (H_s, W_s) per scale. anchors: ``[S, A, 2]`` pixels. strides: per scale.
    Returns:
        cells ``[N, 2]`` (i, j) = (column, row), anchor sizes ``[N, 2]`` pixels, strides ``[N, 1]``.
    """
    cells, sizes, steps = [], [], []
    for (h, w), anc, s in zip(shapes, anchors, strides):
        j, i = torch.meshgrid(
            torch.arange(h, device=anchors.device), torch.arange(w, device=anchors.device), indexing="ij"
        )
        ij = torch.stack((i, j), -1).view(1, h * w, 2).expand(len(anc), -1, -1)
        cells.append(ij.reshape(-1, 2))
        sizes.append(anc.view(-1, 1, 2).expand(-1, h * w, -1).reshape(-1, 2))
        steps.append(torch.full((len(anc) * h * w, 1), float(s), device=anchors.device))
    return torch.cat(cells).float(), torch.cat(sizes), torch.cat(steps)


def decode(raw: Tensor, cells: Tensor, anchor_wh: Tensor, strides: Tensor) -> Tensor:
    """Decode raw (tx, ty, tw, th) ``[..., N, >=4]`` to xyxy pixel boxes ``[..., N, 4]``. Differentiable.

    ``cells``, ``anchor_wh`` ``[N, 2]`` and ``strides`` ``[N, 1]`` come from :func:`anchor_grid`.
    """
    xy = (raw[..., :2].sigmoid() + cells) * strides
    wh = raw[..., 2:4].clamp(max=MAX_LOG_WH).exp() * anchor_wh
    return torch.cat((xy - wh / 2, xy + wh / 2), -1)


def encode(boxes: Tensor, cells: Tensor, anchor_wh: Tensor, strides: Tensor) -> Tensor:
    """Darknet's regression targets for xyxy pixel boxes ``[P, 4]`` at their rows' cells.

    Returns ``[P, 4]`` = (cx/s − i, cy/s − j, log(w/aw), log(h/ah)): the first two are compared
    with σ(tx), σ(ty) and lie in [0, 1) for the cell holding the centre; the last two with tw, th.
    ``decode(cat(logit(t[:, :2]), t[:, 2:]))`` gives the boxes back.
    """
    cxcywh = xyxy_to_cxcywh(boxes)
    return torch.cat((cxcywh[:, :2] / strides - cells, torch.log(cxcywh[:, 2:] / anchor_wh)), 1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` corners -> centre and size."""
    return torch.cat(((boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]), -1)


def batched_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU within each batch element: ``[B, N, 4] x [B, M, 4] -> [B, N, M]`` (xyxy).

    The batched counterpart of ``torchvision.ops.box_iou``; an empty box gives IoU 0. Computed
    coordinate by coordinate in a ``[B, M, N]`` layout (N, the long side, innermost, so every
    operation runs over contiguous memory) and returned as a transposed view.
    """
    ax1, ay1, ax2, ay2 = (t.unsqueeze(-2) for t in a.unbind(-1))  # (B, 1, N) each
    bx1, by1, bx2, by2 = (t.unsqueeze(-1) for t in b.unbind(-1))  # (B, M, 1) each
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp_(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp_(min=0)
    inter = iw.mul_(ih)  # (B, M, N)
    area_a = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area_b = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    union = (area_a + area_b).sub_(inter).clamp_(min=1e-9)
    return inter.div_(union).transpose(-1, -2)


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of sizes centred together: ``[N, 2] x [M, 2] -> [N, M]`` (darknet's anchor matching)."""
    inter = torch.minimum(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter).clamp(min=1e-9)


def unletterbox(boxes: Tensor, letterbox: Tensor, orig_size: Tensor) -> Tensor:
    """Map xyxy boxes ``[N, 4]`` from the letterboxed input back to original pixels.

    ``letterbox`` = (scale, pad_x, pad_y) with ``input = orig·scale + pad``; ``orig_size`` = (h, w).
    The result is clipped to the original image.
    """
    scale, pad = letterbox[0], letterbox[1:3].repeat(2)
    out = (boxes - pad) / scale
    h, w = orig_size[0], orig_size[1]
    limits = torch.stack((w, h, w, h)).to(out)
    return torch.minimum(out.clamp(min=0), limits)


def detection_scores(raw: Tensor) -> Tensor:
    """YOLOv3's detection score per (anchor, class): ``σ(obj) · σ(cls)``.

    ``raw [..., 5 + C]`` logits (tx, ty, tw, th, obj, classes) -> ``[..., C]`` in [0, 1].
    """
    return raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()
