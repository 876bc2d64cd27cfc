"""The LightningModule: training and evaluation steps, optimizer and schedule, metrics."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from .anchors import best_possible_recall, dataset_wh
from .losses.yolo_loss import YOLOLoss
from .models import YOLOv3
from .ops.boxes import unletterbox
from .ops.dist import local_only
from .ops.postprocess import postprocess

Batch = tuple[Tensor, list[dict[str, Tensor]]]
# Keys of MeanAveragePrecision's result logged as val/<key> (DESIGN.md names).
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class DetectorModule(L.LightningModule):
    """YOLOv3 training and COCO-style evaluation.

    Batches follow DESIGN.md: ``images float32 [B, 3, S, S]`` in 0..1 (letterboxed) and one
    target dict per image (``boxes [N, 4]`` xyxy input pixels, ``labels [N]``, ``image_id``,
    ``orig_size`` (h, w), ``letterbox`` (scale, pad_x, pad_y)). Evaluation maps detections
    and ground truths back to original pixels before ``MeanAveragePrecision``.

    Args:
        class_names: class names, label order (linked from the datamodule by the CLI).
        preset: model preset, see ``detector.models.PRESETS``.
        anchors: anchors per scale in pixels; the preset's when None.
        weights: optional local file of pretrained weights.
        loss: the YOLO loss with its pluggable parts; darknet's recipe when None.
        optimizer: "sgd" (Nesterov momentum, darknet's and Ultralytics' choice) or "adamw"
            (``momentum`` is then β1); no weight decay on norm weights and biases either way.
        lr, momentum, weight_decay: optimizer settings.
        warmup_epochs: linear warm-up of the learning rate, then cosine decay to ``lr·min_lr_ratio``.
        conf_thresh, nms_iou, max_det: post-processing for evaluation (COCO: 0.001, 100 per image).
    """

    def __init__(
        self,
        class_names: list[str],
        preset: str = "nano",
        anchors: list[list[tuple[float, float]]] | None = None,
        weights: str | None = None,
        loss: YOLOLoss | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.937,
        weight_decay: float = 5e-4,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.05,
        conf_thresh: float = 0.001,
        nms_iou: float = 0.6,
        max_det: int = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        self.class_names = list(class_names)
        self.model = YOLOv3(len(self.class_names), preset, anchors, weights)
        self.criterion = loss if loss is not None else YOLOLoss()
        self.val_map = self._make_metric()
        self.test_map = self._make_metric()

    @staticmethod
    def _make_metric() -> MeanAveragePrecision:
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", class_metrics=True)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B, 3, S, S]`` -> per scale ``[B, A, S/s, S/s, 5 + C]`` raw outputs."""
        return self.model(images)

    def detect(self, images: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Raw outputs and detections (input pixels) for a batch of images."""
        outputs = self.model(images)
        dets = postprocess(
            outputs, self.model.anchors, self.model.strides, self.hparams.conf_thresh, self.hparams.nms_iou, self.hparams.max_det
        )
        return outputs, dets

    def on_fit_start(self) -> None:
        """Warn when the anchors fit the training boxes badly (best possible recall < 0.98)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_box_sizes"):
            return
        try:
            wh = dataset_wh(dm)
        except ValueError:  # no boxes: nothing to check
            return
        bpr = best_possible_recall(wh, self.model.anchors.view(-1, 2).cpu())
        if bpr < 0.98:
            rank_zero_warn(
                f"the anchors reach a best possible recall of only {bpr:.3f} on the training boxes; "
                "compute anchors for this data with: python -m detector.anchors --config <your configs>"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.criterion(self.model(images), targets, self.model.anchors, self.model.strides)
        self.log_dict({f"train/{k}": losses[k] for k in ("loss_obj", "loss_cls", "loss_box")}, batch_size=len(images))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(images))
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=len(images))
        return losses["loss"]

    def _eval_step(self, batch: Batch, metric: MeanAveragePrecision, stage: str) -> None:
        images, targets = batch
        outputs, dets = self.detect(images)
        with local_only():  # ranks may run different numbers of eval batches: no collectives here
            losses = self.criterion(outputs, targets, self.model.anchors, self.model.strides)
        self.log(f"{stage}/loss", losses["loss"], on_epoch=True, sync_dist=True, batch_size=len(images))
        preds, gts = [], []
        for det, t in zip(dets, targets):
            preds.append({**det, "boxes": unletterbox(det["boxes"], t["letterbox"], t["orig_size"])})
            if "orig_boxes" in t:  # the annotation itself: exact, as COCO's own evaluation sees it
                gts.append({"boxes": t["orig_boxes"], "labels": t["orig_labels"]})
            else:
                gts.append({"boxes": unletterbox(t["boxes"], t["letterbox"], t["orig_size"]), "labels": t["labels"]})
        metric.update(preds, gts)

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        result = metric.compute()  # synchronised across processes by torchmetrics
        for k in MAP_KEYS:
            self.log(f"{stage}/{k}", result[k].float(), prog_bar=k == "map_50")
        # per class: -1 marks a class with no ground truth and no detection in this split
        for label, ap in zip(result["classes"].view(-1).tolist(), result["map_per_class"].view(-1)):
            self.log(f"{stage}/map_class/{self.class_names[label]}", ap.float())
        metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections in original pixels, with the image id: ``boxes [D, 4]`` xyxy, ``scores``, ``labels``."""
        images, targets = batch
        _, dets = self.detect(images)
        return [
            {**d, "boxes": unletterbox(d["boxes"], t["letterbox"], t["orig_size"]), "image_id": t["image_id"]}
            for d, t in zip(dets, targets)
        ]

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's optimizer/scheduler dict)
        """SGD (Nesterov) or AdamW; weight decay on conv weights only; warm-up then cosine, per step."""
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        hp = self.hparams
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.momentum, 0.999))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = max(int(hp.warmup_epochs * total / epochs), 1) if hp.warmup_epochs > 0 else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
