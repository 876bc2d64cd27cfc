"""Darknet's YOLOv3 target assignment (``yolo_layer.c``; docs/losses.md), vectorised.

Each ground truth goes to the one anchor, among all S·A, whose (w, h) shape has the highest
IoU with its own (both centred together), at the grid cell of that anchor's scale that holds
the box centre. With ``iou_thresh`` (AlexeyAB's darknet fork, ``iou_thresh=0.213`` in
yolov4.cfg) every other anchor whose shape IoU exceeds it is a positive too. When two ground
truths land on the same anchor and cell, the later one wins, as in darknet's loop. No Python
loop over boxes or anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..structures import Target
from .boxes import wh_iou


@dataclass
class GroundTruth:
    """The batch's ground truths, concatenated over images (G rows).

    boxes ``[G, 4]`` xyxy input pixels, labels int64 ``[G]``, batch int64 ``[G]`` (image index),
    and ``padded [B, G_max, 4]`` the same boxes per image, zero-padded, for batched IoU.
    """

    boxes: Tensor
    labels: Tensor
    batch: Tensor
    padded: Tensor

    @classmethod
    def from_targets(cls, targets: list[Target], device: torch.device) -> GroundTruth:
        """Gather the ``boxes``/``labels`` of the target dicts (``detector.structures.Target``)."""
        sizes = [len(t["boxes"]) for t in targets]  # host-side: no device sync
        counts = torch.tensor(sizes, device=device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32).reshape(-1, 4)
        labels = torch.cat([t["labels"] for t in targets]).to(device, torch.long).reshape(-1)
        batch = torch.repeat_interleave(torch.arange(len(targets), device=device), counts)
        padded = boxes.new_zeros(len(targets), max(sizes, default=1) or 1, 4)
        if len(boxes):
            slot = torch.arange(len(boxes), device=device) - (torch.cumsum(counts, 0) - counts)[batch]
            padded[batch, slot] = boxes
        return cls(boxes, labels, batch, padded)


def assign(
    gt: GroundTruth, anchors: Tensor, strides: list[int], shapes: list[tuple[int, int]], iou_thresh: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Best-of-all-anchors assignment (plus, with ``iou_thresh``, every anchor above it).

    Args:
        gt: the batch's ground truths.
        anchors: ``[S, A, 2]`` anchor sizes in pixels, per scale.
        strides: stride of each scale. shapes: (H_s, W_s) of each scale's grid.
        iou_thresh: also assign every anchor whose shape IoU with the ground truth exceeds this.
    Returns:
        ``(img_idx [P], anchor_idx [P], gt_idx [P])``: each positive's image, its anchor row in the
        flat layout of :func:`detector.ops.boxes.anchor_grid`, and the ground truth it learns.
    """
    a_n = anchors.shape[1]
    ious = wh_iou(gt.boxes[:, 2:] - gt.boxes[:, :2], anchors.view(-1, 2))  # (G, S·A)
    chosen = torch.zeros_like(ious, dtype=torch.bool)
    chosen[torch.arange(len(ious), device=ious.device), ious.argmax(1)] = True
    if iou_thresh is not None:
        chosen |= ious > iou_thresh
    g_idx, best = chosen.nonzero(as_tuple=True)  # ordered by ground truth: later ones win below
    scale, anchor = best // a_n, best % a_n
    cxcy = (gt.boxes[g_idx, :2] + gt.boxes[g_idx, 2:]) / 2
    dev = anchors.device
    hw = torch.tensor(shapes, device=dev)  # [S, 2] = (H, W)
    stride = torch.tensor(strides, device=dev, dtype=torch.float32)[scale]
    size = hw.prod(1)
    offset = torch.cumsum(size * a_n, 0) - size * a_n  # first row of each scale
    gi = (cxcy[:, 0] / stride).long().clamp(min=0).minimum(hw[scale, 1] - 1)
    gj = (cxcy[:, 1] / stride).long().clamp(min=0).minimum(hw[scale, 0] - 1)
    row = offset[scale] + anchor * size[scale] + gj * hw[scale, 1] + gi
    n_rows = a_n * sum(h * w for h, w in shapes)  # host-side: no device sync
    # Collisions on one (image, row): the last ground truth wins, as darknet overwrites.
    key = gt.batch[g_idx] * n_rows + row
    uniq, inverse = torch.unique(key, return_inverse=True)
    idx = torch.arange(len(key), device=dev)
    winner = torch.full((len(uniq),), -1, device=dev, dtype=torch.long).scatter_reduce(0, inverse, idx, "amax")
    return gt.batch[g_idx[winner]], row[winner], g_idx[winner]
