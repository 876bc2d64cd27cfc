"""Bad data in any split ends the command line run with the same one-line ``error:`` report.

The training split is opened when the datamodule is built, the validation split only when
``fit`` sets it up: both must give the report, not a traceback (exit code 2)."""

import json
from pathlib import Path

import pytest
from test_cli import _tiny

from detector.cli import main
from detector.data.shapes import ShapesConfig, ensure_shapes


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    with pytest.raises(SystemExit) as exit_:
        main([*_tiny(tmp_path), "--data.embedded", "null", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    return err[err.index("error: ") :].splitlines()  # the report


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    return ensure_shapes(tmp_path / "shapes", ShapesConfig(num_train=8, num_val=4))


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_file_under_strict_is_one_line_in_every_split(tmp_path, capsys, shapes, split):
    (shapes / split / "000001.jpg").unlink()
    n = 8 if split == "train" else 4
    assert _run(tmp_path, capsys, "--data.strict", "true") == [
        f"error: bad input (strict=True): {shapes}/annotations/{split}.json: {n - 1} of {n} images kept; "
        "problems: missing_file=1 e.g. 000001.jpg: missing_file - file not found (image skipped)"
    ]


def test_a_validation_category_unknown_to_training_is_one_line(tmp_path, capsys, shapes):
    val = json.loads((shapes / "annotations" / "val.json").read_text())
    val["categories"].append({"id": 42, "name": "kite"})
    (shapes / "annotations" / "val.json").write_text(json.dumps(val))
    assert _run(tmp_path, capsys) == [
        f"error: {shapes}/annotations/val.json has category ids [42] that the training categories [1, 2, 3, 5, 8] lack"
    ]
