"""Confusion matrix, precision-recall and F1-confidence curves of an evaluation: PNG files in the run
folder, the same images in W&B."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchvision.ops import box_convert

from ..analysis import EvalData, best_f1, confusion_matrix, f1_curves, pr_curves, true_positives
from ..loggers import log_to_wandb, wandb_run
from ..metrics import ShardedMeanAveragePrecision
from ..plots import plot_confusion_matrix, plot_f1_curves, plot_pr_curves
from .results import run_dir

# per-image states of the module's MeanAveragePrecision that the analysis reads (boxes: xywh, as torchmetrics keeps them)
STATES = ("detection_box", "detection_scores", "detection_labels", "groundtruth_box", "groundtruth_labels", "image_ids")


class DetectionAnalysis(L.Callback):
    """At the end of ``validate`` and ``test``, and of the last validation of ``fit``: a confusion
    matrix, per-class precision-recall curves and F1 against the confidence threshold, from the very
    detections and ground truths the module's mAP saw (``val_map``/``test_map``, original pixels).

    Written to the run folder (:func:`~detector.callbacks.results.run_dir`) as ``<stage>_confusion_matrix.png``,
    ``<stage>_pr_curve.png``, ``<stage>_f1_curve.png`` and ``<stage>_analysis.json`` (the numbers),
    stage ``val`` or ``test``, and to W&B as images under the same names (``val/confusion_matrix``, ...)
    with the best F1 and its threshold (``val/best_f1``, ``val/best_f1_conf``, every logger). The best
    threshold is printed.

    - Confusion matrix: detections scoring >= ``score_threshold`` matched to ground truths of any
      class at IoU >= ``iou_threshold``, one to one, highest IoU first (:func:`detector.analysis.confusion_matrix`).
    - PR curves: COCO's interpolated precision at 101 recall thresholds at ``iou_threshold``, from
      torchmetrics' ``MeanAveragePrecision(extended_summary=True)``: a class's mean precision is its AP
      (``val/map_50`` at 0.5).
    - F1: exact precision and recall of the detections scoring >= c, COCO's matching
      (:func:`detector.analysis.true_positives`); the best c maximises the mean F1 over classes.

    Cost: a validation inside ``fit`` only keeps references to the metric's per-image tensors; the
    analysis runs once, when training ends. Under DDP every process's images are gathered
    (``ShardedMeanAveragePrecision``'s uneven-shard gather) and rank 0 alone analyses and writes.
    Needs a module with ``val_map``/``test_map`` (``MeanAveragePrecision``) and ``class_names``.

    Args:
        iou_threshold: IoU of a match (0.5). score_threshold: detections kept in the confusion matrix (0.25).
    """

    def __init__(self, iou_threshold: float = 0.5, score_threshold: float = 0.25) -> None:
        if not 0.0 < iou_threshold <= 1.0 or not 0.0 <= score_threshold <= 1.0:
            raise ValueError(
                f"need 0 < iou_threshold <= 1 and 0 <= score_threshold <= 1, got {iou_threshold}, {score_threshold}"
            )
        self.iou_threshold, self.score_threshold = iou_threshold, score_threshold
        self._pending: dict[str, list[Tensor]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """ValueError unless the module evaluates with ``val_map``/``test_map`` and names its classes."""
        missing = [a for a in ("val_map", "test_map", "class_names") if not hasattr(pl_module, a)]
        if missing:
            raise ValueError(
                f"DetectionAnalysis needs a module with {', '.join(missing)}; {type(pl_module).__name__} has none"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep this validation's per-image states (the module's own hook, which resets the metric, runs next)."""
        if not trainer.sanity_checking:
            self._keep(pl_module.val_map)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep the test's per-image states."""
        self._keep(pl_module.test_map)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Analyse a ``validate`` run now; inside ``fit`` wait for the end of training (the last validation)."""
        if not trainer.sanity_checking and trainer.state.fn != TrainerFn.FITTING:
            self.analyse(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Analyse the test run."""
        self.analyse(trainer, pl_module, "test")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Analyse the last validation of ``fit`` (nothing when ``fit`` never validated)."""
        self.analyse(trainer, pl_module, "val")

    def _keep(self, metric: Any) -> None:
        self._pending = {name: list(getattr(metric, name)) for name in STATES}  # the lists are replaced on reset

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, Any] | None:
        """Gather the kept states (every process), then on rank 0 analyse, write, log; returns the numbers there."""
        kept, self._pending = self._pending, None
        if kept is None:
            return None
        data, result = gather(kept, self.iou_threshold, pl_module.device, compute=trainer.is_global_zero)
        if not trainer.is_global_zero:
            return None
        if data is None or result is None:
            rank_zero_warn(f"DetectionAnalysis: no {stage} image was evaluated; nothing to analyse")
            return None
        names: list[str] = list(pl_module.class_names)  # type: ignore[arg-type]
        folder = run_dir(trainer)
        summary, figures = self._analyse(data, result, names, folder, stage)
        best = summary["best_f1"]
        if best is None:
            line = "no ground truth, no F1"
        elif best["conf"] is None:
            line = "no detection, F1 0"
        else:
            line = f"best F1 {best['f1']:.3f} at confidence {best['conf']:.3f} (mean over classes)"
        rank_zero_info(f"{stage}: {line}; confusion matrix, PR and F1 curves written to {folder}")
        if best is not None and best["conf"] is not None:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"{stage}/best_f1": best["f1"], f"{stage}/best_f1_conf": best["conf"]}, trainer.global_step
                )
        if wandb_run(trainer) is not None:
            import wandb

            log_to_wandb(trainer, {f"{stage}/{key}": wandb.Image(str(path)) for key, path in figures.items()})
        return summary

    def _analyse(
        self, data: EvalData, result: dict[str, Tensor], names: list[str], folder: Path, stage: str
    ) -> tuple[dict[str, Any], dict[str, Path]]:
        k, iou = len(names), self.iou_threshold
        matrix = confusion_matrix(data, k, iou, self.score_threshold)
        scores, labels, tp, n_gt = true_positives(data, k, iou)
        best = best_f1(scores, labels, tp, n_gt)
        grid = torch.linspace(0, 1, 501, dtype=torch.float64)
        f1 = f1_curves(scores, labels, tp, n_gt, grid)
        precision = pr_curves(result, k)
        recall = torch.linspace(0, 1, precision.shape[1], dtype=torch.float64)
        at = f"IoU {iou:g}"
        figures = {
            "confusion_matrix": plot_confusion_matrix(
                matrix, names, folder / f"{stage}_confusion_matrix.png", f"{stage}: {at}, score >= {self.score_threshold:g}"
            ),
            "pr_curve": plot_pr_curves(recall, precision, names, folder / f"{stage}_pr_curve.png", f"{stage}: precision-recall, {at}"),
            "f1_curve": plot_f1_curves(
                grid, f1, names, None if best is None or best.conf is None else (best.conf, best.f1),
                folder / f"{stage}_f1_curve.png", f"{stage}: F1 against confidence, {at}",
            ),
        }  # fmt: skip
        summary = {
            "stage": stage, "iou_threshold": iou, "score_threshold": self.score_threshold, "classes": names,
            "images": len(data.boxes), "detections": len(scores), "ground_truths": n_gt.tolist(), "confusion_matrix": matrix.tolist(),
            "ap": [None if row.isnan().any() else float(row.mean()) for row in precision],
            "best_f1": None if best is None else {
                "conf": best.conf, "f1": best.f1, "precision": best.precision, "recall": best.recall,
                "per_class": [[None if v != v else v for v in row] for row in best.per_class.tolist()],
            },
        }  # fmt: skip
        (folder / f"{stage}_analysis.json").write_text(json.dumps(summary, indent=1))
        return summary, figures


def gather(
    kept: dict[str, list[Tensor]], iou_threshold: float, device: torch.device, compute: bool = True
) -> tuple[EvalData | None, dict[str, Tensor] | None]:
    """Every process's kept per-image states, gathered, and (when ``compute``) torchmetrics' extended
    summary at ``iou_threshold`` over all of them. A collective: every process calls it.

    ``kept`` holds the states as torchmetrics stores them (:data:`STATES`; boxes ``[N, 4]`` xywh, the
    COCO backends' format, whatever ``box_format`` the metric was given); the returned
    :class:`EvalData` has xyxy boxes. The gather is ``ShardedMeanAveragePrecision``'s (processes may
    hold different numbers of images); the analysis does not depend on the order of the images.
    Returns ``(None, None)`` when no process holds an image, or when not ``compute``.
    """
    metric = ShardedMeanAveragePrecision(
        box_format="xywh", iou_type="bbox", backend="faster_coco_eval", iou_thresholds=[iou_threshold],
        extended_summary=True, sync_on_compute=False,
    ).to(device)  # fmt: skip
    if kept["image_ids"]:
        preds = [
            {"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(kept["detection_box"], kept["detection_scores"], kept["detection_labels"])
        ]
        targets = [
            {"boxes": b, "labels": lab, "image_id": i}
            for b, lab, i in zip(kept["groundtruth_box"], kept["groundtruth_labels"], kept["image_ids"])
        ]
        metric.update(preds, targets)
    metric.sync()  # all processes' images (a no-op on one process); compute() below un-syncs again
    if not compute or not metric.image_ids:
        return None, None
    boxes = [[box_convert(b, "xywh", "xyxy") for b in getattr(metric, name)] for name in STATES[0:4:3]]
    data = EvalData(boxes[0], list(metric.detection_scores), list(metric.detection_labels), boxes[1],
                    list(metric.groundtruth_labels))  # fmt: skip  # read before compute un-syncs
    return data, metric.compute()
