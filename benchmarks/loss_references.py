"""Straightforward reference formulations of GHM-C and ISR-P, to test and time ours against.

Written the way the papers' code writes them (a Python loop over bins with ``.item()`` for
GHM-C; Python loops over classes and ground truths for ISR-P), so they are easy to check by
eye. ``tests/test_losses_ghm.py`` and ``tests/test_losses_pisa.py`` assert that
``detector.losses.GHMC`` and ``detector.losses.ISR`` give the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ghmc_reference_weights(
    pred: Tensor,
    target: Tensor,
    label_weight: Tensor,
    acc_sum: Tensor | None = None,
    bins: int = 30,
    momentum: float = 0.75,
) -> Tensor:
    """GHM-C's weights as in the GHM paper's code (arXiv 1811.05181), one bin at a time.

    ``pred``, ``target``, ``label_weight`` ``[N, C]``; ``acc_sum [bins]`` the running counts,
    updated in place when ``momentum > 0``. Returns ``w [N, C]`` (0 where ``label_weight == 0``).
    """
    edges = torch.arange(bins + 1).float() / bins
    edges[-1] += 1e-6
    weights = torch.zeros_like(pred)
    g = torch.abs(pred.sigmoid().detach() - target)
    valid = label_weight > 0
    tot = max(valid.float().sum().item(), 1.0)
    n = 0  # non-empty bins
    for i in range(bins):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        num_in_bin = inds.sum().item()
        if num_in_bin > 0:
            if momentum > 0:
                acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * num_in_bin
                weights[inds] = tot / acc_sum[i]
            else:
                weights[inds] = tot / num_in_bin
            n += 1
    if n > 0:
        weights = weights / n
    return weights


def ghmc_reference(
    pred: Tensor,
    target: Tensor,
    label_weight: Tensor,
    acc_sum: Tensor | None = None,
    bins: int = 30,
    momentum: float = 0.75,
) -> Tensor:
    """The elementwise GHM-C loss ``w · BCE`` ``[N, C]`` of the paper's code; ``.sum() / max(#valid, 1)``
    is the paper's loss value."""
    weights = ghmc_reference_weights(pred, target, label_weight, acc_sum, bins, momentum)
    return F.binary_cross_entropy_with_logits(pred, target, weights, reduction="none")


def isr_p_reference(
    loss: Tensor, labels: Tensor, gt_ids: Tensor, ious: Tensor, k: float = 2.0, bias: float = 0.0
) -> Tensor:
    """ISR-P (IoU-HLR) as in the PISA reference code (arXiv 1904.04821), class by class, gt by gt.

    ``loss [N, C]`` the base classification loss; ``labels``, ``gt_ids`` ``[N]`` (-1 for negatives);
    ``ious [N]``. Returns ``loss`` with every positive row multiplied by its ISR-P weight, rescaled
    so the total positive loss is unchanged; negative rows unchanged. The sort key
    ``IoU + (n_max − r_loc)`` is formed in float64 so that it orders exactly by (r_loc, −IoU).
    """
    pos = torch.nonzero(labels >= 0).flatten()
    if pos.numel() == 0:
        return loss
    pos_labels, gts = labels[pos], gt_ids[pos]
    key = ious[pos].double().clone()
    imp = torch.ones(pos.numel(), dtype=loss.dtype)
    max_l_num = pos_labels.bincount().max()
    for cls in pos_labels.unique():
        l_inds = torch.nonzero(pos_labels == cls).flatten()
        l_gts = gts[l_inds]
        for t in l_gts.unique():
            t_inds = l_inds[l_gts == t]
            _, t_rank_idx = key[t_inds].sort(descending=True, stable=True)
            _, t_rank = t_rank_idx.sort(stable=True)
            key[t_inds] += max_l_num - t_rank.double()
        _, l_rank_idx = key[l_inds].sort(descending=True, stable=True)
        _, l_rank = l_rank_idx.sort(stable=True)  # IoU-HLR
        imp[l_inds] *= (max_l_num - l_rank.float()) / max_l_num
    imp = (bias + imp * (1 - bias)).pow(k)
    ratio = loss[pos].sum() / (loss[pos] * imp[:, None]).sum()
    out = loss.clone()
    out[pos] = loss[pos] * (imp * ratio)[:, None]
    return out
