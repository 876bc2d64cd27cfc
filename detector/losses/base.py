"""The loss contract: elementwise, unreduced losses; the YOLO loss owns
assignment, ignore masks and reduction.

- A classification or objectness loss maps ``logits [N, C]`` and ``targets [N, C]`` in [0, 1]
  (soft or one-hot) to ``loss [N, C]``. ``weight [N, C]`` multiplies the result; a zero marks
  an element that takes no part (ignored anchors), which stateful losses (GHM-C) also leave
  out of their statistics. Objectness is the same with C = 1.
- A box loss maps a predicted and a target :class:`BoxSet` to ``loss [N]``.
- Losses that weight samples by more than their own logits (PISA's ISR, CARL) read the
  optional :class:`SampleInfo` the YOLO loss passes alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn


def check_shapes(logits: Tensor, targets: Tensor, weight: Tensor | None) -> None:
    """A ``ValueError`` unless ``logits`` is ``[N, C]``, ``targets`` the same shape and ``weight`` None or that shape."""
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"expected logits and targets of the same shape [N, C], got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if weight is not None and weight.shape != logits.shape:
        raise ValueError(f"weight must be [N, C] = {tuple(logits.shape)}, got {tuple(weight.shape)}")


def weighted(loss: Tensor, weight: Tensor | None) -> Tensor:
    """``loss · weight`` elementwise, or ``loss`` when ``weight`` is None."""
    return loss if weight is None else loss * weight


class BoxSet(NamedTuple):
    """Boxes of N matched anchors in two codings.

    raw:  ``[N, 4]``. For predictions the head's logits (tx, ty, tw, th). For targets the
          darknet coding: cell offsets ``gx·W − i, gy·H − j`` in [0, 1] (compared with σ(tx))
          and ``log(gw / anchor_w), log(gh / anchor_h)`` (compared with tw, th raw).
    xyxy: ``[N, 4]`` corners in units of the (square) input size, so 0..1 inside the image.
          Predictions carry gradient back to the logits.
    """

    raw: Tensor
    xyxy: Tensor


@dataclass
class SampleInfo:
    """What the YOLO loss knows about the N rows it hands to a loss.

    All fields are detached except ``cls_score``. Rows are either positives (assigned to a
    ground truth) or negatives (``gt_ids == -1``).

    labels:    int64 ``[N]`` class of the assigned ground truth, -1 for negatives.
    gt_ids:    int64 ``[N]`` id of the assigned ground truth, unique across the whole batch
               (and across processes in DDP), -1 for negatives.
    ious:      float ``[N]`` IoU of the decoded prediction with its ground truth (0 for negatives).
    boxes:     float ``[N, 4]`` decoded predicted boxes, xyxy in input-size units.
    scores:    float ``[N]`` highest foreground score σ(obj)·max_c σ(cls_c).
    image_ids: int64 ``[N]`` index of the row's image, unique across processes in DDP.
    cls_score: float ``[N]`` σ(logit of the ground-truth class) **with gradient**, positives only
               meaningful (CARL); None when the caller has no class logits.
    """

    labels: Tensor
    gt_ids: Tensor
    ious: Tensor
    boxes: Tensor
    scores: Tensor
    image_ids: Tensor
    cls_score: Tensor | None = None


class ClassificationLoss(nn.Module):
    """Base class of elementwise classification / objectness losses.

    ``forward(logits [N, C], targets [N, C], weight [N, C] | None, info) -> loss [N, C]``.
    ``needs_info``: True when ``forward`` reads ``info``, so the YOLO loss builds it only then.
    """

    needs_info: bool = False

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """``logits [N, C]``, ``targets [N, C]`` in [0, 1], ``weight [N, C] | None`` -> unreduced ``loss [N, C]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


class BoxLoss(nn.Module):
    """Base class of box regression losses: ``forward(pred, target, weight [N] | None, info) -> [N]``.

    ``needs_info``: True when ``forward`` reads ``info`` (CARL).
    """

    needs_info: bool = False

    def forward(
        self, pred: BoxSet, target: BoxSet, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """Predicted and target boxes of N positives, ``weight [N] | None`` -> unreduced ``loss [N]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")
