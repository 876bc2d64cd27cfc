"""Box regression losses: darknet's squared error and the IoU family (LOSSES.md §2).

``forward(pred: BoxSet, target: BoxSet, weight [N] | None, info) -> loss [N]``, unreduced.
``scale="2-wh"`` multiplies by ``2 − w·h`` of the target box (input-size units, detached), so
small boxes weigh up to 2× more, as in darknet.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from .base import BoxLoss, BoxSet, SampleInfo

Scale = Literal["2-wh", "none"]


class _ScaledBoxLoss(BoxLoss):
    """Shared ``scale`` handling, shape checks and ``weight``; subclasses define :meth:`unscaled`."""

    def __init__(self, scale: Scale = "2-wh") -> None:
        super().__init__()
        if scale not in ("2-wh", "none"):
            raise ValueError(f"scale must be '2-wh' or 'none', got {scale!r}")
        self.scale = scale

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        raise NotImplementedError

    def forward(
        self, pred: BoxSet, target: BoxSet, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        n = pred.raw.shape[0]
        named = {"pred.raw": pred.raw, "pred.xyxy": pred.xyxy, "target.raw": target.raw, "target.xyxy": target.xyxy}
        for name, t in named.items():
            if t.shape != (n, 4):
                raise ValueError(f"{name} must be [{n}, 4], got {tuple(t.shape)}")
        if weight is not None and weight.shape != (n,):
            raise ValueError(f"weight must be [{n}], got {tuple(weight.shape)}")
        loss = self.unscaled(pred, target)  # (N,)
        if self.scale == "2-wh":
            wh = (target.xyxy[:, 2:] - target.xyxy[:, :2]).detach()
            loss = loss * (2.0 - wh[:, 0] * wh[:, 1])
        return loss if weight is None else loss * weight

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"


class DarknetBoxLoss(_ScaledBoxLoss):
    """YOLOv3's box loss (arXiv 1804.02767): squared error in the darknet coding.

    ``loss [N] = Σ_{x,y} (σ(t_pred) − t_target)² + Σ_{w,h} (t_pred − t_target)²`` on ``BoxSet.raw``
    (offsets in the cell against σ of the logits, log-size ratios against the raw logits),
    times ``2 − w·h`` (``scale="2-wh"``) and ``weight``.

    Args:
        scale: ``"2-wh"`` multiplies by ``2 − w·h`` of the target box, ``"none"`` does not.
    """

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        """``[N]``: squared error of σ(tx, ty) and of (tw, th) against the target coding."""
        xy = (torch.sigmoid(pred.raw[:, :2]) - target.raw[:, :2]) ** 2
        wh = (pred.raw[:, 2:] - target.raw[:, 2:]) ** 2
        return xy.sum(1) + wh.sum(1)


class GIoULoss(_ScaledBoxLoss):
    """``1 − GIoU`` of ``pred.xyxy`` and ``target.xyxy`` (Rezatofighi et al., arXiv 1902.09630), ``[N]``.

    Args:
        scale: ``"2-wh"`` multiplies by ``2 − w·h`` of the target box, ``"none"`` does not.
    """

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        """``[N]``: ``1 − GIoU`` of the xyxy boxes (torchvision)."""
        return generalized_box_iou_loss(pred.xyxy, target.xyxy, reduction="none")


class DIoULoss(_ScaledBoxLoss):
    """``1 − IoU + ρ²/c²`` (centre distance over enclosing diagonal; Zheng et al., arXiv 1911.08287), ``[N]``.

    Args:
        scale: ``"2-wh"`` multiplies by ``2 − w·h`` of the target box, ``"none"`` does not.
    """

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        """``[N]``: ``1 − DIoU`` of the xyxy boxes (torchvision)."""
        return distance_box_iou_loss(pred.xyxy, target.xyxy, reduction="none")


class CIoULoss(_ScaledBoxLoss):
    """DIoU loss plus the aspect-ratio term ``α·v`` (Zheng et al., arXiv 1911.08287), ``[N]``; Ultralytics' choice.

    Args:
        scale: ``"2-wh"`` multiplies by ``2 − w·h`` of the target box, ``"none"`` does not.
    """

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        """``[N]``: ``1 − CIoU`` of the xyxy boxes (torchvision)."""
        return complete_box_iou_loss(pred.xyxy, target.xyxy, reduction="none")
