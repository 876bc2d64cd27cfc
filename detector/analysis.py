"""What an evaluation got right and wrong, at one IoU threshold: a confusion matrix with a background
row and column, F1 against the confidence threshold, and COCO's precision-recall curves per class.

Inputs are one evaluation's detections and ground truths per image (:class:`EvalData`), in one
coordinate frame (the module evaluates in original image pixels). Lightning-free, pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .ops.match import match_by_iou, match_by_score, padded_iou

CHUNK = 256  # images per padded batch: bounds the [B, D, G] IoU tensor (COCO: 256·100·~90 floats)


@dataclass
class EvalData:
    """Per image i: detections ``boxes [D_i, 4]`` xyxy, ``scores [D_i]``, ``labels [D_i]`` and ground
    truths ``gt_boxes [G_i, 4]``, ``gt_labels [G_i]``."""

    boxes: list[Tensor]
    scores: list[Tensor]
    labels: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]

    def check(self, num_classes: int) -> None:
        """ValueError naming the first label outside ``0 .. num_classes - 1``."""
        for kind, labels in (("detection", self.labels), ("ground-truth", self.gt_labels)):
            for i, lab in enumerate(labels):
                bad = lab[(lab < 0) | (lab >= num_classes)]
                if len(bad):
                    raise ValueError(f"{kind} label {int(bad[0])} of image {i} is outside 0..{num_classes - 1}")


def _pad(labels: list[Tensor]) -> Tensor:
    """Per image ``[N_i]`` int64 -> ``[B, N]``, padded with -1."""
    return pad_sequence([x.long() for x in labels], batch_first=True, padding_value=-1)


def confusion_matrix(
    data: EvalData, num_classes: int, iou_threshold: float = 0.5, score_threshold: float = 0.25
) -> Tensor:
    """Detection confusion matrix ``[K + 1, K + 1]`` int64; rows: true class, columns: predicted class,
    index K: background.

    Detections scoring below ``score_threshold`` are dropped; the rest are matched to ground truths
    of any class with IoU >= ``iou_threshold``, one to one, highest IoU first (:func:`match_by_iou`).
    A matched pair adds 1 at (true, predicted): the diagonal counts correct classes, the rest
    confusions. An unmatched ground truth adds 1 at (true, K): missed. An unmatched detection adds
    1 at (K, predicted): a false positive. (K, K) stays 0.
    """
    data.check(num_classes)
    k = num_classes
    counts = torch.zeros((k + 1) * (k + 1), dtype=torch.int64)
    for start in range(0, len(data.boxes), CHUNK):
        sl = slice(start, start + CHUNK)
        keep = [s >= score_threshold for s in data.scores[sl]]
        boxes = [b[m].cpu() for b, m in zip(data.boxes[sl], keep)]
        pred = _pad([lab[m].cpu() for lab, m in zip(data.labels[sl], keep)])  # [B, D]
        true = _pad([lab.cpu() for lab in data.gt_labels[sl]])  # [B, G]
        iou, real = padded_iou(boxes, [b.cpu() for b in data.gt_boxes[sl]])
        match = match_by_iou(iou, real & (iou >= iou_threshold))  # [B, D]
        matched = match >= 0
        g = true.shape[1]
        pair_true = true.gather(1, match.clamp(min=0)) if g else torch.full_like(pred, k)
        rows = torch.where(matched, pair_true, torch.full_like(pred, k))  # unmatched detection: background row
        found = torch.zeros(true.shape[0], g + 1, dtype=torch.bool).scatter_(1, match.masked_fill(~matched, g), True)
        missed = (true >= 0) & ~found[:, :g]
        cells = torch.cat([(rows * (k + 1) + pred)[pred >= 0], true[missed] * (k + 1) + k])
        counts += torch.bincount(cells, minlength=(k + 1) * (k + 1))
    return counts.view(k + 1, k + 1)


def true_positives(
    data: EvalData, num_classes: int, iou_threshold: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every detection as a true or false positive at ``iou_threshold`` by COCO's rule
    (:func:`match_by_score`: same class, descending score, one to one).

    Returns:
        ``scores [N]``, ``labels [N]``, ``tp [N]`` bool over all detections of all images, and
        ``n_gt [K]``: ground truths per class.
    """
    data.check(num_classes)
    scores, labels, tps = [], [], []
    for start in range(0, len(data.boxes), CHUNK):
        sl = slice(start, start + CHUNK)
        order = [s.cpu().argsort(descending=True, stable=True) for s in data.scores[sl]]
        boxes = [b.cpu()[o] for b, o in zip(data.boxes[sl], order)]
        pred = _pad([lab.cpu()[o] for lab, o in zip(data.labels[sl], order)])
        true = _pad([lab.cpu() for lab in data.gt_labels[sl]])
        iou, real = padded_iou(boxes, [b.cpu() for b in data.gt_boxes[sl]])
        same = pred[:, :, None] == true[:, None, :]
        match = match_by_score(iou, real & same & (iou >= iou_threshold))
        scores += [s.cpu()[o] for s, o in zip(data.scores[sl], order)]
        labels.append(pred[pred >= 0])
        tps.append(match[pred >= 0] >= 0)
    gt_labels = [x.cpu().long() for x in data.gt_labels]
    n_gt = torch.bincount(
        torch.cat(gt_labels) if gt_labels else torch.zeros(0, dtype=torch.int64), minlength=num_classes
    )
    if not scores:  # no image
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), n_gt
    return torch.cat(scores).float(), torch.cat(labels), torch.cat(tps), n_gt


def f1_curves(scores: Tensor, labels: Tensor, tp: Tensor, n_gt: Tensor, thresholds: Tensor) -> Tensor:
    """F1 of each class when keeping the detections scoring at least c, for each c of ``thresholds [T]``:
    ``[K, T]``, NaN for classes without ground truth.

    With TP(c) true positives among the D(c) detections of the class scoring >= c and n ground truths,
    precision TP/D and recall TP/n give ``F1 = 2·P·R / (P + R) = 2·TP / (n + D)`` (0 when D = 0).
    """
    out = torch.full((len(n_gt), len(thresholds)), float("nan"), dtype=torch.float64)
    for k in torch.nonzero(n_gt > 0).flatten().tolist():
        mine = labels == k
        s, order = scores[mine].double().sort(descending=True, stable=True)
        cum_tp = torch.cat([torch.zeros(1, dtype=torch.float64), tp[mine][order].double().cumsum(0)])
        count = torch.searchsorted(-s, -thresholds.double(), right=True)  # detections scoring >= c
        out[k] = 2 * cum_tp[count] / (n_gt[k] + count)
    return out


@dataclass
class BestF1:
    """The confidence threshold c maximising the mean F1 over classes with ground truth, and the mean
    F1, precision and recall there (precision of a class without detections >= c counts as 0);
    ``per_class`` holds (precision, recall, F1) per class at c (NaN for classes without ground truth)."""

    conf: float | None  # None: no detection at all
    f1: float
    precision: float
    recall: float
    per_class: Tensor  # [K, 3]


def best_f1(scores: Tensor, labels: Tensor, tp: Tensor, n_gt: Tensor) -> BestF1 | None:
    """The exact maximum of the mean F1 over every threshold (None when no class has ground truth).

    The mean over the K' classes with ground truth changes only at detection scores. Walking the
    detections in descending score, detection i of class k moves that class's F1 from
    ``2·TP/(n_k + D)`` to ``2·TP'/(n_k + D + 1)``; the running sum of these steps over K' is the
    mean F1 at threshold ``score_i``, read at the last detection of each run of equal scores.
    """
    has_gt = n_gt > 0
    if not has_gt.any():
        return None
    keep = has_gt[labels]
    s, order = scores[keep].double().sort(descending=True, stable=True)
    lab, hit = labels[keep][order], tp[keep][order].double()
    conf = None
    if len(s):
        group = lab.argsort(stable=True)  # detections grouped by class, in score order within a class
        grouped = lab[group]
        start = torch.searchsorted(grouped, grouped)  # position of the first detection of each one's class
        cum = hit[group].cumsum(0)
        tp_grouped = cum - torch.cat([torch.zeros(1, dtype=cum.dtype), cum])[start]  # the class's TP so far
        tp_after = torch.empty_like(cum).scatter_(0, group, tp_grouped)
        d_after = torch.empty_like(cum).scatter_(0, group, (torch.arange(len(s)) - start + 1).double())
        n = n_gt[lab].double()
        step = 2 * tp_after / (n + d_after) - 2 * (tp_after - hit) / (n + d_after - 1)
        mean = step.cumsum(0) / int(has_gt.sum())
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]  # threshold s_i keeps every detection tied with it
        i = int(torch.where(last, mean, torch.full_like(mean, -1.0)).argmax())
        conf = float(s[i])
    return _at(conf, scores, labels, tp, n_gt)


def _at(conf: float | None, scores: Tensor, labels: Tensor, tp: Tensor, n_gt: Tensor) -> BestF1:
    """Per-class and mean precision, recall, F1 when keeping the detections scoring >= ``conf``."""
    k = len(n_gt)
    sel = scores >= conf if conf is not None else torch.zeros_like(scores, dtype=torch.bool)
    hits = torch.bincount(labels[sel], weights=tp[sel].double(), minlength=k)
    dets = torch.bincount(labels[sel], minlength=k).double()
    n = n_gt.double()
    precision = torch.where(dets > 0, hits / dets.clamp(min=1), torch.zeros_like(hits))
    recall, f1 = hits / n, 2 * hits / (n + dets)
    per_class = torch.stack([precision, recall, f1], 1).masked_fill((n_gt == 0)[:, None], float("nan"))
    mean = per_class[n_gt > 0].mean(0).tolist()
    return BestF1(conf, f1=mean[2], precision=mean[0], recall=mean[1], per_class=per_class)


def pr_curves(result: dict[str, Tensor], num_classes: int) -> Tensor:
    """COCO's interpolated precision at its recall thresholds, per class: ``[K, R]`` float64 (NaN for
    classes without ground truth), from a ``MeanAveragePrecision`` result computed with
    ``extended_summary=True`` at the IoU threshold wanted first: ``precision [T, R, K', A, M]`` at
    T index 0, area "all" (A index 0) and the largest detection count (M index -1); K' indexes
    ``result["classes"]``. The mean over R of a class's row is its AP at that IoU (Lin et al. 2014)."""
    precision = result["precision"][0, :, :, 0, -1].double()  # [R, K']
    out = torch.full((num_classes, precision.shape[0]), float("nan"), dtype=torch.float64)
    for j, label in enumerate(result["classes"].view(-1).tolist()):
        if 0 <= label < num_classes and (precision[:, j] >= 0).all():  # -1: no ground truth for the class
            out[label] = precision[:, j]
    return out
