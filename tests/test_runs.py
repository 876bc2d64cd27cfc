"""``--ckpt_path`` resolution (detector/runs.py) on the parsed config, with run folders laid out as a
fit leaves them: ``<save_dir>/detector/<run id>/{config.yaml, checkpoints/last.ckpt}``.

Nothing is built or trained: the CLI stops right after :func:`detector.runs.prepare_run`.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from detector.cli import DetectorCLI, cli_kwargs
from detector.data import DetectionDataModule
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]


class _Resolved(Exception):
    pass


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments would make LightningCLI warn


class _ResolveOnly(DetectorCLI):
    def instantiate_classes(self) -> None:
        raise _Resolved(self)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "default.yaml"), "--data.root", str(tmp_path / "shapes"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.default_root_dir", str(tmp_path / "root"), *extra]  # fmt: skip


def _resolve(subcommand: str, args: list[str]) -> tuple[Namespace, object]:
    """The subcommand's config after ``prepare_run``, and its parser."""
    with pytest.raises(_Resolved) as info:
        _ResolveOnly(DetectorModule, DetectionDataModule, args=[subcommand, *args], **cli_kwargs())
    cli = info.value.args[0]
    return cli.config[subcommand], cli._parser(subcommand)


def _error(capsys: pytest.CaptureFixture, subcommand: str, args: list[str]) -> str:
    """The one line the CLI prints before exiting with status 2."""
    with pytest.raises(SystemExit) as info:
        _ResolveOnly(DetectorModule, DetectionDataModule, args=[subcommand, *args], **cli_kwargs())
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def _run(tmp_path: Path, run_id: str, mtime: float, *extra: str) -> Path:
    """A run folder as fit leaves it: the config of ``extra`` saved as the CLI saves it, and last.ckpt."""
    config, parser = _resolve("fit", _args(tmp_path, *extra))
    folder = tmp_path / "runs" / "detector" / run_id
    (folder / "checkpoints").mkdir(parents=True)
    config.trainer.logger.init_args.id = run_id
    parser.save(config, folder / "config.yaml", skip_unset=False, multifile=False)  # as RunConfigSaver does
    last = folder / "checkpoints" / "last.ckpt"
    torch.save({}, last)  # LightningCLI reads hyper_parameters from an explicit --ckpt_path
    os.utime(last, (mtime, mtime))
    return last


def test_last_resumes_the_newest_run_of_this_configuration(tmp_path: Path) -> None:
    _run(tmp_path, "older", 1e9)
    newer = _run(tmp_path, "newer", 2e9, "--data.num_workers", "7")  # the worker count does not matter
    _run(tmp_path, "other", 3e9, "--trainer.max_epochs", "7")  # newest, but another configuration
    config, _ = _resolve("fit", _args(tmp_path, "--ckpt_path", "last"))
    assert config.trainer.logger.init_args.id == "newer"  # the same W&B run, hence the same checkpoint folder
    assert config.ckpt_path == str(newer)


def test_last_names_where_it_looked_and_what_differs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs" / "detector"
    err = _error(capsys, "fit", _args(tmp_path, "--ckpt_path", "last"))
    assert err == f"error: --ckpt_path last: no run of this configuration with a last*.ckpt in {root}"
    other = _run(tmp_path, "other", 1e9, "--trainer.max_epochs", "7", "--model.lr", "0.1")
    err = _error(capsys, "fit", _args(tmp_path, "--ckpt_path", "last"))
    assert f"in {root}; 1 run(s) there, the newest (other) differs in model.lr, trainer.max_epochs" in err
    assert err.endswith(f"(to continue it anyway: --ckpt_path {other})")


def test_last_with_a_fixed_run_id_or_no_logger_takes_that_folder(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = tmp_path / "runs" / "detector" / "job7" / "checkpoints"
    err = _error(capsys, "fit", _args(tmp_path, "--ckpt_path", "last", "--trainer.logger.init_args.id", "job7"))
    assert err == f"error: --ckpt_path last: no last*.ckpt in {folder}"
    folder.mkdir(parents=True)
    for name, mtime in (("last.ckpt", 1e9), ("last-v1.ckpt", 2e9)):  # no config.yaml needed: the id names the run
        (folder / name).touch()
        os.utime(folder / name, (mtime, mtime))
    config, _ = _resolve("fit", _args(tmp_path, "--ckpt_path", "last", "--trainer.logger.init_args.id", "job7"))
    assert config.ckpt_path == str(folder / "last-v1.ckpt")
    plain = tmp_path / "root" / "checkpoints"
    err = _error(capsys, "fit", _args(tmp_path, "--ckpt_path", "last", "--trainer.logger", "false"))
    assert err == f"error: --ckpt_path last: no last*.ckpt in {plain}"


def test_a_checkpoint_of_a_run_folder_continues_that_run(tmp_path: Path) -> None:
    last = _run(tmp_path, "abc", 1e9, "--trainer.max_epochs", "7")  # any configuration: the path says which run
    config, _ = _resolve("fit", _args(tmp_path, "--ckpt_path", str(last), "--trainer.max_epochs", "9"))
    assert config.trainer.logger.init_args.id == "abc" and config.ckpt_path == str(last)
    elsewhere = tmp_path / "weights.ckpt"
    torch.save({}, elsewhere)
    config, _ = _resolve("fit", _args(tmp_path, "--ckpt_path", str(elsewhere)))
    assert config.trainer.logger.init_args.id is None  # a new run, as Lightning does


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict"])
def test_missing_checkpoint_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, subcommand: str) -> None:
    err = _error(capsys, subcommand, _args(tmp_path, "--ckpt_path", "nope.ckpt"))
    assert err.startswith("error: ckpt_path: 'nope.ckpt' does not exist; accepted: a checkpoint file or one of")


def test_last_with_a_csv_logger_resumes_its_version(tmp_path: Path) -> None:
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
           str(tmp_path / "csv")]  # fmt: skip
    args = [*_args(tmp_path)[:4], "--trainer.default_root_dir", str(tmp_path / "root"), *csv]
    config, parser = _resolve("fit", args)
    for version, mtime in (("version_0", 2e9), ("version_1", 1e9)):
        folder = tmp_path / "csv" / "lightning_logs" / version
        (folder / "checkpoints").mkdir(parents=True)
        parser.save(config, folder / "config.yaml", skip_unset=False, multifile=False)
        torch.save({}, folder / "checkpoints" / "last.ckpt")
        os.utime(folder / "checkpoints" / "last.ckpt", (mtime, mtime))
    config, _ = _resolve("fit", [*args, "--ckpt_path", "last"])
    assert config.trainer.logger.init_args.version == "version_0"  # CSVLogger's folder: lightning_logs/version_0
    assert config.ckpt_path == str(tmp_path / "csv" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
