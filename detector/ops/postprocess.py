"""From raw head outputs to detections: decode, score, confidence filter, class-aware NMS.

One implementation for evaluation (:func:`postprocess`) and for the exported ONNX graph
(``detector.export``): :func:`detections` uses only operations the ONNX exporter maps (TopK,
NonZero, NonMaxSuppression, ScatterElements, CumSum), no ``bincount``, Python splits or host syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..structures import Detections
from .boxes import anchor_grid, decode, detection_scores, flatten_outputs

# Candidates per image before NMS: RetinaNet's pre-NMS top-k, ten times max_det (see postprocess).
MAX_CANDIDATES = 1000


def boxes_and_scores(outputs: list[Tensor], cells: Tensor, anchor_wh: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-scale raw outputs ``[B, A, H_s, W_s, 5 + C]`` -> ``boxes [B, N, 4]`` xyxy input pixels and
    ``scores [B, N, C]`` = σ(obj)·σ(cls), in float32; ``cells``, ``anchor_wh``, ``steps`` from ``anchor_grid``."""
    raw = flatten_outputs(outputs).float()  # (B, N, 5 + C)
    return decode(raw, cells, anchor_wh, steps), detection_scores(raw)


def detections(
    boxes: Tensor,
    scores: Tensor,
    conf_thresh: float,
    iou_thresh: float,
    max_det: int,
    max_candidates: int = MAX_CANDIDATES,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Confidence filter, class-aware NMS and the per-image cap, for the whole batch at once.

    Every (anchor, class) pair is a candidate (multi-label, as YOLOv3's independent sigmoids
    allow). Per image the ``max_candidates`` best pairs above ``conf_thresh`` go through one
    ``torchvision.ops.batched_nms`` call (grouped by image and class); the ``max_det`` best
    survivors of each image are kept.

    Args:
        boxes: ``[B, N, 4]`` xyxy. scores: ``[B, N, C]``.
    Returns:
        ``image [K]`` int64, ``boxes [K, 4]``, ``scores [K]``, ``labels [K]`` int64, grouped by image
        (ascending), by descending score within one (NMS's order).
    """
    b_n, n_cls = scores.shape[0], scores.shape[2]
    flat = scores.flatten(1)  # (B, N·C)
    top, idx = flat.topk(min(max_candidates, flat.shape[1]), dim=1)  # (B, K0)
    keep = top > conf_thresh
    img = torch.arange(b_n, device=boxes.device)[:, None].expand_as(idx)[keep]
    row, label, score = idx[keep] // n_cls, idx[keep] % n_cls, top[keep]
    cand = boxes[img, row]  # (K1, 4)
    kept = batched_nms(cand, score, img * n_cls + label, iou_thresh)  # (K2,) by descending score
    # by image, NMS's order kept within one: the key image·K2 + position is unique, so any sort gives this order
    pos = torch.arange(kept.shape[0], device=boxes.device)
    kept = kept[torch.argsort(img[kept] * kept.shape[0] + pos)]
    # rank in its image = position − survivors of the images before (ONNX: ScatterElements with add, CumSum)
    per_image = torch.zeros(b_n, dtype=torch.long, device=boxes.device).scatter_add(0, img[kept], torch.ones_like(kept))
    rank = pos - (per_image.cumsum(0) - per_image)[img[kept]]
    kept = kept[rank < max_det]
    return img[kept], cand[kept], score[kept], label[kept]


def postprocess(
    outputs: list[Tensor],
    anchors: Tensor,
    strides: list[int],
    conf_thresh: float = 0.001,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    max_candidates: int = MAX_CANDIDATES,
) -> list[Detections]:
    """Detections per image (evaluation and prediction): :func:`boxes_and_scores`, then :func:`detections`.

    NMS costs up to O(n²) per group, so ``max_candidates`` sets the price of evaluation: 1000
    per image (RetinaNet's pre-NMS top-k, ten times ``max_det``) keeps an evaluation epoch within
    1.3× the bare forward pass (``benchmarks/eval.py``); 3000 cost up to 1.6× more on CPU.

    Args:
        outputs: per scale ``[B, A, H_s, W_s, 5 + C]`` raw logits.
        anchors: ``[S, A, 2]`` pixels. strides: per scale.
    Returns:
        one dict per image: ``boxes [D, 4]`` xyxy input pixels, ``scores [D]``, ``labels [D]`` int64,
        sorted by descending score.
    """
    grid = anchor_grid([(o.shape[2], o.shape[3]) for o in outputs], anchors, strides)
    boxes, scores = boxes_and_scores([o.detach() for o in outputs], *grid)
    img, boxes, scores, labels = detections(boxes, scores, conf_thresh, iou_thresh, max_det, max_candidates)
    sizes = torch.bincount(img, minlength=len(outputs[0])).tolist()
    return [
        Detections(boxes=bx, scores=sc, labels=lb)
        for bx, sc, lb in zip(boxes.split(sizes), scores.split(sizes), labels.split(sizes))
    ]
