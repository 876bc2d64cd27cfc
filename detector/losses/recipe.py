"""Build the ``YOLOLoss`` of a loss recipe file (``configs/losses/*.yaml``) outside the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from .yolo_loss import YOLOLoss


def load_recipe(path: str | Path) -> YOLOLoss:
    """Instantiate ``model.loss`` of a recipe YAML the way LightningCLI does (short class names work)."""
    spec = yaml.safe_load(Path(path).read_text())
    try:
        loss = spec["model"]["loss"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} has no model.loss section: is it a loss recipe?") from None
    parser = ArgumentParser()
    parser.add_argument("--loss", type=YOLOLoss)
    return parser.instantiate_classes(parser.parse_object({"loss": loss})).loss
