"""End to end through the real CLI and the real default config, with tiny limits."""

import json
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from detector.cli import DetectorCLI, main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def _tiny(tmp_path: Path) -> list[str]:
    return [
        "--config", DEFAULT,
        "--data.root", str(tmp_path / "shapes"),
        "--data.embedded.num_train", "8",
        "--data.embedded.num_val", "4",
        "--data.image_size", "128",
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--trainer.max_epochs", "1",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[DetectorCLI, Path]:
    """One tiny fit shared by the tests that need a checkpoint: the CLI and its folder."""
    tmp = tmp_path_factory.mktemp("fit")
    return main(_tiny(tmp)), tmp  # no subcommand: fit is implied


def test_fit_then_validate_best_checkpoint(fitted: tuple[DetectorCLI, Path]) -> None:
    cli, tmp_path = fitted
    metrics = cli.trainer.callback_metrics
    for key in ("val/map", "val/map_50", "val/map_75", "val/mar_100", "val/loss"):
        assert key in metrics
    assert 0.0 <= float(metrics["val/map"]) <= 1.0
    assert torch.isfinite(metrics["val/loss"])
    ckpts = sorted(p.name for p in (tmp_path / "runs").rglob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 2
    assert cli.model.class_names == ["circle", "rectangle", "triangle", "cross", "star"]
    assert cli.trainer.global_step == 2  # 8 images / batch 4
    hparams = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)["hyper_parameters"]
    assert hparams["class_names"] == cli.model.class_names and hparams["category_ids"] == [1, 2, 3, 5, 8]


def test_validate_and_test_subcommands_from_checkpoint(fitted: tuple[DetectorCLI, Path], tmp_path: Path) -> None:
    """The checkpoint's class names and category ids stand in for the training split, which is absent here."""
    ckpt = next((fitted[1] / "runs").rglob("last.ckpt"))
    no_train = ["--data.root", str(fitted[1] / "shapes"), "--data.embedded", "null",
                "--data.train_images", "absent", "--data.train_annotations", "absent.json"]  # fmt: skip
    for sub in ("validate", "test"):
        cli = main([sub, *_tiny(tmp_path), *no_train, "--ckpt_path", str(ckpt)])
        assert f"{sub if sub == 'test' else 'val'}/map_50" in cli.trainer.callback_metrics
        assert cli.datamodule._train_base is None and cli.model.class_names == fitted[0].model.class_names
    out = tmp_path / "preds.json"
    cli = main(["predict", *_tiny(tmp_path), *no_train, "--config", str(ROOT / "configs" / "predict_coco.yaml"),
                "--trainer.callbacks.init_args.output", str(out), "--ckpt_path", str(ckpt)])  # fmt: skip
    preds = [d for batch in cli.trainer.predict_loop.predictions for d in batch]
    assert len(preds) == 4 and all(d["boxes"].shape[1] == 4 for d in preds)  # the 4 validation images
    assert sorted(int(d["image_id"]) for d in preds) == sorted(cli.datamodule.test_set.base.image_ids)
    written = json.loads(out.read_text())
    assert len(written) == sum(len(d["scores"]) for d in preds)
    assert {r["category_id"] for r in written} <= {1, 2, 3, 5, 8}  # the shapes dataset's own ids


def test_predict_on_a_folder_needs_only_the_checkpoint(fitted: tuple[DetectorCLI, Path], tmp_path: Path) -> None:
    """No dataset on disk (the configured root is absent and stays so: nothing is generated or read);
    the COCO writer maps labels to the dataset's category ids stored in the checkpoint."""
    ckpt = next((fitted[1] / "runs").rglob("last.ckpt"))
    val = fitted[0].datamodule.val_set.base
    folder = tmp_path / "images"
    folder.mkdir()
    for name in val.file_names[:2]:
        shutil.copy(val.images_dir / name, folder / name)
    out, absent = tmp_path / "preds.json", tmp_path / "no_dataset"
    cli = main(["predict", *_tiny(tmp_path), "--data.root", str(absent), "--config", str(ROOT / "configs" / "predict_coco.yaml"),
                "--data.predict_images", str(folder), "--trainer.callbacks.init_args.output", str(out), "--ckpt_path", str(ckpt)])  # fmt: skip
    assert not absent.exists() and cli.model.class_names == fitted[0].model.class_names
    preds = [d for batch in cli.trainer.predict_loop.predictions for d in batch]
    labels = sorted(label for d in preds for label in d["labels"].tolist())
    written = json.loads(out.read_text())
    assert len(labels) > 0 and {r["file_name"] for r in written} == set(val.file_names[:2])
    assert sorted(r["category_id"] for r in written) == sorted([1, 2, 3, 5, 8][k] for k in labels)


def test_predict_on_a_folder_maps_back_to_original_pixels(tmp_path: Path) -> None:
    """A folder holding two validation images (one re-encoded as lossless PNG) gets, image for image, the
    detections of the COCO-split predict; ids are the sorted-folder indices and files are drawn full size."""
    import cv2

    predict = [
        "predict",
        *_tiny(tmp_path),
        "--data.batch_size",
        "1",
        "--config",
        str(ROOT / "configs" / "predict_coco.yaml"),
    ]
    ref = main(
        [*predict, "--trainer.callbacks.init_args.output", str(tmp_path / "ref.json")]
    )  # untrained weights, seed 0
    val = ref.datamodule.test_set.base
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    rows = {"b_first.jpg": 0, "a_second.png": 1}  # sorted: a_second.png is image 0
    (folder / "b_first.jpg").write_bytes((val.images_dir / val.file_names[0]).read_bytes())
    cv2.imwrite(str(folder / "a_second.png"), cv2.imread(str(val.images_dir / val.file_names[1])))
    main([*predict, "--data.predict_images", str(folder), "--trainer.callbacks.init_args.output", str(tmp_path / "f.json"),
          "--trainer.callbacks.init_args.draw_dir", str(tmp_path / "drawn")])  # fmt: skip

    ref_dets = json.loads((tmp_path / "ref.json").read_text())
    dets = json.loads((tmp_path / "f.json").read_text())
    assert {(d["image_id"], d["file_name"]) for d in dets} == {(0, "a_second.png"), (1, "b_first.jpg")}
    for image_id, name in enumerate(sorted(rows)):
        h, w = val.sizes[rows[name]]
        assert h != w or name == "b_first.jpg"  # at least the PNG is not square: the letterbox pads
        mine = sorted((d["score"], d["category_id"], d["bbox"]) for d in dets if d["image_id"] == image_id)
        coco = sorted(
            (d["score"], d["category_id"], d["bbox"]) for d in ref_dets if d["image_id"] == val.image_ids[rows[name]]
        )
        assert len(mine) == len(coco) > 0
        assert all(
            s == pytest.approx(t) and c == k and b == pytest.approx(q, abs=1e-3)
            for (s, c, b), (t, k, q) in zip(mine, coco)
        )
        boxes = torch.tensor([b for _, _, b in mine])  # xywh original pixels, inside the original image
        assert (boxes[:, :2] >= -1e-3).all() and (boxes[:, 0] + boxes[:, 2] <= w + 1e-3).all()
        assert (boxes[:, 1] + boxes[:, 3] <= h + 1e-3).all()
        drawn = cv2.imread(str(tmp_path / "drawn" / f"{Path(name).stem}.jpg"))
        assert drawn is not None and drawn.shape == (h, w, 3)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def _console(*args: str) -> subprocess.CompletedProcess:
    """``detector-train`` as installed: pip's script when it calls pyproject.toml's entry point, else the
    call that script makes (``sys.exit(<entry point>())``), e.g. before the checkout is reinstalled."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["detector-train"]
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts")}.get("detector-train")
    script = shutil.which("detector-train", path=str(Path(sys.executable).parent)) or shutil.which("detector-train")
    module, func = target.split(":")
    current = script and installed == target and f"import {func}" in Path(script).read_text()
    command = [script] if current else [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]  # fmt: skip
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_console_script_exit_status(tmp_path: Path) -> None:
    """0 after a successful fit (a SLURM job is marked done), 2 and one line for a mistake."""
    done = _console(*_tiny(tmp_path), "--data.image_size", "64")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<detector.cli.DetectorCLI object" not in done.stdout + done.stderr
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1
    failed = _console(*_tiny(tmp_path), "--model.preset", "yolov4")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: model.preset: unknown model preset 'yolov4'; choose one of ['nano', 'yolov3', 'yolov3-tiny']"
    )


def test_missing_data_root_ends_in_one_line(tmp_path: Path) -> None:
    proc = _run(*_tiny(tmp_path), "--data.embedded", "null", "--data.root", "/no/such/folder")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "/no/such/folder" in last


def test_annotation_file_that_is_not_coco(tmp_path: Path) -> None:
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "ann.json").write_text('{"foo": 1}')
    proc = _run(*_tiny(tmp_path), "--data.embedded", "null", "--data.root", str(tmp_path / "mine"),
                "--data.train_annotations", "ann.json", "--data.val_images", "train", "--data.val_annotations", "ann.json")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "COCO" in proc.stderr.strip().splitlines()[-1]


def test_misspelt_loss_class_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    proc = _run(*_tiny(tmp_path), "--model.loss.init_args.classification", "FocalLos")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # nothing but the one line
    assert line.startswith(
        "error: model.loss.classification: 'FocalLos' is not valid; did you mean FocalLoss?; accepted: a ClassificationLoss ("
    )
    assert "BCE, " in line and line.endswith(") or null")


def test_print_config_resolves_layered_recipe(tmp_path: Path) -> None:
    proc = _run("--config", DEFAULT, "--model.loss.init_args.normalize", "num_pos", "--print_config")
    assert proc.returncode == 0, proc.stderr
    assert "normalize: num_pos" in proc.stdout and "detector.losses.DarknetBoxLoss" in proc.stdout
