"""Mosaic for training samples: with probability ``prob`` an item is a 2 x 2 mosaic of four images.

``MosaicTiler`` is the part of the training dataset (``TransformedDataset(mosaic=...)``)
that decides and builds mosaics. For item ``i`` of epoch ``e`` it draws, from the item's
generator ``item_rng(seed, e, i)`` (``detector.data.pipeline.samplers``), first whether to tile, then
the three partner indices (uniform over the dataset, repeats allowed), then the random state
of the mosaic pipeline (``mosaic_transforms``). So a mosaic sample, like any other, is a pure
function of ``(seed, e, i)``, and a non-mosaic item still decodes one image only.

Close mosaic (YOLOX): with ``mosaic_epochs = E`` mosaics are made in epochs ``0 .. E-1``
only. The epoch comes with every training key (``ItemKey(index, epoch)`` from
``TrainSampler``), so persistent dataloader workers, which hold their own copy of the
dataset, switch exactly at epoch ``E`` with no message from the main process.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import numpy as np

from detector.data.pipeline.transforms import apply

NUM_PARTNERS = 3  # a 2 x 2 grid: the item and three others


def check_mosaic(prob: float, close_mosaic: int) -> None:
    """A one-line ``ValueError`` unless ``prob`` is in [0, 1] and ``close_mosaic`` >= 0 (``data.mosaic``, ``data.close_mosaic``)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mosaic is a probability and must be in [0, 1], got {prob}")
    if close_mosaic < 0:
        raise ValueError(f"close_mosaic must be >= 0 (epochs at the end without mosaic), got {close_mosaic}")


def mosaic_epochs(max_epochs: int | None, close_mosaic: int) -> int:
    """``MosaicTiler.mosaic_epochs`` for a run of ``max_epochs`` whose last ``close_mosaic`` epochs have no
    mosaic: ``max(max_epochs - close_mosaic, 0)``; a ``ValueError`` when ``max_epochs`` is not finite."""
    if max_epochs is None or max_epochs < 0:
        raise ValueError("close_mosaic needs a finite trainer.max_epochs (set it, or set data.close_mosaic: 0)")
    return max(max_epochs - close_mosaic, 0)


class MosaicTiler:
    """Builds mosaic samples (see the module docstring).

    Args:
        transform: ``mosaic_transforms(size, augment=...)``; reseeded for every mosaic item.
        prob: probability that an item is a mosaic, in [0, 1].
        mosaic_epochs: make mosaics only while ``epoch < mosaic_epochs`` (``None``: always).
    """

    def __init__(self, transform: A.Compose, prob: float, mosaic_epochs: int | None = None):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mosaic probability must be in [0, 1], got {prob}")
        self.transform, self.prob, self.mosaic_epochs = transform, prob, mosaic_epochs

    def active(self, epoch: int) -> bool:
        """Whether items of ``epoch`` may be mosaics."""
        return self.prob > 0 and (self.mosaic_epochs is None or epoch < self.mosaic_epochs)

    def __call__(
        self, base: Any, sample: dict[str, Any], rng: np.random.Generator, epoch: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A mosaic of ``sample`` and three items of ``base`` -> ``(image (S, S, 3), boxes (N, 4), labels (N,))``,
        or ``None`` when this item is not to be a mosaic (drawn from ``rng``, the item's generator)."""
        if not self.active(epoch) or rng.random() >= self.prob:
            return None
        partners = rng.integers(0, len(base), size=NUM_PARTNERS)
        self.transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        extras = [(s["image"], s["boxes"], s["labels"]) for s in (base[int(j)] for j in partners)]
        return apply(self.transform, sample["image"], sample["boxes"], sample["labels"], extras)
