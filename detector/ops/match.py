"""One-to-one matching of detections to ground truths at an IoU threshold, batched over images. Pure torch.

Two rules, both one-to-one (a detection takes at most one ground truth and the reverse):

- :func:`match_by_iou`: the pair with the highest IoU first, then the highest among the rest, ...
  (Ultralytics' confusion matrix). Right for a fixed set of detections (those above a score threshold).
- :func:`match_by_score`: detections in descending score order, each taking the free ground truth
  it overlaps most (COCO's ``evaluateImg``, Lin et al. 2014). The matches of the detections scoring
  at least c do not depend on the detections below c, so counting true positives above each
  threshold c gives exact precision and recall at c: the rule behind PR and F1 curves.

Both take padded batches: ``iou [B, D, G]`` and ``allowed [B, D, G]`` (False for padding, pairs under
the IoU threshold and, when classes must agree, pairs of different classes), and return for every
detection the index of its ground truth, or -1: ``[B, D]`` int64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou


def padded_iou(det_boxes: list[Tensor], gt_boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """IoU of every detection with every ground truth of the same image, padded over images.

    Args:
        det_boxes: per image ``[D_i, 4]`` xyxy. gt_boxes: per image ``[G_i, 4]`` xyxy.
    Returns:
        ``iou [B, D, G]`` (0 at padding) and ``real [B, D, G]``: True where both boxes exist.
    """
    b, d, g = len(det_boxes), max((len(x) for x in det_boxes), default=0), max((len(x) for x in gt_boxes), default=0)
    device = det_boxes[0].device if det_boxes else torch.device("cpu")
    iou = torch.zeros(b, d, g, device=device)
    for i, (det, gt) in enumerate(zip(det_boxes, gt_boxes)):
        if len(det) and len(gt):
            iou[i, : len(det), : len(gt)] = box_iou(det.float(), gt.float())
    d_real = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in det_boxes], batch_first=True) if d else None
    g_real = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in gt_boxes], batch_first=True) if g else None
    if d_real is None or g_real is None:
        return iou, torch.zeros(b, d, g, dtype=torch.bool, device=device)
    return iou, (d_real[:, :, None] & g_real[:, None, :]).to(device)


def match_by_iou(iou: Tensor, allowed: Tensor) -> Tensor:
    """Greedy one-to-one matching, highest IoU first: ``iou, allowed [B, D, G]`` -> ``[B, D]`` (-1: none).

    Exact greedy in rounds: every pair that is the best of its row and of its column among the
    remaining ones is one the sequential greedy takes (no pair it competes with ranks higher), so
    all such pairs are taken at once and their rows and columns removed. Ties in IoU are broken by
    the flat index (detection, then ground truth), which makes every pair's rank unique.
    """
    bsz, d, g = iou.shape
    match = torch.full((bsz, d), -1, dtype=torch.int64, device=iou.device)
    if d == 0 or g == 0:
        return match
    flat = iou.masked_fill(~allowed, -1.0).reshape(bsz, -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d * g, 0, -1, device=iou.device).expand(bsz, -1))
    prio = rank.view(bsz, d, g).masked_fill(~allowed, -1)  # unique per image, higher = earlier, -1 = never
    rows = torch.arange(d, device=iou.device).expand(bsz, -1)
    while True:
        best_val, best_g = prio.max(2)  # [B, D]
        best_d = prio.argmax(1)  # [B, G]
        mutual = (best_val >= 0) & (best_d.gather(1, best_g) == rows)
        if not mutual.any():
            return match
        match[mutual] = best_g[mutual]
        taken = torch.zeros(bsz, g + 1, dtype=torch.bool, device=iou.device)
        taken.scatter_(1, best_g.masked_fill(~mutual, g), True)
        prio.masked_fill_(mutual[:, :, None] | taken[:, None, :g], -1)


def match_by_score(iou: Tensor, allowed: Tensor) -> Tensor:
    """COCO's greedy matching: ``iou, allowed [B, D, G]`` with each image's detections in descending
    score order -> ``[B, D]`` (-1: none). Detection r takes the free allowed ground truth of highest
    IoU; one round per detection position, all images at once."""
    bsz, d, g = iou.shape
    match = torch.full((bsz, d), -1, dtype=torch.int64, device=iou.device)
    if d == 0 or g == 0:
        return match
    free = torch.ones(bsz, g, dtype=torch.bool, device=iou.device)
    images = torch.arange(bsz, device=iou.device)
    for r in range(d):
        cand = iou[:, r].masked_fill(~(allowed[:, r] & free), -1.0)  # [B, G]
        val, gt = cand.max(1)
        hit = val >= 0
        match[hit, r] = gt[hit]
        free[images[hit], gt[hit]] = False
    return match
