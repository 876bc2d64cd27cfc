"""Every kind of command-line mistake ends in one line naming the key, the bad value and what is accepted.

In process (no subprocess start-up): each case stops at parsing, or at the first class built. The
summariser itself is also fed jsonargparse-style exception chains in the older wording ("Given value:")
and with no value line at all, so a change of wording in jsonargparse does not lose the value.
"""

import sys
from pathlib import Path
from typing import Literal

import lightning as L
import pytest

from detector.cli import main
from detector.cli_errors import describe, summarize_parse_error
from detector.data import DetectionDataModule
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"model": DetectorModule, "data": DetectionDataModule, "trainer": L.Trainer, "": L.Trainer.fit}


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's


def _base(tmp_path: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.logger", "false",
            "--data.root", str(tmp_path / "shapes"), "--data.embedded.num_train", "4", "--data.embedded.num_val", "2",
            "--data.embedded.min_size", "64", "--data.embedded.max_size", "96", "--data.num_workers", "0",
            "--trainer.default_root_dir", str(tmp_path / "runs")]  # fmt: skip


def _error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    """The last stderr line of a CLI run that must exit 2."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra,line",
    [
        (["--data.batch_size", "abc"], "data.batch_size: 'abc' is not valid; accepted: an int"),
        (["--data.format", "xml"], "data.format: 'xml' is not valid; accepted: one of 'coco', 'yolo', 'voc'"),
        (["--model.nonfinite", "maybe"], "model.nonfinite: 'maybe' is not valid; accepted: one of 'skip', 'stop'"),
        (["--model.optimizer", "adam"],  # a class path is expected (torch.optim.Adam)
         "model.optimizer: 'adam' is not valid; accepted: an OptimizerFactory or null"),
        (["--model.optimizer.init_args.lr", "0.1"], "model.optimizer.lr: unknown option"),  # lr is model.lr
        (["--model.loss.class_path", "detector.losses.NopeLoss"],
         "model.loss.class_path: 'detector.losses.NopeLoss' is not valid; accepted: a YOLOLoss"),
        (["--model.loss.init_args.classification", "nowhere.NopeLoss"],  # a module that does not exist
         "model.loss.classification: 'nowhere.NopeLoss' is not valid; accepted: a ClassificationLoss ("),
        (["--model.loss.init_args.normalize", "foo"],
         "model.loss.normalize: 'foo' is not valid; accepted: one of 'num_pos', 'batch', 'num_anchors', 'valid' or a mapping of string to one of 'num_pos', 'batch', 'num_anchors', 'valid'"),
        (["--data.multi_scale", "abc"], "data.multi_scale: 'abc' is not valid; accepted: a tuple[int, int] or null"),
        (["--model.lrr", "0.1"], "model.lrr: unknown option; did you mean model.lr?"),
        (["--trainer.max_epoch", "3"],  # an abbreviation is not silently another key
         "trainer.max_epoch: unknown option; did you mean trainer.max_epochs or trainer.min_epochs or trainer.max_steps?"),
        (["--model.loss.init_args.classification.init_args.gama", "2"],
         "model.loss.classification.gama: unknown option; accepted under model.loss.classification: label_smoothing"),
        (["--ckpt_path", "nope.ckpt"],
         "ckpt_path: 'nope.ckpt' does not exist; accepted: a checkpoint file or one of 'last', 'best', 'hpc', 'registry'"),
        (["--config", "nope.yaml"], "config: 'nope.yaml' does not exist; accepted: a YAML file"),
        (["--model.preset", "yolov4"],  # checked when the model is built: the key comes from its __init__ frame
         "model.preset: unknown model preset 'yolov4'; choose one of ['nano', 'yolov3', 'yolov3-tiny']"),
        (["--data.batch_size", "0"], "data.batch_size must be > 0, got 0"),
        (["--data.image_size", "100"], "data.image_size must be a positive multiple of 32 (the largest stride), got 100"),
    ],
)  # fmt: skip
def test_command_line_mistake(capsys: pytest.CaptureFixture, tmp_path: Path, extra: list[str], line: str) -> None:
    # a prefix: key, value and the start of what is accepted (a YOLOLoss subclass defined by another
    # test module, or a new normalize mode, may lengthen the list)
    assert _error(capsys, [*_base(tmp_path), *extra]).startswith(f"error: {line}")


@pytest.mark.parametrize(
    "text,line",
    [
        ("data:\n  batch_size: abc\n", "data.batch_size: 'abc' is not valid; accepted: an int"),
        ("model:\n  lrr: 0.1\n", "model.lrr: unknown option; did you mean model.lr?"),
        ("model:\n  loss:\n    init_args:\n      normalize: foo\n",
         "model.loss.normalize: 'foo' is not valid; accepted: one of 'num_pos', 'batch', 'num_anchors', 'valid' or a mapping of string to one of 'num_pos', 'batch', 'num_anchors', 'valid'"),
    ],
)  # fmt: skip
def test_config_file_mistake(capsys: pytest.CaptureFixture, tmp_path: Path, text: str, line: str) -> None:
    (tmp_path / "mine.yaml").write_text(text)
    assert _error(capsys, [*_base(tmp_path), "--config", str(tmp_path / "mine.yaml")]).startswith(f"error: {line}")


def test_config_file_that_is_not_yaml(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("model: [\n")
    line = _error(capsys, [*_base(tmp_path), "--config", str(tmp_path / "broken.yaml")])
    assert line.startswith(f"error: config: '{tmp_path / 'broken.yaml'}' is not valid YAML (")
    assert line.endswith("line 2, column 1: ^); accepted: a YAML file")


def test_stray_word_names_the_subcommands(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    line = _error(capsys, ["fitt", *_base(tmp_path)])
    assert line == "error: 'fitt' is not an option or a subcommand; accepted: --<key> <value>, or a subcommand first: fit, validate, test, predict"  # fmt: skip


def _chain(*messages: str) -> Exception:
    """A jsonargparse-like error: each message raised from the next (outermost first)."""
    err: Exception | None = None
    for message in reversed(messages):
        new = TypeError(message) if message.startswith("Parser key") else ValueError(message)
        new.__cause__ = err
        err = new
    assert err is not None
    return err


@pytest.mark.parametrize("wording", ["Got value: xml", "Given value: xml"])
def test_value_read_in_either_jsonargparse_wording(wording: str) -> None:
    err = _chain(f"Parser key \"data.format\":\n  Expected a typing.Literal['coco', 'yolo', 'voc']. {wording}",
                 f"Expected a typing.Literal['coco', 'yolo', 'voc']. {wording}")  # fmt: skip
    assert (
        summarize_parse_error(err, ROOTS) == "data.format: 'xml' is not valid; accepted: one of 'coco', 'yolo', 'voc'"
    )


def test_value_from_the_command_line_when_the_message_has_none() -> None:
    err = _chain('Parser key "model.nonfinite":\n  Not a valid choice', "Not a valid choice")
    argv = ["fit", "--model.nonfinite", "skip", "--model.nonfinite=stpo"]  # the last one given is the one parsed
    assert summarize_parse_error(err, ROOTS, argv) == (
        "model.nonfinite: 'stpo' is not valid; did you mean stop?; accepted: one of 'skip', 'stop'"
    )


def test_unknown_key_wording_of_argparse_and_of_config_checks() -> None:
    assert summarize_parse_error(_chain("unrecognized arguments: --data.batchsize 4"), ROOTS) == (
        "data.batchsize: unknown option; did you mean data.batch_size?"
    )
    assert summarize_parse_error(_chain("Group 'data' does not accept option 'batchsize'"), ROOTS) == (
        "data.batchsize: unknown option; did you mean data.batch_size?"
    )


def test_describe_reads_type_hints() -> None:
    assert describe(int | None) == "an int or null"
    assert describe(Literal["a", "b"] | Literal[1] | None) == "one of 'a', 'b', 1 or null"
    assert describe(list[L.Callback]).startswith("a list of Callback")
    assert describe(bool) == "true or false"


def test_help_shows_the_options_of_the_implied_fit(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data.batch_size", "--model.loss", "--trainer.max_epochs", "--ckpt_path", "--print_config"):
        assert f"\n  {option} " in out or f"\n  {option}\n" in out, option
    assert "python train.py predict --help" in " ".join(out.split())
