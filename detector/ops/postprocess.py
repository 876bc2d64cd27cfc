"""From raw head outputs to detections: decode, score, confidence filter, class-aware NMS."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .boxes import anchor_grid, decode, detection_scores, flatten_outputs


def postprocess(
    outputs: list[Tensor],
    anchors: Tensor,
    strides: list[int],
    conf_thresh: float = 0.001,
    iou_thresh: float = 0.6,
    max_det: int = 100,
    max_candidates: int = 1000,
) -> list[dict[str, Tensor]]:
    """Detections per image, for the whole batch at once.

    Every (anchor, class) pair is a candidate with score ``σ(obj)·σ(cls)`` (multi-label, as
    YOLOv3's independent sigmoids allow). Per image the ``max_candidates`` best pairs above
    ``conf_thresh`` go through one ``torchvision.ops.batched_nms`` call for the whole batch
    (grouped by image and class); the ``max_det`` best survivors are kept.

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
    raw = flatten_outputs([o.detach().float() for o in outputs])  # (B, N, 5 + C)
    b_n, n_cls = raw.shape[0], raw.shape[2] - 5
    cells, anchor_wh, steps = anchor_grid([(o.shape[2], o.shape[3]) for o in outputs], anchors, strides)
    boxes = decode(raw, cells, anchor_wh, steps)  # (B, N, 4)
    scores = detection_scores(raw).view(b_n, -1)  # (B, N·C)
    top, idx = scores.topk(min(max_candidates, scores.shape[1]), dim=1)  # (B, K)
    keep = top > conf_thresh
    img = torch.arange(b_n, device=raw.device)[:, None].expand_as(idx)[keep]
    row, label, score = idx[keep] // n_cls, idx[keep] % n_cls, top[keep]
    cand = boxes[img, row]
    kept = batched_nms(cand, score, img * n_cls + label, iou_thresh)  # by descending score
    # Stable sort by image keeps the score order inside each image; rank within image caps max_det.
    kept = kept[torch.sort(img[kept], stable=True).indices]
    counts = torch.bincount(img[kept], minlength=b_n)
    rank = torch.arange(len(kept), device=raw.device) - (torch.cumsum(counts, 0) - counts)[img[kept]]
    kept = kept[rank < max_det]
    sizes = torch.bincount(img[kept], minlength=b_n).tolist()
    return [
        {"boxes": bx, "scores": sc, "labels": lb}
        for bx, sc, lb in zip(cand[kept].split(sizes), score[kept].split(sizes), label[kept].split(sizes))
    ]
