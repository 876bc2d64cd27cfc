"""Anchors for a dataset: k-means on box sizes with the IoU distance (YOLOv2, arXiv 1612.08242 §2).

    python -m detector.anchors --config configs/default.yaml            # 9 anchors, 3 per scale
    python -m detector.anchors --config configs/default.yaml --k 6 --scales 2

Box sizes are taken at training scale (each image letterboxed to ``data.image_size``). Prints the
anchors per scale (ready for ``model.anchors``), their mean best IoU and the best possible
recall of the model's current anchors and of the new ones.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from .ops.boxes import wh_iou


def kmeans_anchors(wh: Tensor, k: int = 9, iters: int = 100, seed: int = 0) -> Tensor:
    """``k`` anchor sizes ``[k, 2]`` (ascending area) clustering ``wh [N, 2]`` with distance ``1 − IoU``.

    k-means++ seeding, then Lloyd iterations with the cluster median as the centre (robust to the
    long tail of box sizes), stopping when the assignment no longer changes.
    """
    if len(wh) < k:
        raise ValueError(f"need at least k = {k} boxes to cluster, got {len(wh)}")
    g = torch.Generator().manual_seed(seed)
    centres = wh[torch.randint(len(wh), (1,), generator=g)]
    for _ in range(k - 1):  # k-means++: next centre drawn in proportion to its distance
        d = 1 - wh_iou(wh, centres).amax(1)
        centres = torch.cat([centres, wh[torch.multinomial(d / d.sum(), 1, generator=g)]])
    assign = torch.full((len(wh),), -1)
    for _ in range(iters):
        new = wh_iou(wh, centres).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack(
            [wh[assign == i].median(0).values if (assign == i).any() else centres[i] for i in range(k)]
        )
    return centres[centres.prod(1).argsort()]


def best_possible_recall(wh: Tensor, anchors: Tensor, iou_thresh: float = 0.25) -> float:
    """Share of boxes ``wh [N, 2]`` whose best anchor (``[K, 2]``) has shape IoU above ``iou_thresh``."""
    return float((wh_iou(wh, anchors).amax(1) > iou_thresh).float().mean())


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
