"""Freeze the pretrained backbone for the first epochs of a fine-tuning run."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class FreezeBackbone(L.Callback):
    """Keep the backbone (``pl_module.model.backbone``) fixed for the first ``epochs`` training epochs,
    then train it with the rest of the network.

    While frozen, the backbone is in eval mode (BatchNorm normalises with, and keeps, its pretrained
    running statistics: the backbone computes exactly the loaded function) and its gradients are
    dropped before each optimizer step, after DDP has averaged them and before gradient clipping.
    SGD and AdamW skip a parameter without a gradient, so its weights, momentum and weight decay
    stay untouched. From epoch ``epochs`` on it trains in the same optimizer groups, under the same
    warm-up and cosine schedule and weight decay as the rest.

    Lightning's ``BackboneFinetuning`` freezes by ``requires_grad`` instead and adds the backbone as a
    new parameter group when it unfreezes it. Here that would (1) be unsafe under DDP: the wrapper
    is built after the freeze and never all-reduces parameters that did not require a gradient
    then, so each process's backbone would drift apart silently; (2) leave the new group outside the
    per-step schedule and without weight decay; (3) skip parameters it takes for ones already in the
    optimizer, which it tells by value (``torch.equal``), not identity. The price of dropping
    gradients instead: the backward pass still runs through the frozen backbone.

    Args:
        epochs: training epochs with the backbone frozen (0: never frozen).
    """

    def __init__(self, epochs: int = 2) -> None:
        if epochs < 0:
            raise ValueError(f"FreezeBackbone epochs must be >= 0, got {epochs}")
        self.epochs = epochs

    @staticmethod
    def backbone(pl_module: L.LightningModule) -> nn.Module:
        """The module frozen: ``pl_module.model.backbone`` (or ``pl_module.backbone``)."""
        module = getattr(getattr(pl_module, "model", None), "backbone", None) or getattr(pl_module, "backbone", None)
        if not isinstance(module, nn.Module):
            raise AttributeError(
                f"FreezeBackbone needs a `model.backbone` or `backbone` module on {type(pl_module).__name__}"
            )
        return module

    def frozen(self, trainer: L.Trainer) -> bool:
        """True during the first ``epochs`` epochs."""
        return trainer.current_epoch < self.epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Eval mode for the frozen backbone (validation restores it), training mode once it is released."""
        self.backbone(pl_module).train(not self.frozen(trainer))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Drop the backbone's gradients while it is frozen."""
        if self.frozen(trainer):
            for p in self.backbone(pl_module).parameters():
                p.grad = None
