"""Training data order and augmentation: a pure function of (seed, epoch, position), resumable mid-epoch;
evaluation sharding: every image exactly once under DDP."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from detector.data import DetectionDataModule, ShapesConfig
from detector.data.pipeline.samplers import ItemKey, TrainSampler, eval_sampler, item_rng

TINY = ShapesConfig(num_train=10, num_val=3, seed=2, min_size=64, max_size=96)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    DetectionDataModule(root=str(root), embedded=TINY, image_size=64, num_workers=0)
    return root


def _datamodule(root, num_workers: int, seed: int = 7) -> DetectionDataModule:
    dm = DetectionDataModule(
        root=str(root), embedded=TINY, image_size=64, batch_size=4, num_workers=num_workers, seed=seed
    )
    dm.setup("fit")
    return dm


def _summary(batch) -> tuple[list[int], list[float]]:
    """Image ids and per-image pixel sums of a batch: the order and the augmentation."""
    images, targets = batch
    return [int(t["image_id"]) for t in targets], images.sum((1, 2, 3)).tolist()


def _epochs(loader, epochs: range) -> list:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        out += [(epoch, *_summary(b)) for b in loader]
    return out


# --- the permutation and its shards --------------------------------------------------------------


def test_permutation_is_a_pure_function_of_seed_and_epoch():
    a, b = TrainSampler(range(10), seed=3), TrainSampler(range(10), seed=3)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        keys = list(a)
        assert keys == list(b) and all(k.epoch == epoch for k in keys)
        assert sorted(k.index for k in keys) == list(range(10))
    orders = {tuple(TrainSampler(range(10), seed=3, epoch=e).shard(e)) for e in range(5)}
    assert len(orders) == 5  # every epoch its own order
    assert list(TrainSampler(range(10), seed=4).shard(0)) != list(a.shard(0))  # and every seed


def test_item_rng_depends_on_every_coordinate():
    draws = {(s, e, i): item_rng(s, e, i).integers(2**62) for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(set(draws.values())) == 8
    assert item_rng(1, 0, 1).integers(2**62) == draws[(1, 0, 1)]


@pytest.mark.parametrize("n,replicas", [(10, 2), (12, 3), (7, 2), (5, 4)])
def test_training_shards_split_one_permutation(n, replicas):
    shards = [TrainSampler(range(n), replicas, r, seed=1, epoch=2).shard(2) for r in range(replicas)]
    perm = TrainSampler(range(n), seed=1, epoch=2).shard(2)  # the single-process order
    size = -(-n // replicas)
    assert all(len(s) == size for s in shards)  # equal step counts on every rank
    interleaved = np.stack(shards, 1).reshape(-1)  # rank r takes positions r, r + R, ...
    assert list(interleaved[:n]) == list(perm)
    assert list(interleaved[n:]) == list(np.resize(perm, size * replicas - n))  # the padding repeats the start
    if n % replicas == 0:
        assert sorted(interleaved) == list(range(n))  # disjoint and covering


def test_eval_shards_have_no_padding():
    shards = [list(eval_sampler(range(7), 2, r)) for r in range(2)]
    assert [len(s) for s in shards] == [4, 3]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]  # in order, disjoint, covering
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        eval_sampler(range(3), 4, 0)


# --- the stream through the real datamodule --------------------------------------------------------


@pytest.fixture(scope="module")
def reference(root):
    """Two epochs of training batches with workers in the main process."""
    return _epochs(_datamodule(root, 0).train_dataloader(), range(2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_is_the_same_for_any_worker_count(root, reference, num_workers):
    stream = _epochs(_datamodule(root, num_workers).train_dataloader(), range(2))
    assert stream == reference
    ids = [[i for e, b, _ in stream if e == epoch for i in b] for epoch in range(2)]
    assert sorted(ids[0]) == sorted(ids[1]) and ids[0] != ids[1]  # each epoch all images, a new order
    assert _epochs(_datamodule(root, 0, seed=8).train_dataloader(), range(1)) != reference[:3]


def test_the_same_item_is_augmented_the_same_and_differently_each_epoch(root):
    ds = _datamodule(root, 0).train_set
    first, again, later = ds[ItemKey(3, 0)][0], ds[ItemKey(3, 0)][0], ds[ItemKey(3, 1)][0]
    assert torch.equal(first, again) and not torch.equal(first, later)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_resume_from_state_dict_continues_the_stream(root, reference, num_workers, k):
    dm = _datamodule(root, num_workers)
    loader = dm.train_dataloader()  # 10 images / batch 4: 3 batches per epoch
    it = iter(loader)
    seen = [(0, *_summary(next(it))) for _ in range(k)]
    state = dm.state_dict()
    assert state == ({"epoch": 0, "batches": k} if k < 3 else {"epoch": 1, "batches": 0})

    fresh = _datamodule(root, num_workers)
    fresh.load_state_dict(state)
    resumed = fresh.train_dataloader()
    rest = [(state["epoch"], *_summary(b)) for b in resumed] + _epochs(resumed, range(state["epoch"] + 1, 2))
    assert seen + rest == reference
    assert fresh.state_dict() == {"epoch": 2, "batches": 0}


# --- through Lightning: stop after a checkpoint, resume with ckpt_path ------------------------------


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, *_summary(batch)))
        return (self.w * batch[0].mean()).sum()

    def configure_optimizers(self):
        _ = self.trainer.estimated_stepping_batches  # builds the train loader early, as DetectorModule does
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Killed(Exception):
    pass


class _SaveAndDie(L.Callback):
    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Killed


def _fit(root, num_workers, callbacks=(), ckpt_path=None) -> list:
    L.seed_everything(5)
    model, dm = _Recorder(), _datamodule(root, num_workers, seed=None)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
    )  # fmt: skip
    try:
        trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=False)
    except _Killed:
        pass
    return model.seen


@pytest.mark.parametrize("num_workers,step", [(0, 2), (2, 4), (0, 3)])  # mid-epoch 0, mid-epoch 1, epoch end
def test_trainer_resume_sees_the_uninterrupted_stream(root, tmp_path, num_workers, step):
    whole = _fit(root, num_workers)
    before = _fit(root, num_workers, [_SaveAndDie(step, tmp_path / "k.ckpt")])
    after = _fit(root, num_workers, ckpt_path=tmp_path / "k.ckpt")
    assert len(before) == step and before + after == whole


# --- with torch.distributed initialised (simulated: 2 ranks in turn, no trainer) --------------------


def test_shards_follow_torch_distributed(root, monkeypatch):
    """Without a trainer the datamodule reads the world from ``torch.distributed`` (it issues no collective)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        dm = _datamodule(root, 0)
        dm.setup("validate")
        train = [i for b in dm.train_dataloader() for i in _summary(b)[0]]
        val = [int(t["image_id"]) for _, targets in dm.val_dataloader() for t in targets]
        seen.append((train, val))
    (train0, val0), (train1, val1) = seen
    assert len(train0) == len(train1) == 5 and sorted(train0 + train1) == list(range(1, 11))  # 10 images, disjoint
    assert val0 == [1, 3] and val1 == [2]  # 3 images, each once, no padding
