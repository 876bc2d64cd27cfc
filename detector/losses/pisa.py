"""PISA, prime sample attention (Cao et al., arXiv 1904.04821): ISR and CARL.

Ranks are taken over the whole global batch: in DDP every process gathers the ranking keys
(:func:`all_gather_cat`), ranks all rows, keeps its own, and the rescaling sums are
all-reduced, so N processes reweight exactly like one process holding the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..distributed import all_gather_cat, all_reduce_sum
from ..ops.boxes import batched_box_iou
from .base import BoxLoss, BoxSet, ClassificationLoss, SampleInfo


def _rank_in_runs(sorted_ids: Tensor) -> Tensor:
    """Position of each element inside its run of equal consecutive ids: [7,7,7,9,9] -> [0,1,2,0,1]."""
    _, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_ids.numel(), device=sorted_ids.device) - torch.repeat_interleave(starts, counts)


def hierarchical_rank(values: Tensor, groups: Tensor, classes: Tensor) -> Tensor:
    """PISA's hierarchical local rank (HLR), fully vectorised.

    ``values [n]`` (higher is better: IoU or score), ``groups [n]`` int64 (a group lies inside
    one class: a ground truth, an NMS cluster), ``classes [n]`` int64 -> ``rank [n]`` int64.
    Inside each group samples get a local rank by value (0 = best); then all samples of a class
    are ordered by local rank first and value second (every group's best, then every group's
    second, ...) and ``rank`` is the position in that order. Equal to the reference's sort on
    ``value + (n_max − r_loc)``, without its float rounding. Ties keep the input order.
    """
    n = values.numel()
    order = torch.argsort(values, descending=True, stable=True)  # best first
    by_group = order[torch.argsort(groups[order], stable=True)]  # grouped, best first inside
    local = torch.empty_like(groups)
    local[by_group] = _rank_in_runs(groups[by_group])
    key = classes * (n + 1) + local  # (class, local rank), local < n
    by_class = order[torch.argsort(key[order], stable=True)]  # stable: value order kept within a key
    rank = torch.empty_like(groups)
    rank[by_class] = _rank_in_runs(classes[by_class])
    return rank


def _hlr_weight(rank: Tensor, n_max: Tensor, k: float, bias: float) -> Tensor:
    u = (n_max - rank).float() / n_max  # 1 for the best, 1/n_max for the worst
    return (bias + (1.0 - bias) * u).pow(k)


def iou_hlr_weights(labels: Tensor, gt_ids: Tensor, ious: Tensor, k: float = 2.0, bias: float = 0.0) -> Tensor:
    """ISR-P weights ``w [P] = ((1 − β)u + β)^k`` of P positives, ``u = (n_max − r) / n_max``.

    ``labels``, ``gt_ids`` int64 ``[P]``, ``ious [P]``; r is the IoU-HLR within the class and
    n_max the largest number of positives of one class. Not rescaled.
    """
    if labels.numel() == 0:
        return ious.new_zeros(0, dtype=torch.float32)
    rank = hierarchical_rank(ious, gt_ids, labels)
    return _hlr_weight(rank, torch.bincount(labels).max(), k, bias)


def _slots(groups: Tensor) -> tuple[Tensor, int]:
    """Position of each element among the elements of its group, in input order, and the largest group."""
    order = torch.argsort(groups, stable=True)
    slot = torch.empty_like(groups)
    slot[order] = _rank_in_runs(groups[order])
    return slot, int(slot.max()) + 1 if slot.numel() else 0


IOU_BUDGET = 1 << 24  # elements of one chunk of nms_clusters' IoU matrix (64 MB in float32)


def nms_clusters(boxes: Tensor, scores: Tensor, image_ids: Tensor, iou_thresh: float) -> Tensor:
    """Greedy NMS cluster of each box: ``boxes [K, 4]`` xyxy, ``scores [K]``, ``image_ids [K]`` -> ``[K]``.

    The cluster id is the index (into ``boxes``) of the highest-scoring NMS survivor of the same
    image whose IoU with the box exceeds ``iou_thresh`` and whose score is at least the box's own:
    the survivor (the cluster's leader) that suppressed it. Survivors lead their own cluster. Boxes and leaders are laid out
    per image, padded (``[I, K_max]``, ``[I, L_max]``), so the IoU matrix stays per image; it is
    computed in chunks of rows of at most ``IOU_BUDGET`` elements, so memory stays bounded however
    many negatives take part.
    """
    # Dense image index: batched_nms offsets boxes by index × max coordinate, so raw ids (DDP
    # offsets them by rank << 32) would lose the boxes' precision in float32.
    _, img = torch.unique(image_ids, return_inverse=True)  # (K,)
    leaders = batched_nms(boxes, scores, img, iou_thresh)  # (L,) by descending score
    slot, k_max = _slots(img)
    l_slot, l_max = _slots(img[leaders])  # stable: leaders stay by descending score in an image
    n_img, l_img = int(img.max()) + 1, img[leaders]
    box_pad = boxes.new_zeros(n_img, k_max, 4).index_put_((img, slot), boxes)
    score_pad = scores.new_zeros(n_img, k_max).index_put_((img, slot), scores)
    leader_box = boxes.new_zeros(n_img, l_max, 4).index_put_((l_img, l_slot), boxes[leaders])
    leader_score = scores.new_full((n_img, l_max), -float("inf")).index_put_((l_img, l_slot), scores[leaders])
    first = torch.empty(n_img, k_max, dtype=torch.long, device=boxes.device)  # (I, K_max)
    step = max(1, IOU_BUDGET // max(n_img * l_max, 1))  # rows per chunk: bounded memory, any K
    for start in range(0, k_max, step):
        rows = slice(start, start + step)
        member = batched_box_iou(box_pad[:, rows], leader_box) > iou_thresh  # (I, step, L_max)
        member &= leader_score[:, None, :] >= score_pad[:, rows, None]  # padded leaders (-inf) never match
        first[:, rows] = member.to(torch.uint8).argmax(-1)  # first True = highest-scoring leader
    first[l_img, slot[leaders]] = l_slot  # a survivor leads its own cluster, even degenerate
    leader_index = leaders.new_zeros(n_img, l_max).index_put_((l_img, l_slot), leaders)
    return leader_index[img, first[img, slot]]


def score_hlr_weights(
    boxes: Tensor, scores: Tensor, image_ids: Tensor, nms_iou: float = 0.5, k: float = 0.5, bias: float = 0.0
) -> Tensor:
    """ISR-N weights ``w [K]`` of K negatives: Score-HLR over NMS clusters, ``u = (K − r) / K``. Not rescaled."""
    if scores.numel() == 0:
        return scores.new_zeros(0, dtype=torch.float32)
    clusters = nms_clusters(boxes, scores, image_ids, nms_iou)
    rank = hierarchical_rank(scores, clusters, torch.zeros_like(clusters))
    return _hlr_weight(rank, torch.tensor(scores.numel(), device=scores.device), k, bias)


def _ratio(original: Tensor, reweighted: Tensor) -> Tensor:
    return torch.where(reweighted > 0, original / reweighted, torch.ones_like(original))


def _check_info(info: SampleInfo | None, n: int, owner: str) -> SampleInfo:
    if info is None:
        raise ValueError(f"{owner} needs the SampleInfo of its rows (info=None); the YOLO loss must pass it")
    for name in ("labels", "gt_ids", "ious", "boxes", "scores", "image_ids"):
        if getattr(info, name).shape[:1] != (n,):
            raise ValueError(f"info.{name} must have {n} rows, got {tuple(getattr(info, name).shape)}")
    return info


def _check_hlr_args(k: float, bias: float, what: str) -> None:
    if k < 0:
        raise ValueError(f"k_{what} must be >= 0, got {k}")
    if not 0.0 <= bias < 1.0:
        raise ValueError(f"bias_{what} must be in [0, 1), got {bias}")


class ISR(ClassificationLoss):
    """Importance-based sample reweighting: ISR-P (IoU-HLR) and ISR-N (Score-HLR) around any loss.

    Shapes: ``logits``, ``targets``, ``weight`` ``[N, C]`` -> ``base(...) [N, C] · w[:, None]``.
    The rows may be objectness rows (C = 1; positives and negatives) or classification rows
    (C classes; positives only). Rows with ``weight`` all zero (ignored) take no part.

    - ISR-P: positives (``info.gt_ids >= 0``) get ``w = ((1 − β)u + β)^k``, ``u = (n_max − r)/n_max``,
      r the IoU-HLR of ``info.ious`` within their class ``info.labels`` grouped by ``info.gt_ids``.
    - ISR-N: negatives (``gt_ids == −1``) with ``info.scores > neg_score_thresh`` are clustered by
      greedy NMS (``nms_iou``) of ``info.boxes`` within an image (``info.image_ids``) and weighted
      alike by their Score-HLR r over all K taking part, ``u = (K − r)/K``, as in the paper. Other
      negatives keep w = 1. ``neg_topk`` (not in the paper; off by default) keeps only the
      ``neg_topk`` highest-scoring candidates of the whole (global) batch, which bounds the IoU
      matrices (per image ``[K_img, H_img]``) when many negatives score above the floor.
    - Each set is rescaled so its total loss ``Σ base · w`` equals ``Σ base`` (so the total positive
      and the total negative loss are unchanged). Weights are computed without gradient.

    Args:
        base: the elementwise classification loss to reweight.
        isr_p, isr_n: switch the positive / negative reweighting.
        k_pos, bias_pos: k and β of ISR-P (paper: 2, 0).
        k_neg, bias_neg: k and β of ISR-N (paper: 0.5, 0).
        neg_score_thresh: negatives at or below this score take no part (paper: 0.05).
        nms_iou: IoU threshold of the NMS clustering (paper: 0.5).
        neg_topk: None (the paper: every candidate) or the most candidates per global batch taking
            part in ISR-N, a speed and memory option (the rest keep w = 1).
    """

    needs_info = True

    def __init__(
        self,
        base: ClassificationLoss,
        isr_p: bool = True,
        isr_n: bool = True,
        k_pos: float = 2.0,
        bias_pos: float = 0.0,
        k_neg: float = 0.5,
        bias_neg: float = 0.0,
        neg_score_thresh: float = 0.05,
        nms_iou: float = 0.5,
        neg_topk: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, ClassificationLoss):
            raise ValueError(f"base must be a ClassificationLoss, got {type(base).__name__}")
        _check_hlr_args(k_pos, bias_pos, "pos")
        _check_hlr_args(k_neg, bias_neg, "neg")
        if not 0.0 <= neg_score_thresh < 1.0:
            raise ValueError(f"neg_score_thresh must be in [0, 1), got {neg_score_thresh}")
        if not 0.0 <= nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {nms_iou}")
        if neg_topk is not None and (int(neg_topk) != neg_topk or neg_topk < 1):
            raise ValueError(f"neg_topk must be an integer >= 1 or None, got {neg_topk}")
        self.base = base
        self.isr_p, self.isr_n = bool(isr_p), bool(isr_n)
        self.k_pos, self.bias_pos = float(k_pos), float(bias_pos)
        self.k_neg, self.bias_neg = float(k_neg), float(bias_neg)
        self.neg_score_thresh, self.nms_iou = float(neg_score_thresh), float(nms_iou)
        self.neg_topk = None if neg_topk is None else int(neg_topk)

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """The base loss ``[N, C]`` with each row rescaled by its ISR weight from ``info`` (see :meth:`row_weights`)."""
        info = _check_info(info, logits.shape[0], "ISR")
        loss = self.base(logits, targets, weight, info)  # (N, C)
        w = self.row_weights(loss.detach(), weight, info)  # (N,)
        return loss * w[:, None].to(loss.dtype)

    @torch.no_grad()
    def row_weights(self, loss: Tensor, weight: Tensor | None, info: SampleInfo) -> Tensor:
        """Rescaled row weights ``[N]`` for the base loss ``loss [N, C]``."""
        n = loss.shape[0]
        rows = torch.ones(n, dtype=torch.bool, device=loss.device) if weight is None else (weight > 0).any(1)
        pos = rows & (info.gt_ids >= 0) if self.isr_p else torch.zeros_like(rows)
        w = torch.ones(n, device=loss.device)
        if self.isr_p:
            w[pos] = self._positive_weights(info, pos)
        cand = torch.zeros_like(rows)
        if self.isr_n:
            cand, w_cand = self._negative_weights(info, rows & (info.gt_ids < 0))
            w[cand] = w_cand
        row_loss = loss.float().sum(1)
        zero = torch.zeros_like(row_loss)
        sums = torch.stack([torch.where(m, x, zero).sum() for m in (pos, cand) for x in (row_loss, row_loss * w)])
        sums = all_reduce_sum(sums)  # one collective: global totals before / after reweighting
        w = torch.where(pos, w * _ratio(sums[0], sums[1]), w)
        return torch.where(cand, w * _ratio(sums[2], sums[3]), w)

    def _positive_weights(self, info: SampleInfo, pos: Tensor) -> Tensor:
        keys = torch.stack([info.labels[pos].double(), info.gt_ids[pos].double(), info.ious[pos].double()], 1)
        keys, offset = all_gather_cat(keys)  # (P_global, 3), rank order
        w = iou_hlr_weights(keys[:, 0].long(), keys[:, 1].long(), keys[:, 2].float(), self.k_pos, self.bias_pos)
        return w[offset : offset + int(pos.sum())]

    def _negative_weights(self, info: SampleInfo, neg: Tensor) -> tuple[Tensor, Tensor]:
        """``(cand [N] bool, w [cand.sum()])`` for the negatives that take part in ISR-N."""
        idx = torch.nonzero(neg & (info.scores > self.neg_score_thresh)).flatten()
        idx = idx[self._topk(info.scores[idx])]  # global top-k ⊆ union of local top-k
        # float64 before the cat: image ids carry DDP's rank << 32 offset, which float32 would round
        rows = torch.cat(
            [info.scores[idx, None].double(), info.boxes[idx].double(), info.image_ids[idx, None].double()], 1
        )
        rows, offset = all_gather_cat(rows)  # (K_global, 6): score, box, image id
        keep = self._topk(rows[:, 0])
        w_all = torch.ones(rows.shape[0], device=rows.device)
        score, box, image = rows[keep, 0].float(), rows[keep, 1:5].float(), rows[keep, 5].long()
        w_all[keep] = score_hlr_weights(box, score, image, self.nms_iou, self.k_neg, self.bias_neg)
        taking = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        taking[keep] = True
        own = slice(offset, offset + idx.numel())
        cand = torch.zeros_like(neg)
        cand[idx[taking[own]]] = True
        return cand, w_all[own][taking[own]]

    def extra_repr(self) -> str:
        """Which of ISR-P/ISR-N are on, their powers and ``neg_topk``, for ``print(module)``."""
        return (
            f"isr_p={self.isr_p}, isr_n={self.isr_n}, k_pos={self.k_pos}, k_neg={self.k_neg}, neg_topk={self.neg_topk}"
        )

    def _topk(self, scores: Tensor) -> Tensor:
        """Indices of the ``neg_topk`` highest scores, in input order (all of them if fewer or no cap)."""
        if self.neg_topk is None or scores.numel() <= self.neg_topk:
            return torch.arange(scores.numel(), device=scores.device)
        return torch.topk(scores, self.neg_topk).indices.sort().values


class CARL(BoxLoss):
    """Classification-aware regression loss (PISA, arXiv 1904.04821): box loss weighted by the class score.

    Shapes: ``pred``, ``target`` :class:`BoxSet` of N rows, ``weight [N] | None`` -> ``[N]``.
    With ``s_i = info.cls_score[i]`` (σ of the ground-truth class logit, with gradient) and the
    positive rows (``gt_ids >= 0`` and ``weight > 0``; P of them, over all processes):

    - ``v_i = ((1 − b)·s_i + b)^k``, rescaled to ``w_i = v_i · P / Σv`` so that ``Σ w = P``;
    - ``out_i = w_i · l_i`` with ``l_i = base(pred, target, weight)_i``.

    As in mmdetection's ``carl_loss``, the gradient flows through the rescaling ``P / Σv`` too, so
    ``∂Σout/∂s_j = (P/Σv)·(l_j − l̄)·∂v_j/∂s_j`` with ``l̄ = Σ v_i l_i / Σ v_i`` the v-weighted mean
    box loss: positives localised better than average get their score pushed up, worse ones down
    (the paper's intent). The box logits get ``w_i · ∂l_i``.

    Under DDP, ``P``, ``Σv`` and ``A = Σ v_i l_i`` are summed over processes (detached) and each
    process returns ``r·v_i·l_i − c·(v_i − [v_i])`` on its rows, with ``r = P/Σv``, ``c = P·A/(Σv)²``
    and ``[·]`` detached: the value is ``w_i·l_i`` and the gradient on every process's rows is that of
    one process holding the whole batch.

    Args:
        base: the box loss to weight.
        k: power k ≥ 0 (paper: 1).
        bias: b in [0, 1) (paper: 0.2).
    """

    needs_info = True

    def __init__(self, base: BoxLoss, k: float = 1.0, bias: float = 0.2) -> None:
        super().__init__()
        if not isinstance(base, BoxLoss):
            raise ValueError(f"base must be a BoxLoss, got {type(base).__name__}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not 0.0 <= bias < 1.0:
            raise ValueError(f"bias must be in [0, 1), got {bias}")
        self.base, self.k, self.bias = base, float(k), float(bias)

    def forward(
        self, pred: BoxSet, target: BoxSet, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """Base box loss ``[N]`` x ``w = v·P/Σv``, ``v = (b + (1 − b)·s)^k``, gradient through ``Σv`` (see the class)."""
        n = pred.raw.shape[0]
        if info is None or info.cls_score is None:
            raise ValueError("CARL needs info.cls_score (σ of the ground-truth class logit, with gradient)")
        if info.cls_score.shape != (n,) or info.gt_ids.shape != (n,):
            raise ValueError(f"info.cls_score and info.gt_ids must be [{n}], got {tuple(info.cls_score.shape)}")
        loss = self.base(pred, target, weight, info)  # (N,)
        v = (self.bias + (1.0 - self.bias) * info.cls_score).pow(self.k)
        valid = info.gt_ids >= 0 if weight is None else (info.gt_ids >= 0) & (weight > 0)
        v_valid = torch.where(valid, v, 0.0)
        dtype = torch.promote_types(v.dtype, torch.float32)  # sums in at least float32 (bf16 under AMP)
        local = torch.stack([valid.sum(), v_valid.sum(), (v_valid * loss).sum()]).to(dtype)
        count, v_sum, weighted = all_reduce_sum(local)  # P, Σv, Σ v·l over all processes, detached
        ratio = torch.where(v_sum > 0, count / v_sum, torch.zeros_like(v_sum))  # r = P / Σv
        c = ratio * weighted / v_sum.clamp_min(1e-12)  # P·A / (Σv)²
        through_sum = torch.where(valid, v - v.detach(), 0.0)  # value 0, gradient ∂v
        return v * ratio.to(v.dtype) * loss - c.to(v.dtype) * through_sum

    def extra_repr(self) -> str:
        """``k`` and ``bias`` for ``print(module)``."""
        return f"k={self.k}, bias={self.bias}"
