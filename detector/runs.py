"""Where a run lives, and how ``fit --ckpt_path last`` finds it again after a crash or a requeue.

A run's folder is the folder above Lightning's ``checkpoints/``: ``<save_dir>/<name>/<version>/`` of
the first logger (the default W&B logger: ``runs/detector/<W&B run id>/``), or
``trainer.default_root_dir`` without a logger. :class:`RunConfigSaver` writes the run's resolved
config there as ``config.yaml`` when ``fit`` starts.

:func:`prepare_run` runs on the parsed config before anything is built (every process runs it and
reaches the same answer from the files on disk):

- ``--ckpt_path last``: with a logger whose run id/version is not given, the run folders under
  ``<save_dir>/<name>/`` whose ``config.yaml`` equals this configuration (up to :data:`IGNORED` and
  the logger's id/version) are searched, and the one with the newest ``last*.ckpt`` is resumed: its
  id/version is set on the logger (same checkpoint folder, same W&B run) and ``ckpt_path`` becomes
  that file. With a given id/version, or without a logger, the run folder is fixed and its newest
  ``last*.ckpt`` is taken. Nothing found: :class:`ResumeError` naming where it looked.
- ``--ckpt_path <file>``: the file must exist; a file in ``<save_dir>/<name>/<version>/checkpoints/``
  continues that run (its id/version is set on the logger when none is given).
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

IGNORED = ("ckpt_path", "config", "data.num_workers")
"""Config keys that may differ between a run and its resumption (the data stream does not depend on
the number of workers); the logger's id/version is ignored too."""


class ResumeError(ValueError):
    """``--ckpt_path`` names nothing that can be loaded; the message says where it looked."""


@dataclass
class Layout:
    """Where runs of the configured logger live: ``root/<version>/checkpoints``; ``key`` is the
    logger argument naming the version (``id`` for W&B, ``version`` for CSV/TensorBoard)."""

    root: Path
    key: str
    version: str | None


def prepare_run(subcommand: str | None, parser: Any, config: Namespace) -> None:
    """Check and resolve ``config.ckpt_path`` in place (see the module docstring); fit only for ``last``."""
    ckpt = config.get("ckpt_path")
    if not ckpt or subcommand is None:
        return
    ckpt = str(ckpt)  # an existing file or a keyword: DetectorCLI checked it (cli_errors.check_ckpt_path)
    if subcommand != "fit":
        return
    if ckpt == "last":
        _resolve_last(parser, config, logger_layout(config))
        return
    try:
        layout = logger_layout(config)
    except ResumeError:  # a logger whose runs we cannot place: resume from the file as Lightning does
        return
    if layout is not None and layout.version is None:
        parents = Path(ckpt).resolve().parents  # <root>/<version>/checkpoints/<file>: continue that run
        if len(parents) > 2 and parents[0].name == "checkpoints" and parents[2] == layout.root.resolve():
            _set_version(config, layout, parents[1].name)


def logger_layout(config: Namespace) -> Layout | None:
    """The run layout of the config's first logger; None without one (``--trainer.logger false``)."""
    spec = config.trainer.logger
    spec = spec[0] if isinstance(spec, list) and spec else spec
    if spec is False or spec == []:
        return None
    if not isinstance(spec, Namespace) or "class_path" not in spec:
        raise ResumeError("--ckpt_path last: give the logger as a class (class_path), or --trainer.logger false")
    module, _, name = spec.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {**_defaults(cls), **dict(spec.get("init_args") or {})}
    default_root = Path(config.trainer.default_root_dir or os.getcwd())
    if issubclass(cls, _LightningWandbLogger):
        folder = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
        save_dir = args.get("save_dir") or args.get("dir") or default_root
        version = args.get("version") or args.get("id")
        return Layout(Path(save_dir) / folder, "id", version)
    if issubclass(cls, CSVLogger | TensorBoardLogger):
        version = args.get("version")
        version = version if version is None or isinstance(version, str) else f"version_{version}"
        return Layout(Path(args["save_dir"]) / args.get("name", "lightning_logs"), "version", version)
    raise ResumeError(
        f"--ckpt_path last: cannot tell where {spec.class_path} keeps its runs; give the checkpoint's path"
    )


def run_dir(trainer: L.Trainer) -> Path:
    """The folder above the one Lightning's ``ModelCheckpoint`` writes to by default (same rules)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version
    if version is None:  # a W&B run not started yet: starting it gives the id
        getattr(logger, "experiment")  # noqa: B009 (a property with a side effect)
        version = logger.version
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    return Path(save_dir) / str(logger.name) / (version if isinstance(version, str) else f"version_{version}")


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved config as ``config.yaml`` into the run's folder (:func:`run_dir`) when
    ``fit`` starts, on global rank 0; ``--ckpt_path last`` compares it. Other subcommands write it
    to ``trainer.log_dir`` as Lightning does."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's saving to ``log_dir`` outside ``fit``; :meth:`save_config` for ``fit``."""
        self.save_to_log_dir = stage != "fit"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """While fitting (rank 0 only), write ``config.yaml`` to the run's folder, overwriting: a resumed
        run rewrites the same configuration."""
        if stage != "fit":
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, folder / self.config_filename, skip_unset=False, overwrite=True, multifile=False)


def _defaults(cls: type) -> dict[str, Any]:
    """Default values of the class's ``__init__`` arguments, following ``**kwargs`` into its bases."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    out[name] = p.default
    return out


def _resolve_last(parser: Any, config: Namespace, layout: Layout | None) -> None:
    """``--ckpt_path last``: set ``ckpt_path`` to the newest ``last*.ckpt`` of this run (see module docstring)."""
    extra = _explicit_dirs(config)
    if layout is None or layout.version is not None:
        root = Path(config.trainer.default_root_dir or os.getcwd())
        run = root if layout is None else layout.root / str(layout.version)
        dirs = [run / "checkpoints", *extra]
        found = _newest([p for d in dirs for p in _lasts(d)])
        if found is None:
            raise ResumeError(f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, dirs))}")
        config.ckpt_path = str(found)
        rank_zero_info(f"--ckpt_path last: resuming from {found}")
        return
    mine = _normalized(parser, config)
    runs = sorted(d for d in (layout.root.iterdir() if layout.root.is_dir() else []) if _lasts(d / "checkpoints"))
    matching = [d for d in runs if _saved(d) == mine]
    if not matching:
        raise ResumeError(f"--ckpt_path last: no run of this configuration with a last*.ckpt in {layout.root}"
                          + _why_not(runs, mine))  # fmt: skip
    run = max(matching, key=lambda d: _newest(_lasts(d / "checkpoints")).stat().st_mtime)  # type: ignore[union-attr]
    found = _newest([*_lasts(run / "checkpoints"), *(p for d in extra for p in _lasts(d))])
    _set_version(config, layout, run.name)
    config.ckpt_path = str(found)
    rank_zero_info(f"--ckpt_path last: resuming run {run.name} from {found}")


def _set_version(config: Namespace, layout: Layout, version: str) -> None:
    spec = config.trainer.logger[0] if isinstance(config.trainer.logger, list) else config.trainer.logger
    if spec.get("init_args") is None:
        spec.init_args = Namespace()
    spec.init_args[layout.key] = version


def _explicit_dirs(config: Namespace) -> list[Path]:
    """The ``dirpath`` of every ModelCheckpoint in ``trainer.callbacks`` that sets one."""
    out = []
    for cb in config.trainer.get("callbacks") or []:
        if isinstance(cb, Namespace) and cb.get("class_path", "").endswith("ModelCheckpoint"):
            dirpath = (cb.get("init_args") or Namespace()).get("dirpath")
            if dirpath:
                out.append(Path(dirpath))
    return out


def _lasts(folder: Path) -> list[Path]:
    """``last*.ckpt`` in ``folder``: the files Lightning's ``ckpt_path="last"`` considers."""
    return sorted(folder.glob("last*.ckpt")) if folder.is_dir() else []


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def _normalized(parser: Any, config: Namespace) -> dict[str, Any]:
    """The config as flat ``{dotted key: value}``, without :data:`IGNORED` and the logger's id/version."""
    return _drop(_flat(yaml.safe_load(parser.dump(config, skip_unset=False))))


def _saved(run: Path) -> dict[str, Any] | None:
    """The normalized ``config.yaml`` of a run folder (None without one)."""
    path = run / "config.yaml"
    return _drop(_flat(yaml.safe_load(path.read_text()))) if path.is_file() else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}`` (lists stay values)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _drop(flat: dict[str, Any]) -> dict[str, Any]:
    skip = (*IGNORED, "trainer.logger.init_args.id", "trainer.logger.init_args.version")
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(f"{s}.") for s in skip)}


def _why_not(runs: list[Path], mine: dict[str, Any]) -> str:
    """What the newest run with a checkpoint differs in (likely the one meant), and how to resume it anyway."""
    if not runs:
        return ""
    newest = max(runs, key=lambda d: _newest(_lasts(d / "checkpoints")).stat().st_mtime)  # type: ignore[union-attr]
    theirs = _saved(newest)
    if theirs is None:
        return f"; {len(runs)} run(s) there, the newest ({newest.name}) has no config.yaml"
    keys = sorted(mine.keys() ^ theirs.keys() | {k for k in mine if theirs.get(k) != mine[k]})
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    path = _newest(_lasts(newest / "checkpoints"))
    return f"; {len(runs)} run(s) there, the newest ({newest.name}) differs in {shown} (to continue it anyway: --ckpt_path {path})"
