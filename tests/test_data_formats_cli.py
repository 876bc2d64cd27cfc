"""Point the config at a YOLO or a VOC folder and train: fit + validate through the real CLI.

The folders hold the embedded shapes images converted by ``test_data_formats``; the class names
must come from the data (the YAML's ``names``, the VOC objects' names) and reach the model.
"""

from pathlib import Path

import pytest
import yaml
from test_data_formats import TINY, _coco, write_voc, write_yolo

from detector.cli import main
from detector.data.shapes import SHAPES_CLASSES, ensure_shapes

ROOT = Path(__file__).resolve().parents[1]


def _folders(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    root = ensure_shapes(tmp_path / "coco", TINY)
    for split in ("train", "val"):
        coco = _coco(root, split)
        write_yolo(coco, root / split, tmp_path / "yolo", split)
        write_voc(coco, root / split, tmp_path / "voc", split)
    names = dict(enumerate(c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])))
    (tmp_path / "yolo" / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
    )
    return {
        "yolo": (tmp_path / "yolo" / "data.yaml", list(names.values())),
        "voc": (tmp_path / "voc", sorted(names.values())),
    }


@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_fit_and_validate_on_a_folder_of_each_format(fmt: str, tmp_path: Path) -> None:
    root, names = _folders(tmp_path)[fmt]
    cli = main([
        "--config", str(ROOT / "configs" / "default.yaml"),
        "--data.embedded", "null", "--data.format", fmt, "--data.root", str(root),
        "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
    ])  # fmt: skip
    assert sorted(names) == sorted(SHAPES_CLASSES)
    assert cli.model.class_names == names == cli.datamodule.class_names
    assert len(cli.datamodule.val_set) == TINY.num_val and cli.trainer.global_step == 2  # 5 images / batch 4
    assert 0.0 <= float(cli.trainer.callback_metrics["val/map"]) <= 1.0
