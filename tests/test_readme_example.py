"""docs/extending.md: the worked example (a new classification loss) works exactly as written.

Every fenced code block of the page whose first line is ``# <path>`` (e.g. ``# detector/losses/poly.py``)
is an example file. A "fork" is built in tmp_path: a copy of ``detector/`` and ``configs/`` plus the
example files; the example's own test runs there under pytest, and the page's ablation command runs
there (two seeds, tiny data, 1 epoch, W&B offline). The dataset reader of docs/extending.md, given as
a whole file, is built and run too (the backbone guide of docs/models.md: tests/test_models_guide.py).
"""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from helpers import example_files

from detector.losses import ClassificationLoss

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"  # the worked example
LOSS, RECIPE, TEST = "detector/losses/poly.py", "configs/losses/poly.yaml", "tests/test_poly.py"
TINY = [
    "--data.embedded.num_train", "4", "--data.embedded.num_val", "2", "--data.image_size", "64",
    "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
    "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1",
]  # fmt: skip


def page_text(page: Path = PAGE) -> str:
    """The text of a docs page that holds example files."""
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    return page.read_text()


def commands(text: str, program: str) -> list[list[str]]:
    """Shell lines of the page's bash blocks that start with ``program``, split into words."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    return [shlex.split(line, comments=True) for b in blocks for line in b.splitlines() if line.startswith(program)]


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    found = example_files(page_text())
    assert {LOSS, RECIPE, TEST} <= set(found), f"example files missing from {PAGE.relative_to(ROOT)}: {sorted(found)}"
    return found


@pytest.fixture(scope="module")
def fork(tmp_path_factory: pytest.TempPathFactory, files: dict[str, str]) -> Path:
    """tmp_path copy of the repository's package and configs, with the three example files added."""
    root = tmp_path_factory.mktemp("fork")
    shutil.copytree(ROOT / "detector", root / "detector", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", root / "configs")
    for rel in (LOSS, RECIPE, TEST):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(files[rel])
    return root


def load_module(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Import ``path`` as module ``name`` of the installed package (as if the file were in it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_loss_closed_form_and_gradient(fork: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poly = load_module("detector.losses.poly", fork / LOSS, monkeypatch)
    x = torch.tensor([[0.0, 2.0, 2.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0, 0.0, 0.25]], dtype=torch.float64)
    eps = 0.5
    expected = []
    for xi, yi in zip(x[0].tolist(), y[0].tolist()):
        prob = 1 / (1 + math.exp(-xi))
        bce = -yi * math.log(prob) - (1 - yi) * math.log(1 - prob)
        expected.append(bce + eps * (1 - (yi * prob + (1 - yi) * (1 - prob))))
    # x = 0, y = 1: log 2 + 0.5 * 0.5 = 0.9431472
    assert expected[0] == pytest.approx(0.9431472, abs=1e-7)
    loss_fn = poly.PolyLoss(epsilon=eps)
    assert isinstance(loss_fn, ClassificationLoss)
    torch.testing.assert_close(loss_fn(x, y), torch.tensor([expected], dtype=torch.float64))
    weight = torch.tensor([[2.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(loss_fn(x, y, weight), torch.tensor([expected], dtype=torch.float64) * weight)
    xs = torch.linspace(-4, 4, 12, dtype=torch.float64).view(3, 4).requires_grad_()
    ys = torch.rand(3, 4, dtype=torch.float64)
    loss_fn(xs, ys).sum().backward()
    p = torch.sigmoid(xs.detach())
    torch.testing.assert_close(xs.grad, p - ys - eps * (2 * ys - 1) * p * (1 - p))  # the docstring's derivation


def test_recipe_builds_the_cli(fork: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from detector.cli import DetectorCLI, cli_kwargs
    from detector.data import DetectionDataModule
    from detector.module import DetectorModule

    poly = load_module("detector.losses.poly", fork / LOSS, monkeypatch)
    recipe = yaml.safe_load((fork / RECIPE).read_text())
    assert (fork / RECIPE).read_text().startswith("#"), "a recipe starts with a comment header"
    args = ["--config", str(ROOT / "configs" / "default.yaml"), "--config", str(fork / RECIPE),
            "--data.root", str(tmp_path / "shapes"), "--trainer.default_root_dir", str(tmp_path / "runs"),
            *TINY]  # fmt: skip
    cli = DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=args, **cli_kwargs())
    loss = cli.model.criterion.classification
    assert type(loss) is poly.PolyLoss
    assert loss.epsilon == recipe["model"]["loss"]["init_args"]["classification"]["init_args"]["epsilon"]
    assert type(cli.model.criterion.objectness).__name__ == "BCEObjectness"


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_example_test_passes_under_pytest(fork: Path, files: dict[str, str]) -> None:
    n_tests = len(re.findall(r"^def test_", files[TEST], flags=re.MULTILINE))
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], fork)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{n_tests} passed" in out.stdout, out.stdout[-2000:]


def test_ablation_command_runs_and_logs_to_wandb(fork: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's ``python -m detector.ablate`` line, run in the fork with two of its seeds and
    ``--jobs 2`` (tiny data, 1 epoch, W&B offline). Each fit is a ``python -m detector.ablate --task``
    process started in the fork, so it imports the fork's package, ``detector/losses/poly.py`` included."""
    from detector import ablate

    cmd = next(c for c in commands(page_text(), "python -m detector.ablate") if RECIPE in c)
    group = cmd[cmd.index("--group") + 1]
    args = cmd[3:]
    at = args.index("--seeds") + 1
    n_seeds = next((i for i, a in enumerate(args[at:]) if not a.isdigit()), len(args) - at)
    assert n_seeds >= 3, f"the example's ablation should use at least 3 seeds: {shlex.join(cmd)}"
    args[at : at + n_seeds] = ["0", "1"]
    monkeypatch.chdir(fork)
    extra = [*([] if "--" in args else ["--"]), *TINY, "--trainer.num_sanity_val_steps", "0"]
    status = ablate.main([*args, "--jobs", "2", *extra])
    table = (fork / "runs" / "ablation" / "ablation.md").read_text()
    logs = {p.name: p.read_text()[-3000:] for p in (fork / "runs" / "ablation" / "runs").glob("*.log")}
    assert status == 0, table + "\n".join(f"--- {name}\n{text}" for name, text in logs.items())
    names = [Path(r).stem for r in cmd[cmd.index("--recipes") + 1 :] if r.endswith(".yaml")]
    rows = [re.search(rf"^\| {n} \| 2/2 \| [\d.]+ ± [\d.]+ \|", table, re.MULTILINE) for n in names]
    assert "poly" in names and all(rows), table
    # W&B (offline): one run per recipe and seed in the group, the class loss logged, the summary tables
    runs = {p: p.read_bytes() for p in (fork / "runs" / "ablation" / "runs").glob("*/wandb/offline-run-*/run-*.wandb")}
    poly_runs = [b for b in runs.values() if b"detector.losses.poly.PolyLoss" in b]
    assert len(runs) == 2 * len(names) and len(poly_runs) == 2
    for run in poly_runs:
        assert group.encode() in run and b"train/loss_cls" in run and b"val/map" in run
    media = fork / "runs" / "ablation" / "wandb"
    summary = list(media.glob("offline-run-*/files/media/table/ablation/table_*.table.json"))
    per_run = list(media.glob("offline-run-*/files/media/table/ablation/runs_*.table.json"))
    assert len(summary) == 1 and len(per_run) == 1
    assert [row[:2] for row in json.loads(summary[0].read_text())["data"]] == [["paper", 2], ["poly", 2]]
    assert [row[:4] for row in json.loads(per_run[0].read_text())["data"]][-1] == ["poly-s1", "poly", 1, "ok"]


def test_other_example_files(files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset reader (docs/extending.md), given as a whole file."""
    assert "detector/data/readers/csv_boxes.py" in files, sorted(files)
    if "detector/data/readers/csv_boxes.py" in files:
        (tmp_path / "csv_boxes.py").write_text(files["detector/data/readers/csv_boxes.py"])
        reader = load_module("detector.data.readers.csv_boxes", tmp_path / "csv_boxes.py", monkeypatch)
        (tmp_path / "images").mkdir()
        for name in ("7.png", "3.png"):
            cv2.imwrite(str(tmp_path / "images" / name), np.zeros((40, 60, 3), np.uint8))
        (tmp_path / "train.csv").write_text("7.png,1,2,30,20,dog\n3.png,5,5,50,35,cat\n7.png,10,10,20,30,cat\n")
        ds = reader.CsvDetection(tmp_path, "train")
        assert ds.class_names == ["cat", "dog"] and ds.image_ids == [3, 7] and len(ds) == 2
        item = ds[1]  # 7.png
        assert item["image"].shape == (40, 60, 3) and item["image_id"] == 7
        np.testing.assert_allclose(item["boxes"], [[1, 2, 30, 20], [10, 10, 20, 30]])
        assert item["labels"].tolist() == [1, 0]
