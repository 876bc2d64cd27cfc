"""COCO mAP that can be gathered from processes holding different numbers of images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities.distributed import gather_all_tensors

# Per-image list states of a bbox MeanAveragePrecision: (shape after the first dim, dtype).
_LIST_STATES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "detection_box": ((4,), torch.float32),
    "detection_scores": ((), torch.float32),
    "detection_labels": ((), torch.int64),
    "groundtruth_box": ((4,), torch.float32),
    "groundtruth_labels": ((), torch.int64),
    "groundtruth_crowds": ((), torch.int64),
    "groundtruth_area": ((), torch.int64),
    "image_ids": ((), torch.int64),  # ours: the dataset's image id, -1 when not given
}


class ShardedMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' ``MeanAveragePrecision`` (bbox) whose distributed sync allows every process to
    hold a different number of images, as an unpadded evaluation sampler gives (ranks differ by one).

    torchmetrics keeps one tensor per image in each state and gathers them one by one, so processes
    with different image counts would issue different numbers of collectives and fail or hang.
    Here each state is concatenated, ``[sum_i n_i, ...]``, with its per-image counts ``[images]``;
    both are gathered (``gather_all_tensors`` takes uneven first dims) and split back into one
    tensor per image: two collectives per state, whatever the counts. Boxes and scores are gathered
    as float32, labels as int64.

    Ground-truth dicts may carry the dataset's ``image_id``; ``compute`` then orders the images by
    it (stable) before evaluating. COCO's matching breaks exact score ties by image order, so this
    makes the result independent of how images were sharded: N processes give the very mAP of one.
    Accepts the arguments of ``MeanAveragePrecision``; ``iou_type`` must be "bbox".
    """

    image_ids: list[torch.Tensor]  # a list state added in __init__, one int64 [1] per image

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tuple(self.iou_type) != ("bbox",):
            raise ValueError(f"ShardedMeanAveragePrecision supports iou_type='bbox' only, got {self.iou_type!r}")
        self.add_state("image_ids", default=[], dist_reduce_fx=None)

    def update(self, preds: list[dict[str, torch.Tensor]], target: list[dict[str, torch.Tensor]]) -> None:
        """As ``MeanAveragePrecision.update``; a target's optional ``image_id`` (int) is kept for ordering."""
        super().update(preds, target)
        for t in target:
            image_id = t.get("image_id", -1)
            self.image_ids.append(torch.as_tensor(image_id, dtype=torch.int64, device=self.device).reshape(1))

    def compute(self) -> dict[str, torch.Tensor]:
        """The mAP dict of ``MeanAveragePrecision``, images first put in ``image_id`` order."""
        if self.image_ids:
            order = torch.cat(self.image_ids).argsort(stable=True).tolist()
            for name in _LIST_STATES:
                setattr(self, name, [getattr(self, name)[i] for i in order])
        return super().compute()

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        gather = dist_sync_fn or gather_all_tensors
        group = process_group or self.process_group
        for name, (tail, dtype) in _LIST_STATES.items():
            items: list[torch.Tensor] = getattr(self, name)
            counts = torch.tensor([len(t) for t in items], dtype=torch.int64, device=self.device)  # (images,)
            flat = torch.cat(items).to(dtype) if items else torch.zeros((0, *tail), dtype=dtype, device=self.device)
            all_counts = torch.cat(gather(counts, group=group))  # (images of every rank,)
            all_flat = torch.cat(gather(flat, group=group))  # (sum of n_i over every rank, *tail)
            setattr(self, name, list(all_flat.split(all_counts.tolist())))
