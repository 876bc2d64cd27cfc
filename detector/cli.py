"""The command line: LightningCLI over DetectorModule and DetectionDataModule.

``python train.py --config configs/default.yaml`` fits (``fit`` is implied when no subcommand
is given), then validates the best checkpoint and prints the metric table. Every other
LightningCLI feature works as usual: ``validate``, ``test``, ``predict``, ``--print_config``,
dotted overrides such as ``--trainer.max_epochs 3``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from . import losses
from .data import DetectionDataModule
from .models import PRESETS
from .module import DetectorModule
from .runs import ResumeError, RunConfigSaver, prepare_run

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class DetectorCLI(LightningCLI):
    """LightningCLI that links the data's class names to the model and reports user mistakes in one line."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        """Link ``data.class_names`` to ``model.class_names`` once the datamodule is instantiated."""
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 (jsonargparse types)
        """Parse as LightningCLI does, but report a bad value in one line (jsonargparse's own
        message nests every union it tried); the full message follows with ``DETECTOR_DEBUG=1``."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            print(f"error: {summarize_parse_error(str(err))}", file=sys.stderr)
            if os.environ.get("DETECTOR_DEBUG"):
                print(err, file=sys.stderr)
            sys.exit(2)

    def before_instantiate_classes(self) -> None:
        """Check ``--ckpt_path`` and resolve ``last`` to this configuration's latest run (detector/runs.py)."""
        if self.subcommand is None:
            return
        try:
            prepare_run(self.subcommand, self._parser(self.subcommand), self.config[self.subcommand])
        except ResumeError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; our argument checks' ValueError/FileNotFoundError exit 2 with one line."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # raised by our argument checks: a user mistake
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def after_fit(self) -> None:
        """Validate the best checkpoint (the last weights when none was saved) and print the table."""
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", None) or None  # ModelCheckpoint's; None: the last weights
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)


def summarize_parse_error(message: str) -> str:
    """One line from a jsonargparse error: the key, the rejected value and close known names."""
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', message)
    values = re.findall(r"Given value: (.+)", message)
    if not keys or not values:
        return message.strip().splitlines()[0]
    value = values[0].strip()
    known = [*losses.__all__, *PRESETS]
    close = difflib.get_close_matches(value.split(".")[-1], known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help for what it accepts"
    return f"{'.'.join(keys)}: {value!r} is not valid{hint}"


def cli_kwargs() -> dict:
    """The keyword arguments ``main`` gives ``DetectorCLI`` (tests build the same CLI with ``run=False``)."""
    return {
        "seed_everything_default": 0,
        "save_config_callback": RunConfigSaver,  # config.yaml in the run's folder (detector/runs.py)
        "save_config_kwargs": {"overwrite": True},
        "auto_configure_optimizers": False,
        "parser_kwargs": {"exit_on_error": False},
    }


def main(args: list[str] | None = None) -> DetectorCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None); ``fit`` when no subcommand is given."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        if args is None:
            sys.argv.insert(1, "fit")
        else:
            args = ["fit", *args]
    return DetectorCLI(DetectorModule, DetectionDataModule, args=args, **cli_kwargs())
