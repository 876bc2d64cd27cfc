"""Every YAML file under configs/ parses and instantiates (model, loss, data, trainer) without training.

A config is layered on configs/default.yaml as the README shows; the data section is pointed at a
tiny embedded set (configs for real datasets keep their format and class settings but not their
paths, which do not exist here), and accelerators are forced to CPU with one device.
"""

from pathlib import Path

import pytest
import yaml

from detector.cli import DetectorCLI, cli_kwargs
from detector.data import DetectionDataModule
from detector.losses import YOLOLoss
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def _overrides(tmp_path: Path) -> list[str]:
    return [
        "--data.root", str(tmp_path / "shapes"),
        "--data.embedded.num_train", "4",
        "--data.embedded.num_val", "2",
        "--data.image_size", "64",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.num_nodes", "1",
        "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def test_configs_found() -> None:
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"default.yaml", "losses/focal.yaml", "losses/ghm.yaml", "losses/pisa.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_config_instantiates(config: Path, tmp_path: Path) -> None:
    text = config.read_text()
    assert text.startswith("#"), f"{config.name}: start with a comment header (what it is for, how to layer it)"
    layered = [] if config == DEFAULT else ["--config", str(config)]
    data = (yaml.safe_load(text) or {}).get("data") or {}
    reset = ["--data.embedded", "{num_train: 4, num_val: 2, seed: 0}"] if "embedded" in data else []
    if "format" in data or any(k.endswith("_split") for k in data):  # a real dataset's layout: use the tiny one
        reset += ["--data.format", "coco", "--data.train_split", "train", "--data.val_split", "val"]
    args = ["--config", str(DEFAULT), *layered, *reset, *_overrides(tmp_path)]
    cli = DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=args, **cli_kwargs())
    assert isinstance(cli.model, DetectorModule) and isinstance(cli.model.criterion, YOLOLoss)
    assert cli.model.class_names == cli.datamodule.class_names
    assert cli.trainer.max_epochs is None or cli.trainer.max_epochs > 0
    parts = ((yaml.safe_load(text) or {}).get("model") or {}).get("loss", {}).get("init_args", {})
    for part in ("objectness", "classification", "box"):  # the recipe's classes are the ones built
        spec = parts.get(part)
        if spec is not None:
            name = (spec if isinstance(spec, str) else spec["class_path"]).split(".")[-1]
            assert type(getattr(cli.model.criterion, part)).__name__ == name
