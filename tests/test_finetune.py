"""configs/finetune.yaml (FreezeBackbone) and configs/early_stopping.yaml, run through the CLI on tiny data."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from detector.callbacks import FreezeBackbone
from detector.cli import DetectorCLI, cli_kwargs
from detector.data import DetectionDataModule
from detector.models import YOLOv3
from detector.models.darknet_weights import save_darknet
from detector.module import DetectorModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cli(tmp_path: Path, *args: str) -> DetectorCLI:
    base = ["--config", str(CONFIGS / "default.yaml"), "--data.root", str(tmp_path / "shapes"),
            "--data.embedded", "{num_train: 8, num_val: 2, seed: 0}", "--data.image_size", "64",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip
    return DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=[*base, *args], **cli_kwargs())


class Snapshots(L.Callback):
    """The backbone's state (parameters and BN statistics) and one head weight after every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.head: list[torch.Tensor] = []
        self.backbone_training: list[bool] = []

    def _take(self, pl_module: L.LightningModule) -> None:
        state = pl_module.model.backbone.state_dict()
        self.states.append({k: v.clone() for k, v in state.items() if "num_batches" not in k})
        self.head.append(pl_module.model.heads[0][0][0].weight.detach().clone())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.backbone_training.append(pl_module.model.backbone.training)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(pl_module)


def test_finetune_config_freezes_the_backbone_then_trains_it(tmp_path: Path) -> None:
    pretrained = YOLOv3(num_classes=1, preset="nano")  # a darknet backbone file, as darknet53.conv.74 is
    with torch.no_grad():
        for bn in (m for m in pretrained.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.uniform_(0.5, 2.0), bn.running_mean.normal_(0, 0.1), bn.bias.normal_(0, 0.1)
    save_darknet(pretrained, tmp_path / "nano.conv.26", cutoff=26)
    cli = _cli(tmp_path, "--config", str(CONFIGS / "finetune.yaml"), "--model.preset", "nano",
               "--model.weights", str(tmp_path / "nano.conv.26"),
               "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "5")  # fmt: skip
    assert (cli.model.hparams["lr"], cli.model.hparams["warmup_epochs"]) == (0.001, 3.0)
    freeze = [c for c in cli.trainer.callbacks if isinstance(c, FreezeBackbone)]
    assert len(freeze) == 1 and freeze[0].epochs == 2
    snaps = Snapshots()
    cli.trainer.callbacks.append(snaps)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 6 and len(snaps.states) == 4  # 2 steps per epoch; start + 3 epochs
    assert snaps.backbone_training == [False] * 4 + [True] * 2  # eval mode while frozen
    for k, v in pretrained.backbone.state_dict().items():  # loaded by --model.weights
        if "num_batches" not in k:
            torch.testing.assert_close(snaps.states[0][k], v, rtol=1e-6, atol=0)
    for epoch in (1, 2):  # frozen: parameters and running statistics exactly as loaded
        assert all(torch.equal(v, snaps.states[0][k]) for k, v in snaps.states[epoch].items())
    changed = [k for k, v in snaps.states[3].items() if not torch.equal(v, snaps.states[2][k])]
    assert len(changed) == len(snaps.states[0])  # released: every tensor of the backbone moves
    assert not torch.equal(snaps.head[1], snaps.head[0])  # the head trains from the first step
    assert len(cli.trainer.optimizers[0].param_groups) == 2  # the backbone was in the optimizer all along


def test_freeze_backbone_rejects_negative_epochs() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 0, got -1"):
        FreezeBackbone(-1)


def fake_map(module: DetectorModule, values: list[float]) -> list[int]:
    """Make validation number i log ``val/map = values[i]`` (the real mAP is still computed); return the
    list the epochs of the validations go to."""
    epochs: list[int] = []
    compute = module.val_map.compute

    def fake() -> dict:
        result = compute()
        if not module.trainer.sanity_checking:
            result["map"] = torch.tensor(values[len(epochs)])
            epochs.append(module.trainer.current_epoch)
        return result

    module.val_map.compute = fake  # type: ignore[method-assign]
    return epochs


def test_early_stopping_config_counts_validations_without_improvement(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--config", str(CONFIGS / "early_stopping.yaml"), "--trainer.max_epochs", "20",
               "--trainer.check_val_every_n_epoch", "2", "--data.embedded", "{num_train: 4, num_val: 2, seed: 0}",
               "--trainer.callbacks.patience", "2")  # fmt: skip
    early = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert len(early) == 1 and (early[0].monitor, early[0].mode, early[0].patience) == ("val/map", "max", 2)
    epochs = fake_map(cli.model, [0.2, 0.1, 0.15, 0.05, 0.3, 0.4])
    cli.trainer.fit(cli.model, cli.datamodule)
    # mode max: 0.1 and 0.15 do not beat 0.2, so the 3rd validation (epoch 5) stops the run; mode min
    # would improve at 0.1 and 0.05 and run on; patience counted in epochs would stop at epoch 2
    assert epochs == [1, 3, 5] and early[0].stopped_epoch == 5 and early[0].best_score.item() == pytest.approx(0.2)
    assert cli.trainer.current_epoch == 6 and cli.trainer.global_step == 6


def test_early_stopping_on_the_command_line(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/map",
               "--trainer.callbacks.mode", "max", "--trainer.callbacks.patience", "3")  # fmt: skip
    early = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert len(early) == 1 and (early[0].monitor, early[0].mode, early[0].patience) == ("val/map", "max", 3)
