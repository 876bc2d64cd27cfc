"""The command line: LightningCLI over DetectorModule and DetectionDataModule.

``python train.py --config configs/default.yaml`` fits (``fit`` is implied when no subcommand
is given, also for ``--help``), then validates the best checkpoint and prints the metric table.
Every other LightningCLI feature works as usual: ``validate``, ``test``, ``predict``,
``--print_config``, dotted overrides such as ``--trainer.max_epochs 3``. A mistake on the command
line or in a config file ends in one line naming the key, the value and what the key accepts
(``detector.cli_errors``; the full message with ``DETECTOR_DEBUG=1``), with exit status 2.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .cli_errors import check_ckpt_path, summarize_init_error, summarize_parse_error
from .data import DetectionDataModule
from .data.readers.checks import DataError, data_error_message
from .module import DetectorModule
from .optim import upgrade_hparams
from .runs import ResumeError, RunConfigSaver, prepare_run

SUBCOMMANDS = ("fit", "validate", "test", "predict")
FIT_HELP = (
    "Train, then validate the best checkpoint. fit is the default subcommand: `python train.py --config "
    "configs/default.yaml` runs it, and `python train.py --help` shows its options (below). The other "
    "subcommands are validate, test and predict: `python train.py predict --help` shows theirs."
)


class DetectorCLI(LightningCLI):
    """LightningCLI that links the data's class names to the model and reports user mistakes in one line."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        """Link the data's class names and category ids to the model once the datamodule is instantiated."""
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.category_ids", "model.category_ids", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 (jsonargparse types)
        """Parse as LightningCLI does, but report a mistake in one line (jsonargparse's own
        message nests every union it tried); the full message follows with ``DETECTOR_DEBUG=1``."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = list(sys.argv[1:] if args is None else args)
            subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else "fit"  # main() puts it first
            try:
                line = summarize_parse_error(err, self._roots(subcommand), argv)
            except Exception:  # a summary that failed must not hide the error: jsonargparse's first line
                line = str(err).strip().splitlines()[0]
            _user_error(line, err)

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI 2.6 does (its ``_parse_ckpt_path``): with a checkpoint file as ``ckpt_path``, the
        checkpoint's hyper-parameters (injected backbone and optimizer included) override the model's
        config. Hyper-parameters of checkpoints written before the optimizer was injected are upgraded
        first (``detector.optim.upgrade_hparams``); a mismatch is one line, as other config mistakes."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = upgrade_hparams(torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except ArgumentError as err:
            line = str(err).strip().splitlines()[0]
            _user_error(f"ckpt_path: the hyper-parameters of {str(path)!r} do not fit this model: {line}", err)

    def _roots(self, subcommand: str) -> dict[str, Any]:
        """The classes behind the config's groups, and the subcommand's Trainer method (top-level keys)."""
        trainer = self.trainer_class if isinstance(self.trainer_class, type) else None
        roots: dict[str, Any] = {"model": self.model_class, "data": self.datamodule_class, "trainer": trainer}
        roots[""] = getattr(trainer, subcommand, None)
        return {k: v for k, v in roots.items() if v is not None}

    def before_instantiate_classes(self) -> None:
        """Before any data is read: stop on a ``ckpt_path`` that names no checkpoint, resolve ``last`` to
        this configuration's latest run (``detector/runs.py``), and give the data the checkpoint's class
        mapping for validate/test/predict."""
        if self.subcommand is None:
            return
        message = check_ckpt_path(self.config[self.subcommand].get("ckpt_path"))
        if message:
            _user_error(message)
        try:
            prepare_run(self.subcommand, self._parser(self.subcommand), self.config[self.subcommand])
        except ResumeError as err:
            _user_error(str(err), err)
        self._mapping_from_checkpoint()

    def _mapping_from_checkpoint(self) -> None:
        """validate/test/predict ``--ckpt_path``: the class names and category ids the model was trained
        with (LightningCLI has put the checkpoint's hyper-parameters into ``model``) become the data's, so
        the training split is not read to learn them. Checkpoints without category ids: unchanged."""
        config = self.config[self.subcommand]
        names, ids = config.model.get("class_names"), config.model.get("category_ids")
        if self.subcommand != "fit" and config.get("ckpt_path") and names and ids is not None:
            config.data.class_names, config.data.category_ids = list(names), list(ids)

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a failed argument check exits 2 with one line naming the key."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, MisconfigurationException) as err:  # argument checks: a user mistake
            _user_error(summarize_init_error(err), err)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run as LightningCLI does; bad input found while running (a val/test split is built at setup,
        ``strict`` stops at load time) exits 2 with the same ``error:`` report as a bad training split."""
        try:
            super()._run_subcommand(subcommand)
        except DataError as err:  # one line, as instantiate_classes prints a bad training split
            _user_error(" ".join(data_error_message(err).split()), err)

    def after_fit(self) -> None:
        """Validate the best checkpoint (the last weights when none was saved) and print the table."""
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", None) or None  # ModelCheckpoint's; None: the last weights
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)


def _user_error(message: str, err: BaseException | None = None) -> None:
    """Print ``error: <message>`` (after the full traceback when ``DETECTOR_DEBUG=1``) and exit 2."""
    if err is not None and os.environ.get("DETECTOR_DEBUG"):
        traceback.print_exception(err, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cli_kwargs() -> dict:
    """The keyword arguments ``main`` gives ``DetectorCLI`` (tests build the same CLI with ``run=False``)."""
    return {
        "seed_everything_default": 0,
        "save_config_callback": RunConfigSaver,  # config.yaml in the run's folder (detector/runs.py)
        "save_config_kwargs": {"overwrite": True},
        "auto_configure_optimizers": False,
        # allow_abbrev (the subcommands inherit it): no abbreviated options, jsonargparse 5's default, so
        # a misspelt key such as --trainer.max_epoch is an error instead of silently another key
        "parser_kwargs": {"exit_on_error": False, "allow_abbrev": False, "fit": {"description": FIT_HELP}},
    }


def main(args: list[str] | None = None) -> DetectorCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None) and return it; ``fit`` when no subcommand is given.

    For Python callers (tests, ``detector.ablate``). The ``detector-train`` script and ``train.py``
    call ``console_main``, which returns an exit status instead.
    """
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] not in SUBCOMMANDS:  # also for --help: fit's options are the useful ones
        if args is None:
            sys.argv.insert(1, "fit")
        else:
            args = ["fit", *args]
    return DetectorCLI(DetectorModule, DetectionDataModule, args=args, **cli_kwargs())


def console_main() -> int:
    """Entry point of ``detector-train`` and ``train.py``: exit status 0 once the subcommand has finished.

    A mistake in the arguments exits 2 (one line on stderr), any other failure raises (exit status 1).
    """
    main()
    return 0
