"""Which images each process loads, in what order, and how a run resumes in the middle of an epoch.

Training (``TrainSampler`` + ``ResumableDataLoader``):

    permutation(epoch)  = numpy Generator(SeedSequence([0, seed, epoch])).permutation(N)
    padded              = permutation + permutation[:total - N]      total = R * ceil(N / R)
    shard(rank, epoch)  = padded[rank::R]                             R processes (1 without DDP)

The sampler yields ``ItemKey(index, epoch)``, so the dataset knows the epoch of every item it
loads, in whichever worker process it runs, and can seed that item's augmentation from
``item_rng(seed, epoch, index)`` alone: batches and pixels depend on (seed, epoch, position),
never on ``num_workers`` or on which worker loaded an item. Shards are disjoint when R divides N;
otherwise the first ``total - N`` images of the permutation are seen twice (as
``torch.utils.data.DistributedSampler`` does: every rank must run the same number of steps).

``ResumableDataLoader`` counts the batches it has handed out; ``progress()`` is ``(epoch,
batches)``. Restarting with ``resume(epoch, batches)`` (before iterating) skips exactly those
batches of that epoch's shard, so the stream continues where it stopped. Lightning fetches no
batch ahead from a loader with a length, so the count is what the training loop has consumed.

Evaluation (``eval_sampler``): Lightning's ``UnrepeatedDistributedSampler`` — rank r takes
images ``r, r + R, r + 2R, ...`` in file order, nothing padded or dropped, so under DDP every
image is evaluated exactly once (ranks may differ by one image).

Both samplers subclass ``DistributedSampler``, so Lightning keeps them as they are rather than
wrapping them in its own ``DistributedSampler`` (that wrapper would reshuffle the training order
with its own seed and know nothing of a mid-epoch resume, and would pad the evaluation set).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detector.data.pipeline.collate import collate

_PERMUTATION, _ITEM = 0, 1  # SeedSequence domain tags: the two streams never share a seed


class ItemKey(NamedTuple):
    """A training dataset key: image ``index`` (row in the dataset) drawn in ``epoch``."""

    # the field shadows tuple.index(), never called on keys; kept for the ``ItemKey(index, epoch)`` API
    index: int  # type: ignore[assignment]
    epoch: int


def global_seed() -> int:
    """The seed of the last ``seed_everything`` (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one training item: a pure function of ``(seed, epoch, index)``."""
    return np.random.default_rng(np.random.SeedSequence([_ITEM, seed, epoch, index]))


def world(trainer: Any = None) -> tuple[int, int]:
    """``(num_replicas, rank)``: from the trainer's strategy, else ``torch.distributed``, else ``(1, 0)``."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if kwargs:
        return int(kwargs["num_replicas"]), int(kwargs["rank"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class TrainSampler(DistributedSampler[ItemKey]):
    """Shuffled ``ItemKey``s, a pure function of (seed, epoch), sharded over ranks, resumable.

    Args:
        dataset: anything with ``len``; N = ``len(dataset)``.
        num_replicas / rank: the process group (1 / 0 without DDP).
        seed: global seed (``seed_everything``); non-negative.
        epoch: the epoch to start at (``set_epoch`` changes it, as for ``DistributedSampler``).

    ``len(sampler)`` is the full shard length ``ceil(N / R)``; after ``resume(epoch, start)`` the
    next pass of that epoch yields the shard from position ``start`` on.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0) -> None:
        if seed < 0 or epoch < 0:
            raise ValueError(f"TrainSampler: seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        # DistributedSampler types ``dataset`` as a Dataset, yet reads only its ``len``
        super().__init__(
            cast(Dataset, dataset), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.epoch = epoch
        self.start = 0  # shard positions to skip in passes over self.epoch (set by resume)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a pending resume offset only survives for the epoch it was set for."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def resume(self, epoch: int, start: int) -> None:
        """Make the next passes over ``epoch`` begin at shard position ``start`` (0 <= start <= len)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"TrainSampler.resume: start {start} outside the shard of {self.num_samples} items")
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``: ``int64 [num_samples]`` (see the module docstring)."""
        n = len(cast(Sized, self.dataset))
        rng = np.random.default_rng(np.random.SeedSequence([_PERMUTATION, self.seed, epoch]))
        perm = rng.permutation(n)  # (N,)
        perm = np.concatenate([perm, np.resize(perm, self.total_size - n)])  # (total,) padded by wrapping
        return perm[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[ItemKey]:
        epoch = self.epoch
        return iter([ItemKey(int(i), epoch) for i in self.shard(epoch)[self.start :]])


def eval_sampler(dataset: Sized, num_replicas: int = 1, rank: int = 0) -> UnrepeatedDistributedSampler:
    """In-order indices of rank ``rank``: ``range(rank, N, num_replicas)`` — every image exactly once.

    Raises ``ValueError`` when a rank would get no image (a DDP rank with no batch would hang
    the first forward pass of the others).
    """
    n = len(dataset)
    if 0 < n < num_replicas:
        raise ValueError(
            f"the evaluation set has {n} images, fewer than the {num_replicas} processes: add images or use fewer devices"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def check_loader_args(batch_size: int, num_workers: int) -> None:
    """A one-line ``ValueError`` unless ``batch_size`` > 0 and ``num_workers`` >= 0."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def detection_loader(
    dataset: Dataset,
    world: tuple[int, int],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> DataLoader:
    """The loader of ``dataset`` for one rank of ``world = (num_replicas, rank)``, batched by ``collate``.

    ``train``: a ``ResumableDataLoader`` over ``TrainSampler(seed=seed, epoch=epoch)``; else a ``DataLoader``
    over ``eval_sampler`` (every image once, in order, a disjoint share per rank).
    """
    sized = cast(Sized, dataset)
    sampler: DistributedSampler = (
        TrainSampler(sized, *world, seed=seed, epoch=epoch) if train else eval_sampler(sized, *world)
    )
    return (ResumableDataLoader if train else DataLoader)(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate,
    )


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``TrainSampler`` that knows how far into the epoch it has got.

    ``progress()`` -> ``(epoch, batches handed out in that epoch, counting resumed ones)``;
    ``resume(epoch, batches)`` skips that many batches of ``epoch`` at the next iteration.
    The state is saved and restored by ``DetectionDataModule.state_dict`` / ``load_state_dict``,
    which Lightning calls before the first train iterator exists (also when
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, which builds the
    loader early and makes Lightning skip its own loader-state restore: Lightning issue #20550).
    ``state_dict`` / ``load_state_dict`` here are empty on purpose: they tell Lightning the loader
    is resumable, while the one copy of the state lives in the datamodule's checkpoint entry.
    """

    _epoch: int = 0
    _batches: int = 0

    def _train_sampler(self) -> TrainSampler:
        if not isinstance(self.sampler, TrainSampler):
            raise TypeError(f"ResumableDataLoader needs a TrainSampler, got {type(self.sampler).__name__}")
        return self.sampler

    def _batch_size(self) -> int:
        """``batch_size``, always set here: the loader is built with one, not with a ``batch_sampler``."""
        if self.batch_size is None:
            raise TypeError("ResumableDataLoader needs a batch_size (a batch_sampler is not supported)")
        return self.batch_size

    def progress(self) -> tuple[int, int]:
        """``(epoch, batches)`` of the current (or last) pass."""
        if not isinstance(self.sampler, TrainSampler):  # e.g. Lightning's overfit_batches swapped it
            return self._epoch, self._batches
        if self._epoch != self.sampler.epoch:  # set_epoch moved on, no batch drawn yet
            return self.sampler.epoch, -(-self.sampler.start // self._batch_size())
        return self._epoch, self._batches

    def resume(self, epoch: int, batches: int) -> None:
        """Start the next pass at batch ``batches`` of ``epoch`` (this rank's shard)."""
        sampler = self._train_sampler()
        sampler.resume(epoch, min(batches * self._batch_size(), len(sampler)))
        self._epoch, self._batches = epoch, batches

    # DataLoader.__iter__ is typed to return its _BaseDataLoaderIter; this returns a counting generator
    # over that iterator, and Lightning's fetchers only call next() on it
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if isinstance(sampler, TrainSampler):  # what the sampler will draw from, fixed before any worker pulls
            self._epoch, self._batches = sampler.epoch, -(-sampler.start // self._batch_size())  # ceil
        return self._count(super().__iter__())

    def _count(self, inner: Iterator[Any]) -> Iterator[Any]:
        for batch in inner:
            self._batches += 1
            yield batch
        if isinstance(self.sampler, TrainSampler):
            self.sampler.start = 0  # a finished pass leaves no offset behind

    def state_dict(self) -> dict[str, Any]:
        """Empty: marks the loader as resumable for Lightning; the state is the datamodule's (see above)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: the datamodule's ``load_state_dict`` calls :meth:`resume` instead."""
        return None
