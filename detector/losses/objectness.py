"""Objectness losses: the classification contract with C = 1.

``logits [N, 1]``, ``targets [N, 1]`` in [0, 1], ``weight [N, 1]`` (0 for ignored anchors)
-> ``loss [N, 1]``, unreduced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ClassificationLoss, SampleInfo, check_shapes, weighted
from .classification import BCE


class BCEObjectness(BCE):
    """Binary cross-entropy on the objectness logit, as the YOLOv3 paper says (arXiv 1804.02767).

    ``loss = −y log σ(x) − (1 − y) log(1 − σ(x))`` with gradient ``σ(x) − y``: exactly the
    negative of darknet's ``delta = y − σ(x)``, which ``yolo_layer.c`` back-propagates without the
    logistic's derivative, so this is the objectness darknet trains. ``label_smoothing`` as in :class:`BCE`.
    """


class MSEObjectness(ClassificationLoss):
    """Squared error through the sigmoid on objectness: the naive reading of darknet's printed cost.

    ``loss = (σ(x) − y)²``, times ``weight`` if given, with gradient ``2(p − y)·p(1 − p)``, which
    vanishes for confident mistakes (p → 0 or 1). Darknet prints ``Σ delta²`` with
    ``delta = y − p`` but trains with the gradient ``p − y`` (BCE's, :class:`BCEObjectness`); this
    loss is what one trains by differentiating the printed formula (recipe ``mse_obj``).
    """

    def forward(
        self, logits: Tensor, targets: Tensor, weight: Tensor | None = None, info: SampleInfo | None = None
    ) -> Tensor:
        """``logits [N, 1]``, ``targets [N, 1]`` -> ``(σ(x) − y)²`` ``[N, 1]``, times ``weight``."""
        check_shapes(logits, targets, weight)
        return weighted((torch.sigmoid(logits) - targets.to(logits.dtype)) ** 2, weight)
