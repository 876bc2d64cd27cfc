"""The anchors command: k-means on a dataset's box sizes with the IoU distance (YOLOv2, arXiv 1612.08242 §2).

    python -m detector.anchors --config configs/default.yaml            # 9 anchors, 3 per scale
    python -m detector.anchors --config configs/default.yaml --k 6 --scales 2

Box sizes are taken at training scale (each image letterboxed to ``data.image_size``). Prints the
anchors per scale (ready for ``model.anchors``), their mean best IoU and the best possible
recall of the model's current anchors and of the new ones. The functions are in ``detector.ops.anchors``;
this module is the command line only (it builds the CLI, so nothing in the package imports it).
"""

from __future__ import annotations

import argparse

from torch import Tensor

from .ops.anchors import best_possible_recall, kmeans_anchors
from .ops.boxes import wh_iou


def dataset_wh(datamodule) -> Tensor:  # noqa: ANN001 (a DetectionDataModule)
    """Training box sizes ``[N, 2]`` in input pixels (``datamodule.train_box_sizes()``); an error when none."""
    wh = datamodule.train_box_sizes()
    if not len(wh):
        raise ValueError("the training annotations hold no boxes (with image sizes) to cluster")
    return wh


def main(argv: list[str] | None = None) -> Tensor:
    """Parse ``--config ... [--k K] [--scales S]``, cluster and print the anchors."""
    from .cli import DetectorCLI
    from .data import DetectionDataModule
    from .module import DetectorModule

    parser = argparse.ArgumentParser(prog="python -m detector.anchors", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for train.py")
    parser.add_argument("--k", type=int, default=9, help="number of anchors")
    parser.add_argument("--scales", type=int, default=3, help="detection scales (anchors are split evenly)")
    args = parser.parse_args(argv)
    if args.k % args.scales:
        parser.error(f"--k {args.k} must be a multiple of --scales {args.scales}")
    cli_args = [a for c in args.config for a in ("--config", c)] + ["--trainer.logger", "false"]
    cli = DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=cli_args)
    wh = dataset_wh(cli.datamodule)
    anchors = kmeans_anchors(wh, args.k)
    current = cli.model.model.anchors.view(-1, 2)
    per_scale = anchors.round().int().view(args.scales, -1, 2).tolist()
    print(f"{len(wh)} boxes at {cli.datamodule.image_size} px")
    print(f"current anchors: best possible recall {best_possible_recall(wh, current):.4f}, "
          f"mean best IoU {wh_iou(wh, current).amax(1).mean():.4f}")  # fmt: skip
    print(f"k-means anchors: best possible recall {best_possible_recall(wh, anchors):.4f}, "
          f"mean best IoU {wh_iou(wh, anchors).amax(1).mean():.4f}")  # fmt: skip
    print(f"model:\n  anchors: {per_scale}")
    return anchors


if __name__ == "__main__":
    main()
