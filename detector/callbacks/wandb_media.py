"""W&B media: images with predicted and ground-truth boxes, per-class AP as a table and a bar chart.

Everything here runs on global rank 0 with a ``WandbLogger`` only; without one (``--trainer.logger
false``, CSV) the callbacks do nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..loggers import log_to_wandb, wandb_run
from ..structures import Detections, Target


def box_data(
    boxes: Tensor, labels: Tensor, class_names: list[str], scores: Tensor | None = None
) -> list[dict[str, Any]]:
    """W&B ``box_data`` of ``boxes [D, 4]`` xyxy pixels with ``labels [D]`` and optional ``scores [D]``;
    captions read "<class> <score>"."""
    out = []
    score_list = scores.tolist() if scores is not None else [None] * len(labels)
    for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels.tolist(), score_list):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        box = {"position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2}, "domain": "pixel", "class_id": int(label)}
        box["box_caption"] = name if score is None else f"{name} {score:.2f}"
        if score is not None:
            box["scores"] = {"score": score}
        out.append(box)
    return out


def wandb_image(
    image: Tensor, class_names: list[str], target: Target | None = None, det: Detections | None = None
) -> Any:
    """``wandb.Image`` of ``image [3, H, W]`` (float in 0..1, or uint8) with ``ground_truth`` (target ``boxes``/``labels``)
    and ``predictions`` (det ``boxes``/``labels``/``scores``) box layers, both in the image's pixels."""
    import wandb

    pixels = image.detach() if image.dtype == torch.uint8 else (image.detach().float().clamp(0, 1) * 255).round().byte()
    array = pixels.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    labels = dict(enumerate(class_names))
    boxes = {}
    if target is not None:
        boxes["ground_truth"] = {
            "box_data": box_data(target["boxes"], target["labels"], class_names),
            "class_labels": labels,
        }
    if det is not None:
        data = box_data(det["boxes"], det["labels"], class_names, det["scores"])
        boxes["predictions"] = {"box_data": data, "class_labels": labels}
    caption = f"image {int(target['image_id'])}" if target is not None and "image_id" in target else None
    return wandb.Image(array, boxes=boxes or None, caption=caption)


def class_names_of(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    """The module's ``class_names``, else the datamodule's, else none (labels are shown as numbers)."""
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        names = getattr(owner, "class_names", None)
        if names:
            return list(names)
    return []


class WandbDetectionImages(L.Callback):
    """Images with boxes in W&B, so progress is visible over time.

    - ``val/examples``: after every validation (not the sanity check), the same ``num_images``
      validation images (evenly spaced over the validation set) with ground truth and the
      model's detections (``pl_module.detect``) scoring at least ``min_score``; captions give
      class and score, and W&B's per-layer score slider filters further.
    - ``train/examples``: the first ``train_batches`` training batches of the run, as the model
      sees them after augmentation, ground truth only (at most ``max_train_images`` each).

    Args:
        num_images: validation images shown (0 turns them off).
        train_batches: training batches shown (0 turns them off).
        max_train_images: images per training batch shown.
        min_score: detections below this score are not sent.
    """

    def __init__(
        self, num_images: int = 8, train_batches: int = 2, max_train_images: int = 8, min_score: float = 0.1
    ) -> None:
        if min(num_images, train_batches, max_train_images) < 0 or not 0.0 <= min_score <= 1.0:
            raise ValueError("num_images, train_batches and max_train_images must be >= 0 and min_score in [0, 1]")
        self.num_images, self.train_batches = num_images, train_batches
        self.max_train_images, self.min_score = max_train_images, min_score
        self._val_batch: tuple[Tensor, list[Target]] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Send the first ``train_batches`` augmented batches of the run, ground truth only, as ``train/examples``."""
        if trainer.current_epoch > 0 or batch_idx >= self.train_batches or wandb_run(trainer) is None:
            return
        images, targets = batch
        names = class_names_of(trainer, pl_module)
        shown = [wandb_image(im, names, t) for im, t in zip(images[: self.max_train_images], targets)]
        log_to_wandb(trainer, {"train/examples": shown})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Send the fixed validation images with truth and detections (score >= ``min_score``): ``val/examples``."""
        if trainer.sanity_checking or self.num_images == 0 or wandb_run(trainer) is None:
            return
        batch = self._fixed_batch(trainer)
        if batch is None:
            return
        images, targets = batch
        dets: list[Detections | None] = [None] * len(images)
        detect = getattr(pl_module, "detect", None)
        if detect is None:
            rank_zero_warn(
                f"WandbDetectionImages: {type(pl_module).__name__} has no detect(images); showing ground truth only"
            )
        else:
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                _, found = detect(images.to(pl_module.device))
            pl_module.train(was_training)
            keep = [d["scores"] >= self.min_score for d in found]
            dets = [Detections(boxes=d["boxes"][k].cpu(), scores=d["scores"][k].cpu(), labels=d["labels"][k].cpu())
                    for d, k in zip(found, keep)]  # fmt: skip
        names = class_names_of(trainer, pl_module)
        log_to_wandb(
            trainer, {"val/examples": [wandb_image(im, names, t, d) for im, t, d in zip(images, targets, dets)]}
        )

    def _fixed_batch(self, trainer: L.Trainer) -> tuple[Tensor, list[Target]] | None:
        """The chosen validation images, collated once by the validation loader's own ``collate_fn``
        (None without a validation loader)."""
        if self._val_batch is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            if loader is None:
                return None
            dataset = loader.dataset
            picks = np.unique(np.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().astype(int))
            self._val_batch = loader.collate_fn([dataset[int(i)] for i in picks])
        return self._val_batch


class WandbClassAP(L.Callback):
    """Per-class AP in W&B after every validation and test: the table ``<stage>/map_class_table``
    (columns ``class``, ``ap``) and the bar chart ``<stage>/map_class_chart``, built from the
    ``<stage>/map_class/<name>`` metrics the module logs (stage ``val`` or ``test``). Classes
    with AP −1 (no ground truth and no detection in the split) are left out."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Send the per-class AP table and chart of this validation (not the sanity check)."""
        if not trainer.sanity_checking:
            self._log(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Send the per-class AP table and chart of the test run."""
        self._log(trainer, "test")

    @staticmethod
    def _log(trainer: L.Trainer, stage: str) -> None:
        prefix = f"{stage}/map_class/"
        aps = {k[len(prefix) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        rows = [[name, ap] for name, ap in aps.items() if ap >= 0]
        if not rows or wandb_run(trainer) is None:
            return
        import wandb

        table = wandb.Table(columns=["class", "ap"], data=rows)
        chart = wandb.plot.bar(table, "class", "ap", title=f"{stage} AP per class")
        log_to_wandb(trainer, {f"{stage}/map_class_table": table, f"{stage}/map_class_chart": chart})
