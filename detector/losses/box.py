"""Box regression losses: darknet's box regression and the IoU family.

``forward(pred: BoxSet, target: BoxSet, weight [N] | None, info) -> loss [N]``, unreduced.
``scale="2-wh"`` multiplies by ``2 − w·h`` of the target box (input-size units, detached), so
small boxes weigh up to 2× more, as in darknet.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
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


XYForm = Literal["bce", "squared"]
WHForm = Literal["half_squared", "squared"]


def _soft_bce_minus_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``BCE(x, t) − H(t)`` elementwise (the Bernoulli KL divergence ``KL(t ‖ σ(x))``), gradient ``σ(x) − t``.

    ``H(t) = −t log t − (1 − t) log(1 − t)`` is a constant of the target, so the gradient is BCE's and
    the value is 0 at ``σ(x) = t``. ``H`` is taken at ``t`` clamped to [0, 1] (a target outside it
    still gets the gradient ``σ(x) − t``).
    """
    t = target.clamp(0.0, 1.0)
    entropy = -(torch.xlogy(t, t) + torch.xlogy(1.0 - t, 1.0 - t))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy


class DarknetBoxLoss(_ScaledBoxLoss):
    """YOLOv3's box regression in the darknet coding (arXiv 1804.02767; darknet ``yolo_layer.c``).

    On ``BoxSet.raw`` (offsets in the cell ``t*`` against σ of the logits, log-size ratios against
    the raw logits), times ``2 − w·h`` (``scale="2-wh"``) and ``weight``; ``loss [N]`` sums four terms.

    x, y (``xy``):
      - ``"bce"`` (default): ``BCE(t, t*) − H(t*)`` with the soft target ``t*`` (``H`` its binary
        entropy, so the value is 0 at ``σ(t) = t*``); gradient ``σ(t) − t*``. Darknet's
        ``delta_yolo_box`` writes ``delta = scale·(t* − σ(t))`` and back-propagates it without the
        logistic's derivative: this is the gradient darknet trains with.
      - ``"squared"``: ``(σ(t) − t*)²``, gradient ``2(σ(t) − t*)·σ(t)(1 − σ(t))``: the squared error
        darknet prints (``Σ delta²``), differentiated through the sigmoid.
    w, h (``wh``):
      - ``"half_squared"`` (default): ``½(t − t*)²``, gradient ``t − t*``: darknet's ``delta``.
      - ``"squared"``: ``(t − t*)²``, gradient ``2(t − t*)``.

    The defaults give ``∂loss/∂t = −delta`` of darknet for every box logit (``delta / scale`` with
    ``scale="none"``); the YOLOv3 paper's text says the same ("our gradient is t̂* − t*").

    Args:
        scale: ``"2-wh"`` multiplies by ``2 − w·h`` of the target box, ``"none"`` does not.
        xy: ``"bce"`` or ``"squared"``, see above.
        wh: ``"half_squared"`` or ``"squared"``, see above.
    """

    def __init__(self, scale: Scale = "2-wh", xy: XYForm = "bce", wh: WHForm = "half_squared") -> None:
        super().__init__(scale)
        if xy not in ("bce", "squared"):
            raise ValueError(f"xy must be 'bce' or 'squared', got {xy!r}")
        if wh not in ("half_squared", "squared"):
            raise ValueError(f"wh must be 'half_squared' or 'squared', got {wh!r}")
        self.xy, self.wh = xy, wh

    def unscaled(self, pred: BoxSet, target: BoxSet) -> Tensor:
        """``[N]``: the x, y terms on σ(tx, ty) and the w, h terms on (tw, th) against the target coding."""
        t_xy, t_wh = target.raw[:, :2].to(pred.raw.dtype), target.raw[:, 2:].to(pred.raw.dtype)
        if self.xy == "bce":
            xy = _soft_bce_minus_entropy(pred.raw[:, :2], t_xy)
        else:
            xy = (torch.sigmoid(pred.raw[:, :2]) - t_xy) ** 2
        wh = (pred.raw[:, 2:] - t_wh) ** 2
        if self.wh == "half_squared":
            wh = wh * 0.5
        return xy.sum(1) + wh.sum(1)

    def extra_repr(self) -> str:
        """``scale``, ``xy`` and ``wh`` for ``print(module)``."""
        return f"scale={self.scale!r}, xy={self.xy!r}, wh={self.wh!r}"


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
