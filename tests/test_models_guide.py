"""docs/models.md works as written: a backbone added from outside the package, an optimizer and a
schedule chosen by YAML only.

Each section's fenced blocks whose first line is ``# <path>`` are the example files. They are written
into a fork in tmp_path (the repository's configs/ copied there; nothing under detector/), which is
the working directory and on the import path, as ``python train.py`` at a fork's root has it. The
section's ``python train.py`` command then runs through the CLI in process, on tiny data.
"""

import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import example_files

from detector import export
from detector.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # tiny data, one epoch of 2 steps, no validation, no callbacks
    "--data.embedded.num_train", "8", "--data.embedded.num_val", "2", "--data.image_size", "64",
    "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks", "[]",
    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1",
]  # fmt: skip


def section(heading: str) -> str:
    """The section of docs/models.md under ``heading``, up to the next ``## `` heading."""
    text = (ROOT / "docs" / "models.md").read_text()
    assert f"\n{heading}\n" in text, f"docs/models.md lacks the section {heading!r}"
    return re.split(r"\n## ", text.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]


def command(text: str, program: str) -> list[str]:
    """The one line of the section's bash blocks that starts with ``program``, split into words."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    (line,) = [line for b in blocks for line in b.splitlines() if line.startswith(program)]
    return shlex.split(line, comments=True)


@pytest.fixture
def fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return tmp_path


def write(fork: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        assert not rel.startswith("detector/"), f"the guide must not edit the package: {rel}"
        (fork / rel).parent.mkdir(parents=True, exist_ok=True)
        (fork / rel).write_text(content)


def test_add_a_backbone(fork: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = section("## Add a backbone")
    files = example_files(text)
    assert set(files) == {"my_backbones/resnet.py", "configs/resnet18.yaml"}
    write(fork, files)
    monkeypatch.delitem(sys.modules, "my_backbones", raising=False)
    monkeypatch.delitem(sys.modules, "my_backbones.resnet", raising=False)
    train = command(text, "python train.py")
    cli = main([*train[2:], *TINY])
    module = cli.model
    backbone = module.model.backbone
    assert type(backbone).__name__ == "ResNet18" and sys.modules[type(backbone).__module__].__file__ == str(
        fork / "my_backbones" / "resnet.py"
    )
    assert cli.trainer.global_step == 2 and module.hparams["backbone"]["class_path"] == "my_backbones.resnet.ResNet18"
    # forward shapes, and the training loss reaches every parameter
    images, targets = next(iter(cli.datamodule.train_dataloader()))
    module.train().zero_grad()
    outputs = module(images)
    assert [tuple(o.shape) for o in outputs] == [(4, 3, 64 // s, 64 // s, 5 + 5) for s in (8, 16, 32)]
    module.criterion(outputs, targets, module.model.anchors, module.model.strides)["loss"].backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and any(n.startswith("model.backbone.stages.2") for n, _ in module.named_parameters())
    # export rebuilds the backbone from the checkpoint alone
    ckpt = fork / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)  # as the run's checkpoint callbacks write it
    args = command(text, "python -m detector.export")[3:]
    args[args.index("--ckpt") + 1] = str(ckpt)
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        out = export.main([*args, "--output", str(fork / "resnet.onnx")])
        assert out.is_file()
    rebuilt, size = export.load_detector(ckpt)
    assert type(rebuilt.model.backbone) is type(backbone) and size == 64
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in rebuilt.model.state_dict().items())


def test_choose_an_optimizer_and_a_schedule(fork: Path) -> None:
    """AdamW and StepLR, each from its YAML only, are the optimizer and schedule that train."""
    files = example_files(section("## Choose an optimizer and a schedule"))
    assert set(files) == {"configs/adamw.yaml", "configs/step_lr.yaml"}
    write(fork, files)
    model = {
        **yaml.safe_load(files["configs/adamw.yaml"])["model"],
        **yaml.safe_load(files["configs/step_lr.yaml"])["model"],
    }
    cli = main(["--config", "configs/default.yaml", "--config", "configs/adamw.yaml", "--config", "configs/step_lr.yaml",
                *TINY])  # fmt: skip
    opt, steps = cli.trainer.optimizers[0], cli.trainer.global_step
    assert type(opt) is torch.optim.AdamW and steps == 2
    assert list(opt.defaults["betas"]) == model["optimizer"]["init_args"]["betas"]
    lr, wd = model["lr"], model["weight_decay"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups] == [(lr, wd), (lr, 0.0)]
    # it is the one that stepped: AdamW's moments for every parameter, one update per optimizer step
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(opt.state) == len(params) and all(int(opt.state[p]["step"]) == steps for p in params)
    assert all("exp_avg_sq" in opt.state[p] for p in params)
    (config,) = cli.trainer.lr_scheduler_configs
    step_size, gamma = model["lr_scheduler"]["init_args"]["step_size"], model["lr_scheduler"]["init_args"]["gamma"]
    assert type(config.scheduler) is torch.optim.lr_scheduler.StepLR and config.interval == "step"
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * gamma ** (steps // step_size)] * 2)
