"""The optimizer and the learning-rate schedule of :class:`detector.module.DetectorModule`.

The optimizer is injected as a class (``model.optimizer: {class_path, init_args}`` in a config):
the module calls it with its two parameter groups and its own ``lr`` and ``weight_decay``, so the
config's ``init_args`` hold only the algorithm's settings (momentum, betas, ...). The schedule
is the built-in linear warm-up then cosine decay, or any torch scheduler given by class path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class OptimizerFactory(Protocol):
    """An optimizer class whose ``lr`` and ``weight_decay`` the module supplies.

    In a config: ``class_path: torch.optim.AdamW`` and ``init_args`` without ``lr`` and
    ``weight_decay`` (they are ``model.lr`` and ``model.weight_decay``; jsonargparse rejects them
    here, since the protocol names them as supplied by the caller). Any ``torch.optim`` optimizer fits.
    """

    def __call__(self, params: Iterable[Any], /, *, lr: float, weight_decay: float) -> Optimizer:
        """The optimizer over ``params`` (parameters or groups; a group's own ``weight_decay`` wins)."""
        ...


# A torch scheduler class (``model.lr_scheduler: {class_path, init_args}``) called with the optimizer.
SchedulerFactory = Callable[[Optimizer], LRScheduler]

# darknet's and Ultralytics' choice: SGD with Nesterov momentum 0.937
DEFAULT_OPTIMIZER: OptimizerFactory = partial(torch.optim.SGD, momentum=0.937, nesterov=True)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights of convs (``ndim > 1``) decay by ``weight_decay``; norm weights and biases do not."""
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, epochs: int, warmup_epochs: float, min_lr_ratio: float
) -> LambdaLR:
    """Per optimizer step: linear warm-up over ``warmup_epochs``, then cosine decay to ``lr·min_lr_ratio``.

    With ``W = max(⌊warmup_epochs·total_steps/epochs⌋, 1)`` warm-up steps (0 when ``warmup_epochs``
    is 0), the factor of ``lr`` at step ``t`` is ``(t + 1)/W`` for ``t < W``, then
    ``r + (1 − r)·½(1 + cos(π·u))`` with ``u = min((t − W)/max(total_steps − W, 1), 1)`` and
    ``r = min_lr_ratio`` (SGDR's cosine, Loshchilov & Hutter, arXiv 1608.03983, without restarts).
    """
    warmup = max(int(warmup_epochs * total_steps / epochs), 1) if warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of a checkpoint written before the optimizer was injected, in today's form.

    Those name the optimizer ``"sgd"`` (Nesterov) or ``"adamw"`` with a ``momentum`` (SGD's momentum,
    AdamW's β1); today's give the class: ``{"class_path": "torch.optim.SGD", "init_args":
    {"momentum": m, "nesterov": True}}`` or ``torch.optim.AdamW`` with ``betas: [m, 0.999]``, the
    same optimizers. Anything else is returned unchanged.
    """
    name = hparams.get("optimizer")
    if not isinstance(name, str) or name not in ("sgd", "adamw"):
        return dict(hparams)
    out = {k: v for k, v in hparams.items() if k != "momentum"}
    m = hparams.get("momentum", 0.937)
    if name == "sgd":
        out["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"momentum": m, "nesterov": True}}
    else:
        out["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"betas": [m, 0.999]}}
    return out
