"""Anchor sizes from box sizes: k-means with the IoU distance (YOLOv2, arXiv 1612.08242 §2), and the
best possible recall of a set of anchors. Pure torch; the command line is ``python -m detector.anchors``."""

from __future__ import annotations

import torch
from torch import Tensor

from .boxes import wh_iou


def kmeans_anchors(wh: Tensor, k: int = 9, iters: int = 100, seed: int = 0) -> Tensor:
    """``k`` anchor sizes ``[k, 2]`` (ascending area) clustering ``wh [N, 2]`` with distance ``1 − IoU``.

    k-means++ seeding, then Lloyd iterations with the cluster median as the centre (robust to the
    long tail of box sizes), stopping when the assignment no longer changes.
    """
    if len(wh) < k:
        raise ValueError(f"need at least k = {k} boxes to cluster, got {len(wh)}")
    g = torch.Generator().manual_seed(seed)
    centres = wh[torch.randint(len(wh), (1,), generator=g)]
    for _ in range(k - 1):  # k-means++: next centre drawn in proportion to its distance
        d = 1 - wh_iou(wh, centres).amax(1)
        centres = torch.cat([centres, wh[torch.multinomial(d / d.sum(), 1, generator=g)]])
    assign = torch.full((len(wh),), -1)
    for _ in range(iters):
        new = wh_iou(wh, centres).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack(
            [wh[assign == i].median(0).values if (assign == i).any() else centres[i] for i in range(k)]
        )
    return centres[centres.prod(1).argsort()]


def best_possible_recall(wh: Tensor, anchors: Tensor, iou_thresh: float = 0.25) -> float:
    """Share of boxes ``wh [N, 2]`` whose best anchor (``[K, 2]``) has shape IoU above ``iou_thresh``."""
    return float((wh_iou(wh, anchors).amax(1) > iou_thresh).float().mean())
