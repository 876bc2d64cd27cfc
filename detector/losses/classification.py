"""Elementwise classification losses: sigmoid BCE, softmax cross-entropy and focal loss.

Every loss maps ``logits [N, C]``, ``targets [N, C]`` in [0, 1] and an optional
``weight [N, C]`` to ``loss [N, C]``, unreduced.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from .base import ClassificationLoss, SampleInfo, check_shapes, weighted


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


class BCE(ClassificationLoss):
    """Sigmoid binary cross-entropy per (anchor, class), YOLOv3's choice (arXiv 1804.02767).

    ``loss [N, C] = −y log σ(x) − (1 − y) log(1 − σ(x))``, times ``weight [N, C]`` if given,
    with ``∂loss/∂x = σ(x) − y`` (darknet's ``delta = y − σ(x)`` is its negative).

    Args:
        label_smoothing: ε; targets become ``y(1 − ε) + ε/2``.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """``logits [N, C]``, ``targets [N, C]`` -> elementwise BCE ``[N, C]`` on smoothed targets, times ``weight``."""
        check_shapes(logits, targets, weight)
        eps = self.label_smoothing
        targets = targets.to(logits.dtype)
        if eps > 0:
            targets = targets * (1.0 - eps) + eps / 2.0
        return weighted(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), weight)

    def extra_repr(self) -> str:
        """``label_smoothing`` for ``print(module)``."""
        return f"label_smoothing={self.label_smoothing}"


class SoftmaxCrossEntropy(ClassificationLoss):
    """Softmax cross-entropy, elementwise over classes (YOLOv2, SSD).

    ``loss [N, C]``: ``loss_i = −y_i log softmax(x)_i``, times ``weight [N, C]`` if given;
    summing over C gives the usual CE, whose gradient for a one-hot (or any sum-to-one) y is
    ``softmax(x) − y``.

    Args:
        label_smoothing: ε; targets become ``y(1 − ε) + ε/C``.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """``logits [N, C]``, ``targets [N, C]`` -> ``−y_i log softmax(x)_i`` ``[N, C]`` (smoothed y) x ``weight``."""
        check_shapes(logits, targets, weight)
        eps = self.label_smoothing
        targets = targets.to(logits.dtype)
        if eps > 0:
            targets = targets * (1.0 - eps) + eps / logits.shape[1]
        return weighted(-targets * F.log_softmax(logits, dim=1), weight)

    def extra_repr(self) -> str:
        """``label_smoothing`` for ``print(module)``."""
        return f"label_smoothing={self.label_smoothing}"


class FocalLoss(ClassificationLoss):
    """Sigmoid focal loss (Lin et al., arXiv 1708.02002), via ``torchvision.ops.sigmoid_focal_loss``.

    ``loss [N, C] = −α_t (1 − p_t)^γ log p_t`` with ``p_t = p`` if y = 1 else ``1 − p`` and
    ``α_t = α`` if y = 1 else ``1 − α``; times ``weight [N, C]`` if given. Normalise by the
    number of positives (the YOLO loss's ``normalize: num_pos``, all-reduced under DDP) as in the paper.

    Args:
        alpha: α in [0, 1]; None disables the α weighting (α_t = 1).
        gamma: γ ≥ 0; γ = 0 gives α_t-weighted BCE.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """``logits [N, C]``, ``targets [N, C]`` -> elementwise focal loss ``[N, C]``, times ``weight``."""
        check_shapes(logits, targets, weight)
        alpha = -1.0 if self.alpha is None else self.alpha  # torchvision: alpha < 0 -> no weighting
        loss = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=self.gamma, reduction="none")
        return weighted(loss, weight)

    def extra_repr(self) -> str:
        """``alpha`` and ``gamma`` for ``print(module)``."""
        return f"alpha={self.alpha}, gamma={self.gamma}"
