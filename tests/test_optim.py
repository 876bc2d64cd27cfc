"""The injected optimizer and schedule (detector/optim.py) and what LightningCLI 2.6 does with injected parts.

Pinned library behaviour: jsonargparse builds a class given for an ``OptimizerFactory`` (a protocol
whose ``__call__`` names ``lr`` and ``weight_decay``) as a partial that takes them from the caller and
rejects them in ``init_args``; LightningCLI's instantiator hands the model's config (injected parts as
``class_path``/``init_args`` dicts) to ``save_hyperparameters`` with ``_instantiator``;
``load_from_checkpoint`` and ``lightning.pytorch.cli.instantiate_module`` rebuild them from it;
LightningCLI calls ``_parse_ckpt_path`` (overridden in detector/cli.py) for a ``--ckpt_path`` file.
"""

import math
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from detector.cli import DetectorCLI, cli_kwargs, main
from detector.data import DetectionDataModule
from detector.export import load_detector
from detector.models import Darknet53
from detector.module import DetectorModule
from detector.optim import upgrade_hparams

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["circle", "rectangle", "triangle", "cross", "star"]  # the embedded shapes' classes
SMALL = {"class_path": "detector.models.Darknet53",
         "init_args": {"widths": [4, 8, 16, 32, 64, 128], "depths": [1, 1, 1, 1, 1]}}  # fmt: skip


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's


def _tiny(tmp_path: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.logger", "false",
            "--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", "4",
            "--data.embedded.num_val", "2", "--data.image_size", "64", "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip


def _cli(tmp_path: Path, *args: str) -> DetectorCLI:
    return DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=[*_tiny(tmp_path), *args], **cli_kwargs())


def _configured(module: DetectorModule, total: int = 100, epochs: int = 4) -> tuple:
    module.trainer = SimpleNamespace(estimated_stepping_batches=total, max_epochs=epochs)  # what it reads
    conf = module.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]


def _save(module: DetectorModule, path: Path) -> Path:
    """A checkpoint as Lightning writes one: weights, the saved hyper-parameters, the version."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


def test_default_optimizer_and_schedule(tmp_path: Path) -> None:
    """Nesterov SGD (momentum 0.937, lr 0.01) over two groups, weight decay 5e-4 on conv weights only,
    warm-up over 1 epoch of 100 / 4 = 25 steps, then cosine to 0.05 · lr: in Python and from default.yaml."""
    for module in (DetectorModule(NAMES), _cli(tmp_path).model):
        opt, sched = _configured(module)
        assert type(opt) is torch.optim.SGD and sched["interval"] == "step"
        decay, no_decay = opt.param_groups
        assert [id(p) for p in decay["params"]] == [id(p) for p in module.parameters() if p.ndim > 1]
        assert [id(p) for p in no_decay["params"]] == [id(p) for p in module.parameters() if p.ndim <= 1]
        for group, wd in ((decay, 5e-4), (no_decay, 0.0)):
            assert (group["initial_lr"], group["momentum"], group["nesterov"], group["dampening"]) == (
                0.01,
                0.937,
                True,
                0,
            )
            assert group["weight_decay"] == wd
        cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (t - 25) / 75)) for t in range(25, 101)]
        expected = [(t + 1) / 25 for t in range(25)] + cosine
        assert [sched["scheduler"].lr_lambdas[0](t) for t in range(101)] == pytest.approx(expected, rel=1e-12)
        assert [group["lr"] for group in opt.param_groups] == [0.01 / 25] * 2  # step 0 of the warm-up


def test_optimizer_factory_protocol_as_jsonargparse_builds_it(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.init_args.betas", "[0.8, 0.9]",
               "--model.lr", "0.003", "--model.weight_decay", "0.05")  # fmt: skip
    opt, _ = _configured(cli.model)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9)
    assert [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.003, 0.05), (0.003, 0.0)]
    with pytest.raises(SystemExit):  # lr is model.lr: the protocol keeps it out of init_args
        _cli(tmp_path, "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.init_args.lr", "0.1")


def test_cli_saves_injected_parts_and_checkpoints_rebuild_them(tmp_path: Path) -> None:
    cli = _cli(tmp_path, "--model.backbone", str(SMALL).replace("'", '"'), "--model.optimizer", "torch.optim.AdamW")
    hp = cli.model.hparams
    assert hp["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    assert hp["backbone"] == SMALL and hp["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert "loss" not in hp and hp["lr_scheduler"] is None
    path = _save(cli.model, tmp_path / "m.ckpt")
    assert torch.load(path, weights_only=True)["hyper_parameters"]["backbone"] == SMALL
    back = DetectorModule.load_from_checkpoint(path, weights_only=True)  # Lightning's own rebuild
    exported, _ = load_detector(path)  # export's
    for module in (back, exported):
        assert isinstance(module.model.backbone, Darknet53) and module.model.backbone.out_channels == [32, 64, 128]
        assert all(
            torch.equal(a, b) for a, b in zip(module.model.state_dict().values(), cli.model.model.state_dict().values())
        )
    assert type(_configured(back)[0]) is torch.optim.AdamW


def test_objects_given_in_python_are_not_hyperparameters(tmp_path: Path) -> None:
    module = DetectorModule(NAMES, backbone=Darknet53(**SMALL["init_args"]), optimizer=partial(torch.optim.Adam))
    assert {"backbone", "optimizer"} & set(module.hparams) == set() and module.hparams["lr_scheduler"] is None
    path = _save(module, tmp_path / "p.ckpt")  # loads with weights_only: no objects in it
    back = DetectorModule.load_from_checkpoint(path, weights_only=True, backbone=Darknet53(**SMALL["init_args"]))
    assert torch.equal(back.model.backbone.stem[0].weight, module.model.backbone.stem[0].weight)
    assert type(_configured(module)[0]) is torch.optim.Adam and type(_configured(back)[0]) is torch.optim.SGD


def test_upgrade_of_pre_injection_hyperparameters() -> None:
    old = {"preset": "nano", "optimizer": "adamw", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
    assert upgrade_hparams(old) == {"preset": "nano", "lr": 0.02, "weight_decay": 5e-4, "optimizer": {
        "class_path": "torch.optim.AdamW", "init_args": {"betas": [0.9, 0.999]}}}  # fmt: skip
    sgd = upgrade_hparams({**old, "optimizer": "sgd"})["optimizer"]
    assert sgd == {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9, "nesterov": True}}
    assert upgrade_hparams({"optimizer": None, "lr": 0.1}) == {"optimizer": None, "lr": 0.1}


def test_checkpoint_written_before_injection_validates_and_exports(tmp_path: Path) -> None:
    """A checkpoint with main's old hyper-parameters (``optimizer: sgd``, ``momentum``): LightningCLI reads
    them into the config through our ``_parse_ckpt_path`` (its own would fail on both keys)."""
    module = DetectorModule(NAMES)
    old = {"preset": "nano", "anchors": None, "weights": None, "optimizer": "sgd", "lr": 0.02, "momentum": 0.9,
           "weight_decay": 0.0005, "warmup_epochs": 1.0, "min_lr_ratio": 0.05, "conf_thresh": 0.001, "nms_iou": 0.6,
           "max_det": 100, "nonfinite": "skip", "channels_last": False, "compile": False, "ema_decay": None,
           "ema_warmup_steps": 200.0, "class_names": NAMES, "category_ids": [1, 2, 3, 5, 8],
           "_instantiator": "lightning.pytorch.cli.instantiate_module"}  # fmt: skip
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": old,
                "pytorch-lightning_version": "2.6.6"}, path)  # fmt: skip
    cli = main(["validate", *_tiny(tmp_path), "--ckpt_path", str(path)])
    model = cli.config.validate.model
    assert (model.lr, model.optimizer.class_path) == (0.02, "torch.optim.SGD")
    assert (model.optimizer.init_args.momentum, model.optimizer.init_args.nesterov) == (0.9, True)
    assert cli.trainer.state.finished and "val/map" in cli.trainer.callback_metrics
    exported, _ = load_detector(path)
    assert torch.equal(exported.model.heads[0][-1].weight, module.model.heads[0][-1].weight)


def test_checkpoint_whose_hyperparameters_do_not_fit_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    module = DetectorModule(NAMES)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**module.hparams, "optimizer": "adam"}}, path)
    with pytest.raises(SystemExit) as stop:
        main(["validate", *_tiny(tmp_path), "--ckpt_path", str(path)])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: ckpt_path: the hyper-parameters of {str(path)!r} do not fit this model: ")


def test_export_rebuild_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    module = DetectorModule(NAMES, backbone=Darknet53(**SMALL["init_args"]))  # not saved: the preset's is rebuilt
    with pytest.raises(ValueError, match=r"does not fit its weights \(Error\(s\) in loading .* given in Python\?$"):
        load_detector(_save(module, tmp_path / "python.ckpt"))
    module.hparams["backbone"] = {"class_path": "nowhere.Backbone"}
    with pytest.raises(ValueError, match=r"cannot rebuild the model .* No module named 'nowhere'"):
        load_detector(_save(module, tmp_path / "missing.ckpt"))
