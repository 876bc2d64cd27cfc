"""A tiny LightningModule with a scripted ``val/map`` and the ModelCheckpoints of configs/default.yaml,
for tests of what is saved when (in-process, about a second per fit)."""

from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
IMAGES, BATCH = 8, 2
STEPS_PER_EPOCH = IMAGES // BATCH


class Scripted(L.LightningModule):
    """A linear layer fitted to fixed random data; each validation logs the next value of ``maps``
    as ``val/map``, so a test decides which validations improve."""

    def __init__(self, maps: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.maps = list(maps)
        self.validations = 0
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(IMAGES, 4, generator=g), torch.randn(IMAGES, 1, generator=g))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("val/map", self.maps[self.validations])
            self.validations += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH)


def default_checkpoints() -> list[ModelCheckpoint]:
    """The ``ModelCheckpoint`` entries of configs/default.yaml's ``trainer.callbacks``, instantiated
    by jsonargparse as the CLI does."""
    callbacks = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["trainer"]["callbacks"]
    specs = [c for c in callbacks if isinstance(c, dict) and c["class_path"].endswith(".ModelCheckpoint")]
    parser = ArgumentParser()
    parser.add_argument("--checkpoints", type=list[ModelCheckpoint])
    return parser.instantiate_classes(parser.parse_object({"checkpoints": specs})).checkpoints


def trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:  # noqa: ANN003
    """A CPU trainer (without logger unless given) writing to ``root/checkpoints``, no sanity check, quiet."""
    defaults = {"logger": False, "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(default_root_dir=root, callbacks=callbacks, **{**defaults, **kwargs})


def saved(path: Path) -> tuple[int, int]:
    """``(epoch, global_step)`` of a checkpoint file."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state["epoch"], state["global_step"]
