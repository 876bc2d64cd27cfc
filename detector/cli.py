"""The command line: LightningCLI over DetectorModule and DetectionDataModule.

``python train.py --config configs/default.yaml`` fits (``fit`` is implied when no subcommand
is given), then validates the best checkpoint and prints the metric table. Every other
LightningCLI feature works as usual: ``validate``, ``test``, ``predict``, ``--print_config``,
dotted overrides such as ``--trainer.max_epochs 3``.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from .data import DetectionDataModule
from .module import DetectorModule

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class DetectorCLI(LightningCLI):
    """LightningCLI that links the data's class names to the model and reports user mistakes in one line."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:  # raised by our argument checks: a user mistake
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def after_fit(self) -> None:
        """Validate the best checkpoint (the last weights when none was saved) and print the table."""
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=False)


def main(args: list[str] | None = None) -> DetectorCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None); ``fit`` when no subcommand is given."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        if args is None:
            sys.argv.insert(1, "fit")
        else:
            args = ["fit", *args]
    return DetectorCLI(
        DetectorModule,
        DetectionDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
