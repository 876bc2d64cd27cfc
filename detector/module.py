"""The LightningModule: training and evaluation steps, optimizer and schedule, metrics."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.detection import MeanAveragePrecision

from .distributed import local_only
from .losses.yolo_loss import YOLOLoss
from .metrics import ShardedMeanAveragePrecision
from .models import Backbone, YOLOv3
from .ops.anchors import best_possible_recall
from .ops.boxes import unletterbox
from .ops.postprocess import postprocess
from .optim import DEFAULT_OPTIMIZER, OptimizerFactory, SchedulerFactory, param_groups, warmup_cosine
from .step_guard import Nonfinite, StepGuard, nonfinite_entries
from .structures import Detections, Target

Batch = tuple[Tensor, list[Target]]
# Keys of MeanAveragePrecision's result logged as val/<key> (the names in docs/design.md).
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class NonFiniteLossError(RuntimeError):
    """A NaN or Inf in a training step (``nonfinite="stop"``) or in weights about to be checkpointed."""


class DetectorModule(L.LightningModule):
    """YOLOv3 training and COCO-style evaluation.

    Batches follow docs/design.md: ``images float32 [B, 3, S, S]`` in 0..1 (letterboxed) and one
    target dict per image (``boxes [N, 4]`` xyxy input pixels, ``labels [N]``, ``image_id``,
    ``orig_size`` (h, w), ``letterbox`` (scale, pad_x, pad_y)). Evaluation maps detections
    and ground truths back to original pixels before ``MeanAveragePrecision``.

    Args:
        class_names: class names, label order (linked from the datamodule by the CLI).
        preset: model preset, see ``detector.models.PRESETS``: the network, or with ``backbone`` its
            neck widths and default anchors (``docs/models.md``).
        backbone: a :class:`detector.models.Backbone` replacing the preset's own (in a config:
            ``class_path`` and ``init_args``); None = the preset's.
        anchors: anchors per scale in pixels; the preset's when None.
        weights: optional local file of pretrained weights.
        loss: the YOLO loss with its pluggable parts; ``YOLOLoss()`` when None, the "paper"
            recipe (BCE objectness and classes, ``DarknetBoxLoss`` with darknet's gradient, ignore 0.5).
        optimizer: an optimizer class (``detector.optim.OptimizerFactory``; in a config ``class_path``
            and ``init_args`` such as momentum or betas), called with two parameter groups (no weight
            decay on norm weights and biases), ``lr`` and ``weight_decay``. None = SGD with Nesterov
            momentum 0.937 (darknet's and Ultralytics' choice).
        lr, weight_decay: the optimizer's learning rate (peak of the schedule) and weight decay.
        lr_scheduler: a torch scheduler class called with the optimizer and stepped after every
            optimizer step; None = the built-in schedule: linear warm-up over ``warmup_epochs``, then
            cosine decay to ``lr·min_lr_ratio`` at the end of training (``detector.optim.warmup_cosine``).
        warmup_epochs, min_lr_ratio: the built-in schedule's settings.
        conf_thresh, nms_iou, max_det: post-processing for evaluation (COCO: 0.001, 100 per image).
        nonfinite: what an optimizer step whose network outputs, loss or gradients hold a NaN/Inf
            does: "skip" (no update; BatchNorm/GHM-C buffers rolled back; counted in
            ``train/nonfinite_skipped``) or "stop" (``NonFiniteLossError`` naming the global step
            and the batch's image ids). Checked once per step, before the optimizer step
            (``detector.step_guard.StepGuard``): one reduction of the outputs, one gradient norm,
            one host sync. All DDP processes take the same branch. A checkpoint with non-finite
            weights is never written.
        channels_last: keep the network in channels-last memory format (faster convs with AMP on GPUs).
        compile: ``torch.compile`` the network in place (state-dict keys unchanged); True for the
            default backend or a backend name (e.g. "inductor", "eager"). The first steps are slow.
        ema_decay, ema_warmup_steps: an exponential moving average of the weights, validated and
            checkpointed (``detector.callbacks.EMA``, added by ``configure_callbacks``); None = off.
        category_ids: the dataset's own id of each label (COCO category ids; linked from the
            datamodule by the CLI); None = the labels themselves. Saved with ``class_names`` in the
            checkpoint's hyper-parameters, so ``validate``/``test``/``predict --ckpt_path`` map labels
            back to the dataset's ids without reading the training split.
    """

    def __init__(
        self,
        class_names: list[str],
        preset: str = "nano",
        backbone: Backbone | None = None,
        anchors: list[list[tuple[float, float]]] | None = None,
        weights: str | None = None,
        loss: YOLOLoss | None = None,
        optimizer: OptimizerFactory | None = None,
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        lr_scheduler: SchedulerFactory | None = None,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.05,
        conf_thresh: float = 0.001,
        nms_iou: float = 0.6,
        max_det: int = 100,
        nonfinite: Literal["skip", "stop"] = "skip",
        channels_last: bool = False,
        compile: bool | str = False,
        ema_decay: float | None = None,
        ema_warmup_steps: float = 200.0,
        category_ids: list[int] | None = None,
    ) -> None:
        super().__init__()
        # Injected parts are hyper-parameters when LightningCLI built them: it hands over their config
        # (class_path, init_args; marked by "_instantiator"), which rebuilds them from a checkpoint. An
        # object given in Python is not saved (checkpoints must load with torch.load(weights_only=True)).
        injected = [
            k
            for k, v in {"backbone": backbone, "optimizer": optimizer, "lr_scheduler": lr_scheduler}.items()
            if v is not None
        ]
        self.save_hyperparameters(ignore=["loss", *injected])
        if injected and "_instantiator" in self.hparams:
            self.save_hyperparameters(ignore=["loss"])
        self.class_names = list(class_names)
        if category_ids is not None and len(category_ids) != len(self.class_names):
            raise ValueError(f"category_ids has {len(category_ids)} ids for {len(self.class_names)} class_names")
        self.model = YOLOv3(len(self.class_names), preset, anchors, weights, backbone)
        self._make_optimizer = optimizer if optimizer is not None else DEFAULT_OPTIMIZER
        self._make_scheduler = lr_scheduler
        self.criterion = loss if loss is not None else YOLOLoss()
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be 'skip' or 'stop', got {nonfinite!r}")
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile(**({} if compile is True else {"backend": compile}))
        self.nonfinite_skipped = 0  # optimizer steps skipped so far; checkpointed
        self._guard: StepGuard | None = None  # set up on the training device in on_train_start
        self.val_map = self._make_metric()
        self.test_map = self._make_metric()
        # evaluation loss, weighted by images: exact under DDP with uneven shards (Lightning's own
        # sync_dist mean would weigh processes by a truncated integer average of their batch sizes)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    @staticmethod
    def _make_metric() -> MeanAveragePrecision:
        # gathers unevenly sharded images under DDP (the evaluation sampler pads nothing)
        return ShardedMeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend="faster_coco_eval", class_metrics=True
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B, 3, S, S]`` -> per scale ``[B, A, S/s, S/s, 5 + C]`` raw outputs."""
        if self.hparams["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def detect(self, images: Tensor) -> tuple[list[Tensor], list[Detections]]:
        """Raw outputs and detections (input pixels) for a batch of images."""
        outputs = self(images)
        dets = postprocess(
            outputs,
            self.model.anchors,
            self.model.strides,
            self.hparams["conf_thresh"],
            self.hparams["nms_iou"],
            self.hparams["max_det"],
        )
        return outputs, dets

    def on_fit_start(self) -> None:
        """Warn when the anchors fit the training boxes badly (best possible recall < 0.98)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_box_sizes"):
            return
        wh = dm.train_box_sizes()  # (N, 2) input pixels
        if not len(wh):  # no boxes: nothing to check
            return
        bpr = best_possible_recall(wh, self.model.anchors.view(-1, 2).cpu())
        if bpr < 0.98:
            rank_zero_warn(
                f"the anchors reach a best possible recall of only {bpr:.3f} on the training boxes; "
                "compute anchors for this data with: python -m detector.anchors --config <your configs>"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """The EMA callback when ``ema_decay`` is set (it replaces an ``EMA`` given to the Trainer)."""
        if self.hparams.get("ema_decay") is None:
            return []
        # imported here: detector.callbacks imports the data and W&B stacks, which training needs not
        from .callbacks.ema import EMA

        return [EMA(self.hparams["ema_decay"], self.hparams.get("ema_warmup_steps", 200.0))]

    def on_train_start(self) -> None:
        """Set up the non-finite guard on the training device (its buffer snapshot holds the buffers the steps write)."""
        self._guard = StepGuard(self)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Loss of one batch; the non-finite guard records it and decides before the optimizer step."""
        images, targets = batch
        if self._guard is not None:
            self._guard.begin()
        outputs = self(images)
        # The losses take NaN/Inf outputs without failing (GHM-C clamps its bin index, PISA ranks them;
        # tests/test_nonfinite.py runs every loss on them); the guard rolls back what they wrote.
        losses = self.criterion(outputs, targets, self.model.anchors, self.model.strides)
        if self._guard is not None:
            self._guard.record(outputs, losses["loss"], [t.get("image_id") for t in targets])
        self.log_dict({f"train/{k}": losses[k] for k in ("loss_obj", "loss_cls", "loss_box")}, batch_size=len(images))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(images))
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt  # one optimizer (configure_optimizers)
        self.log("lr", opt.param_groups[0]["lr"], batch_size=len(images))
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite guard's one check per step, once the gradients are there (and unscaled under
        AMP); a step with a NaN/Inf in its outputs, loss or gradients is skipped or stops the run."""
        if self._guard is None:
            return
        # a GradScaler (16-mixed) skips steps whose gradients are non-finite itself, and lowers its scale
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found = self._guard.check(None if scaled else grads)
        if found is not None:
            self._nonfinite(found, optimizer)

    def _nonfinite(self, found: Nonfinite, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step (no update, buffers rolled back, counted) or stop the run, per ``hparams.nonfinite``.

        Skipping drops every gradient, so the optimizer (which leaves parameters without a gradient
        alone) changes neither weights nor momentum; the forward passes' BatchNorm statistics and
        stateful-loss buffers (GHM-C) go back to the snapshot taken before the step's first batch.
        The learning-rate schedule and ``global_step`` still advance. With gradient accumulation the
        whole accumulated step is skipped.
        """
        step = self.trainer.global_step
        losses = ", ".join(f"{v:.3g}" for v in found.losses)
        where = f"at global step {step} (epoch {self.current_epoch}; loss {losses})"
        if self.hparams["nonfinite"] == "stop":
            raise NonFiniteLossError(
                f"non-finite {found.what} {where}; image ids of the batch: {found.image_ids}. "
                "Lower the learning rate or fix these images, or set model.nonfinite=skip to skip such steps."
            )
        optimizer.zero_grad(set_to_none=True)
        if self._guard is not None:
            self._guard.snapshot.restore()
        self.nonfinite_skipped += 1
        rank_zero_warn(f"skipped a step with non-finite {found.what} {where}; image ids: {found.image_ids}")
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=max(len(found.image_ids), 1))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to write non-finite weights (raw or averaged); keep the skip counter."""
        bad = nonfinite_entries(checkpoint["state_dict"]) + nonfinite_entries(checkpoint.get("current_model_state", {}))
        if bad:
            raise NonFiniteLossError(
                f"refusing to write a checkpoint at global step {checkpoint.get('global_step')}: "
                f"non-finite values in {bad[:5]}{' ...' if len(bad) > 5 else ''}"
            )
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume the count of skipped non-finite batches."""
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def _eval_step(self, batch: Batch, metric: MeanAveragePrecision, stage: str) -> None:
        images, targets = batch
        outputs, dets = self.detect(images)
        with local_only():  # ranks may run different numbers of eval batches: no collectives here
            losses = self.criterion(outputs, targets, self.model.anchors, self.model.strides)
        loss_metric = self.val_loss if stage == "val" else self.test_loss
        loss_metric.update(losses["loss"].detach(), weight=len(images))
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True)
        preds, gts = [], []
        for det, t in zip(dets, targets):
            boxes = unletterbox(det["boxes"], t["letterbox"], t["orig_size"])
            preds.append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
            if "orig_boxes" in t:  # the annotation itself: exact, as COCO's own evaluation sees it
                gts.append({"boxes": t["orig_boxes"], "labels": t["orig_labels"], "image_id": t["image_id"]})
            else:
                gts.append(
                    {
                        "boxes": unletterbox(t["boxes"], t["letterbox"], t["orig_size"]),
                        "labels": t["labels"],
                        "image_id": t["image_id"],
                    }
                )
        metric.update(preds, gts)

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        result = metric.compute()  # from every process's detections: the same values on every rank
        # sync_dist with max of identical values: exact, and Lightning's check for epoch metrics is met
        for k in MAP_KEYS:
            self.log(f"{stage}/{k}", result[k].float(), prog_bar=k == "map_50", sync_dist=True, reduce_fx="max")
        # per class: -1 marks a class with no ground truth and no detection in this split
        for label, ap in zip(result["classes"].view(-1).tolist(), result["map_per_class"].view(-1)):
            self.log(f"{stage}/map_class/{self.class_names[label]}", ap.float(), sync_dist=True, reduce_fx="max")
        metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Detections and loss of one batch; ``val_map`` and ``val/loss`` accumulate them in original pixels."""
        self._eval_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/map`` and friends, per class too, and reset the metric."""
        self._log_map(self.val_map, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Detections and loss of one batch; ``test_map`` and ``test/loss`` accumulate them in original pixels."""
        self._eval_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        """Log ``test/map`` and friends, per class too, and reset the metric."""
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections in original pixels, with the image id: ``boxes [D, 4]`` xyxy, ``scores``, ``labels``."""
        images, targets = batch
        _, dets = self.detect(images)
        return [
            {
                "boxes": unletterbox(d["boxes"], t["letterbox"], t["orig_size"]),
                "scores": d["scores"],
                "labels": d["labels"],
                "image_id": t["image_id"],
            }
            for d, t in zip(dets, targets)
        ]

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """The injected optimizer over two parameter groups (no weight decay on norm weights and biases),
        with the injected scheduler or the built-in warm-up + cosine, stepped after every optimizer step."""
        hp = self.hparams
        opt = self._make_optimizer(param_groups(self, hp["weight_decay"]), lr=hp["lr"], weight_decay=hp["weight_decay"])
        if self._make_scheduler is not None:
            sched = self._make_scheduler(opt)
        else:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            sched = warmup_cosine(opt, total, epochs, hp["warmup_epochs"], hp["min_lr_ratio"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
