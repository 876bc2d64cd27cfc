"""Shared test settings: CPU only, few threads, quiet W&B."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.rank_zero import rank_zero_only  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_rank() -> Iterator[None]:
    """Restore Lightning's process-global rank after each test: a Trainer built for a simulated cluster
    rank (SLURM/torchrun variables, tests/test_cluster_env.py) sets it, and a later W&B logger would then
    act as a non-zero rank and hand out a dummy experiment."""
    rank = rank_zero_only.rank
    yield
    rank_zero_only.rank = rank
