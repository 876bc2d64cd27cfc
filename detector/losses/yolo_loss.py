"""The YOLOv3 loss: assignment, ignore mask and reduction around three pluggable losses.

Darknet's recipe (``yolo_layer.c``): each ground truth is learnt by its best anchor over all
scales; objectness is learnt everywhere except at negatives whose decoded box overlaps a ground
truth by more than ``ignore_thresh``; classes and boxes only at positives. The pluggable parts
are elementwise and unreduced; this module owns the sum and its normaliser, so every variant is
compared under the same reduction.

Reduction: each component c is ``weight_c · Σ elements_c / Z_c``. ``normalize`` names ``Z``, one
mode for all three components or one per component:

- ``batch``: the number of images (darknet, whose update divides the summed delta by the batch;
  Ultralytics);
- ``num_pos``: the number of positives (RetinaNet, arXiv 1708.02002);
- ``num_anchors``: images × anchors per image (a plain mean over anchors);
- ``valid``: the number of elements of that component that take part: non-ignored anchors for
  objectness, positives × classes for classification, positives for the box. This is GHM-C's
  ``tot`` (arXiv 1811.05181: ``Σ w·BCE / tot``).

Under DDP each count is summed over processes and divided by the world size, so a process's loss
is ``Σ_local / (Z_global / W)``: the mean of the W losses is ``Σ_all / Z_global`` and DDP's average
of the gradients equals the gradient of one process holding the whole batch, however unevenly
images and positives are spread over the processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..ops.assign import GroundTruth, assign
from ..ops.boxes import anchor_grid, batched_box_iou, decode, detection_scores, encode, flatten_outputs
from ..structures import Target
from .base import BoxLoss, BoxSet, ClassificationLoss, SampleInfo
from .box import DarknetBoxLoss
from .classification import BCE
from .gather import gather_logits
from .objectness import BCEObjectness

Normalize = Literal["num_pos", "batch", "num_anchors", "valid"]
MODES = ("num_pos", "batch", "num_anchors", "valid")
COMPONENTS = ("objectness", "classification", "box")


def _normalize_modes(normalize: Normalize | dict[str, Normalize]) -> tuple[str, str, str]:
    """``normalize`` -> the modes of (objectness, classification, box); ValueError on a bad name."""
    if isinstance(normalize, str):
        modes = {c: normalize for c in COMPONENTS}
    else:
        modes = dict(normalize)
        unknown = set(modes) - set(COMPONENTS)
        if unknown or len(modes) != len(COMPONENTS):
            raise ValueError(f"normalize as a mapping needs exactly the keys {COMPONENTS}, got {sorted(modes)}")
    for c, mode in modes.items():
        if mode not in MODES:
            raise ValueError(f"normalize must be one of {MODES} (for {c}), got {mode!r}")
    return modes["objectness"], modes["classification"], modes["box"]


@dataclass
class LossRecord:
    """One ``YOLOLoss.forward``'s elements, detached, for diagnostics (``YOLOLoss.recorder``).

    N anchors per image over all scales (rows ordered scale, anchor, y, x), P positives, C classes.

    obj_logits, obj_targets, obj_weight, obj_loss: ``[B, N]`` objectness logit, target (0/1),
        weight (0 at ignored anchors) and unreduced loss of every anchor
    cls_logits, cls_targets, cls_loss: ``[P, C]`` class logits, one-hot targets, unreduced loss of the positives
    box_loss:  ``[P]`` unreduced box loss of the positives
    img_idx, anchor_idx: ``[P]`` image and anchor row of each positive
    shapes, strides: ``(H_s, W_s)`` and stride per scale
    z: ``[3]`` the normalisers of (objectness, classification, box)
    """

    obj_logits: Tensor
    obj_targets: Tensor
    obj_weight: Tensor
    obj_loss: Tensor
    cls_logits: Tensor
    cls_targets: Tensor
    cls_loss: Tensor
    box_loss: Tensor
    img_idx: Tensor
    anchor_idx: Tensor
    shapes: list[tuple[int, int]]
    strides: list[int]
    z: Tensor


class YOLOLoss(nn.Module):
    """YOLOv3 loss with pluggable objectness, classification and box terms.

    Args:
        objectness: elementwise loss on the objectness logit of every anchor (C = 1);
            ``BCEObjectness`` (the paper) when None.
        classification: elementwise loss on the class logits ``[P, C]`` of the positives; ``BCE`` when None.
        box: box loss on the positives; ``DarknetBoxLoss(scale="2-wh")`` when None.
        ignore_thresh: negatives whose decoded box has IoU above this with any ground truth
            get no objectness loss (0.5 in darknet's default, 0.7 in yolov3.cfg).
        assign_thresh: None for darknet's single best anchor per ground truth; a value makes
            every anchor whose shape IoU exceeds it a positive too (AlexeyAB's ``iou_thresh``,
            0.213 in yolov4.cfg): more positives per object, a different imbalance.
        normalize: the divisor Z, one of ``num_pos``, ``batch``, ``num_anchors``, ``valid`` for every
            component, or a mapping ``{objectness: …, classification: …, box: …}`` (see the module docstring).
        obj_weight, cls_weight, box_weight: component weights.

    ``forward(outputs, targets, anchors, strides)``: ``outputs`` per scale
    ``[B, A, H_s, W_s, 5 + C]`` raw; ``targets`` one dict per image (``boxes [N, 4]`` xyxy input
    pixels, ``labels [N]``); ``anchors [S, A, 2]`` pixels; ``strides`` per scale. Returns a dict
    of scalars ``loss`` (the total, for backward), ``loss_obj``, ``loss_cls``, ``loss_box`` and
    ``num_pos`` (this process's positives, detached).

    ``recorder``: None (the default, no cost) or a callable that each ``forward`` hands a
    :class:`LossRecord` of the detached elementwise tensors (``detector.callbacks.ImbalanceDiagnostics``
    sets it); a component's share of ``loss`` is ``weight · Σ elements / z[component]``.
    """

    recorder: Callable[[LossRecord], None] | None = None  # a plain attribute: no state, nothing checkpointed

    def __init__(
        self,
        objectness: ClassificationLoss | None = None,
        classification: ClassificationLoss | None = None,
        box: BoxLoss | None = None,
        ignore_thresh: float = 0.5,
        assign_thresh: float | None = None,
        normalize: Normalize | dict[str, Normalize] = "batch",
        obj_weight: float = 1.0,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.modes = _normalize_modes(normalize)
        if not 0.0 < ignore_thresh <= 1.0:
            raise ValueError(f"ignore_thresh must be in (0, 1], got {ignore_thresh}")
        self.objectness = objectness if objectness is not None else BCEObjectness()
        self.classification = classification if classification is not None else BCE()
        self.box = box if box is not None else DarknetBoxLoss()
        if assign_thresh is not None and not 0.0 < assign_thresh < 1.0:
            raise ValueError(f"assign_thresh must be in (0, 1) or null, got {assign_thresh}")
        self.ignore_thresh = ignore_thresh
        self.assign_thresh = assign_thresh
        self.normalize = normalize
        self.weights = (obj_weight, cls_weight, box_weight)

    def forward(
        self, outputs: list[Tensor], targets: list[Target], anchors: Tensor, strides: list[int]
    ) -> dict[str, Tensor]:
        """Outputs (per scale ``[B, A, H, W, 5 + C]``), targets -> scalar ``loss`` and its three parts ``loss_*``."""
        shapes = [(o.shape[2], o.shape[3]) for o in outputs]
        n_img, n_cls = outputs[0].shape[0], outputs[0].shape[-1] - 5
        gt = GroundTruth.from_targets(targets, outputs[0].device)
        # positive p: anchor row anchor_idx[p] of image img_idx[p] learns ground truth gt_idx[p]
        img_idx, anchor_idx, gt_idx = assign(gt, anchors, strides, shapes, self.assign_thresh)  # (P,) each
        # box and objectness logits of every anchor, class logits of the positives only
        box_obj, cls_logits = gather_logits(outputs, anchor_idx, img_idx)  # (B, N, 5), (P, C)
        n_rows = box_obj.shape[1]
        cells, anchor_wh, steps = anchor_grid(shapes, anchors, strides)
        boxes = decode(box_obj, cells, anchor_wh, steps)  # (B, N, 4) pixels
        in_size = boxes.new_tensor([shapes[0][1] * strides[0], shapes[0][0] * strides[0]]).repeat(2)

        with torch.no_grad():
            max_iou = batched_box_iou(boxes.detach(), gt.padded).amax(-1)  # (B, N)
            obj_weight = (max_iou <= self.ignore_thresh).to(box_obj.dtype)  # 0: ignored negative
            obj_weight[img_idx, anchor_idx] = 1.0
            obj_target = torch.zeros_like(obj_weight)
            obj_target[img_idx, anchor_idx] = 1.0

        gt_boxes = gt.boxes[gt_idx]  # (P, 4) pixels
        pred = BoxSet(box_obj[img_idx, anchor_idx, :4], boxes[img_idx, anchor_idx] / in_size)
        target = BoxSet(
            encode(gt_boxes, cells[anchor_idx], anchor_wh[anchor_idx], steps[anchor_idx]), gt_boxes / in_size
        )
        cls_target = F.one_hot(gt.labels[gt_idx], n_cls).to(box_obj.dtype)  # (P, C)

        needs_pos = self.classification.needs_info or self.box.needs_info or self.objectness.needs_info
        pos_info = None
        if needs_pos:
            pos_info = self._positive_info(box_obj, cls_logits, img_idx, anchor_idx, gt_idx, gt, pred, target)
        obj_info = None  # objectness.needs_info implies needs_pos, so pos_info is set then
        if self.objectness.needs_info and pos_info is not None:
            obj_info = self._anchor_info(outputs, boxes / in_size, img_idx, anchor_idx, pos_info)
        obj_logits = box_obj[..., 4]  # (B, N)
        obj_loss = self.objectness(obj_logits.reshape(-1, 1), obj_target.view(-1, 1), obj_weight.view(-1, 1), obj_info)
        cls_loss = self.classification(cls_logits, cls_target, None, pos_info)  # (P, C)
        box_loss = self.box(pred, target, None, pos_info)  # (P,)

        z = self._normaliser(len(img_idx), n_img, n_rows, n_cls, obj_weight)  # (3,)
        if self.recorder is not None:  # opt-in diagnostics
            self.recorder(LossRecord(
                obj_logits.detach(), obj_target, obj_weight, obj_loss.detach().view_as(obj_weight),
                cls_logits.detach(), cls_target, cls_loss.detach(), box_loss.detach(),
                img_idx, anchor_idx, shapes, list(strides), z,
            ))  # fmt: skip
        sums = (obj_loss.sum(), cls_loss.sum(), box_loss.sum())
        parts = [w * total / zc for w, total, zc in zip(self.weights, sums, z)]
        return {
            "loss": parts[0] + parts[1] + parts[2],
            "loss_obj": parts[0].detach(),
            "loss_cls": parts[1].detach(),
            "loss_box": parts[2].detach(),
            "num_pos": torch.tensor(float(len(img_idx)), device=box_obj.device),
        }

    def _normaliser(self, n_pos: int, n_img: int, n_rows: int, n_cls: int, obj_weight: Tensor) -> Tensor:
        """``Z [3]`` of (objectness, classification, box): counts summed over processes (one collective),
        at least 1, divided by the world size (see the module docstring)."""
        per_mode = {"num_pos": n_pos, "batch": n_img, "num_anchors": n_img * n_rows}
        valid = ((obj_weight > 0).sum() if self.modes[0] == "valid" else 0, n_pos * n_cls, n_pos)  # GHM-C's tot
        chosen = [valid[k] if mode == "valid" else per_mode[mode] for k, mode in enumerate(self.modes)]
        counts = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=obj_weight.device) for c in chosen])
        return dist.all_reduce_sum(counts).clamp(min=1.0) / dist.world_size()

    @staticmethod
    def _positive_info(
        box_obj: Tensor,
        cls_logits: Tensor,
        img_idx: Tensor,
        anchor_idx: Tensor,
        gt_idx: Tensor,
        gt: GroundTruth,
        pred: BoxSet,
        target: BoxSet,
    ) -> SampleInfo:
        """SampleInfo of the positives (class and box rows); ids offset by the process rank so that
        they stay unique across DDP."""
        offset = dist.rank() << 32
        labels = gt.labels[gt_idx]
        with torch.no_grad():
            ious = batched_box_iou(pred.xyxy.detach()[:, None], target.xyxy[:, None]).view(-1)
            logits = torch.cat([box_obj[img_idx, anchor_idx], cls_logits], dim=1)  # (P, 5 + C)
            scores = detection_scores(logits).amax(-1)
        cls_score = cls_logits.sigmoid().gather(1, labels[:, None]).squeeze(1)
        return SampleInfo(labels, gt_idx + offset, ious, pred.xyxy.detach(), scores, img_idx + offset, cls_score)

    @staticmethod
    def _anchor_info(
        outputs: list[Tensor], boxes: Tensor, img_idx: Tensor, anchor_idx: Tensor, pos: SampleInfo
    ) -> SampleInfo:
        """SampleInfo of every anchor (the objectness rows), the positives' fields scattered in."""
        n_img, n_rows = boxes.shape[:2]
        flat = img_idx * n_rows + anchor_idx
        with torch.no_grad():
            raw = flatten_outputs([o.detach() for o in outputs])  # (B, N, 5 + C)
            labels = torch.full((n_img * n_rows,), -1, dtype=torch.long, device=raw.device)
            gt_ids, ious = labels.clone(), raw.new_zeros(n_img * n_rows)
            labels[flat], gt_ids[flat], ious[flat] = pos.labels, pos.gt_ids, pos.ious
            scores = detection_scores(raw).amax(-1).reshape(-1)
            image_ids = torch.arange(n_img, device=raw.device).repeat_interleave(n_rows) + (dist.rank() << 32)
        return SampleInfo(labels, gt_ids, ious, boxes.detach().reshape(-1, 4), scores, image_ids)
