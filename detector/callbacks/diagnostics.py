"""Imbalance diagnostics: where the loss and the gradient come from, per training epoch (opt-in).

The picture of GHM (Li et al., arXiv 1811.05181, Fig. 1; docs/losses.md): for every sigmoid
element the gradient norm ``g = |p − y|`` (p = σ(x); softmax over the classes for
``SoftmaxCrossEntropy``, whose gradient is ``softmax(x) − y``). Easy elements (g small) are
the vast majority, most of them negatives; focal loss and GHM-C shrink their share.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ..loggers import log_to_wandb, wandb_run
from ..losses.classification import SoftmaxCrossEntropy
from ..losses.yolo_loss import LossRecord, YOLOLoss

SPLITS = ("obj_pos", "obj_neg", "cls_pos", "cls_neg")  # element kind x target (y ≥ 0.5 is positive)


class ImbalanceStats:
    """Sums over one epoch, kept in one flat float64 tensor ``state`` (views below) so that DDP
    reduces them with a single collective and nothing leaves the device before the epoch ends.

    Elements: every objectness element with weight > 0 (ignored anchors are left out) and every
    class element of the positives. Each falls in split s (``SPLITS``) and bin
    ``b = min(floor(g·M), M − 1)`` of M equal bins of [0, 1]; it is easy when ``g < easy``.

    counts ``[4, M]``:  elements per split and bin.
    loss ``[4, 2]``:    Σ ``w_c · loss_element / z_c`` per split, (easy, hard): its part of the total loss.
    box ``[1]``:        Σ ``w_box · box_loss / z_box``.
    positives ``[S]``:  positives per scale.  images ``[1]``: images seen.
    per_image ``[K]``:  images holding k positives, k = 0..K−1 (K−1 means K−1 or more).

    Args:
        num_scales: S. bins: M. easy: the easy/hard threshold on g (0.1).
        weights: the YOLO loss's (obj, cls, box) weights. softmax: g from softmax (see module docstring).
        max_positives: K.
    """

    def __init__(
        self,
        num_scales: int,
        bins: int = 20,
        easy: float = 0.1,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        softmax: bool = False,
        max_positives: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        if bins < 1 or max_positives < 1 or not 0.0 < easy <= 1.0:
            raise ValueError(
                f"need bins >= 1, max_positives >= 1 and 0 < easy <= 1; got {bins}, {max_positives}, {easy}"
            )
        self.bins, self.easy, self.weights, self.softmax = bins, easy, weights, softmax
        sizes = [4 * bins, 8, 1, num_scales, 1, max_positives]
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # MPS has no float64
        self.state = torch.zeros(sum(sizes), dtype=dtype, device=device)
        parts = self.state.split(sizes)
        self.counts, self.loss = parts[0].view(4, bins), parts[1].view(4, 2)
        self.box, self.positives, self.images, self.per_image = parts[2:]

    @torch.no_grad()
    def update(self, record: LossRecord) -> None:
        """Add one batch: a ``YOLOLoss.recorder`` record."""
        w_obj, w_cls, w_box = self.weights
        z_obj, z_cls, z_box = record.z.expand(3)  # one normaliser per component (a scalar: the same for all)
        obj_weight = record.obj_weight  # (B, N)
        self._add(0, record.obj_logits.sigmoid(), record.obj_targets, record.obj_loss * (w_obj / z_obj), obj_weight > 0)
        c_logit = record.cls_logits  # (P, C)
        p = c_logit.float().softmax(1) if self.softmax else c_logit.sigmoid()
        self._add(2, p, record.cls_targets, record.cls_loss * (w_cls / z_cls), None)
        self.box += record.box_loss.sum() * (w_box / z_box)
        # positives: the scale of each anchor row (rows are ordered scale, anchor, y, x), and how many each image holds
        rows, n_img = record.anchor_idx, obj_weight.shape[0]
        cells = [h * w for h, w in record.shapes]
        anchors = obj_weight.shape[1] // sum(cells)
        ends = torch.tensor(cells, device=rows.device).cumsum(0) * anchors  # (S,) last row + 1 of each scale
        scale = torch.bucketize(rows, ends, right=True)  # (P,)
        self.positives += torch.bincount(scale, minlength=len(record.shapes))
        per_image = torch.bincount(record.img_idx, minlength=n_img).clamp_(max=len(self.per_image) - 1)
        self.per_image += torch.bincount(per_image, minlength=len(self.per_image))
        self.images += n_img

    def _add(self, first: int, p: Tensor, y: Tensor, loss: Tensor, valid: Tensor | None) -> None:
        """Bin the elements of splits ``first`` (y ≥ 0.5) and ``first + 1`` (y < 0.5); one bincount each."""
        p, y, loss = (t.flatten().to(self.state.dtype) for t in (p, y, loss))
        g = (p - y).abs()
        split = first + (y < 0.5).long()  # (E,)
        bin_ = (g * self.bins).long().clamp_(max=self.bins - 1)
        key = split * self.bins + bin_
        part = split * 2 + (g >= self.easy).long()  # (split, easy | hard)
        if valid is not None:  # invalid elements go to an overflow slot that is dropped
            key = key.masked_fill(~valid.flatten(), 4 * self.bins)
            part = part.masked_fill(~valid.flatten(), 8)
        self.counts += torch.bincount(key, minlength=4 * self.bins + 1)[:-1].view(4, self.bins)
        self.loss += torch.bincount(part, weights=loss, minlength=9)[:-1].view(4, 2)

    def summary(self, strides: list[int]) -> dict[str, float]:
        """Scalars: shares of the total loss (obj + cls + box elements), positives per image.

        ``loss_share/pos + loss_share/neg + loss_share/box = 1`` and ``easy + hard + box = 1``.
        """
        loss = self.loss.tolist()
        total = max(sum(map(sum, loss)) + float(self.box), 1e-30)
        out = {f"loss_share/{name}": sum(loss[k]) / total for k, name in enumerate(SPLITS)}
        out["loss_share/pos"] = out["loss_share/obj_pos"] + out["loss_share/cls_pos"]
        out["loss_share/neg"] = out["loss_share/obj_neg"] + out["loss_share/cls_neg"]
        out["loss_share/easy"] = sum(row[0] for row in loss) / total
        out["loss_share/hard"] = sum(row[1] for row in loss) / total
        out["loss_share/neg_easy"] = (loss[1][0] + loss[3][0]) / total
        out["loss_share/box"] = float(self.box) / total
        images = max(float(self.images), 1.0)
        out["pos_per_image"] = float(self.positives.sum()) / images
        for stride, n in zip(strides, self.positives.tolist()):
            out[f"pos_per_image/stride{stride}"] = n / images
        return out

    def density(self) -> dict[str, np.ndarray]:
        """Fraction of each split's elements per bin, ``[M]`` each (NaN for an empty split)."""
        counts = self.counts.cpu().numpy()
        totals = counts.sum(1, keepdims=True)
        frac = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
        return dict(zip(SPLITS, frac))


class ImbalanceDiagnostics(L.Callback):
    """Opt-in: the imbalance picture of the training loss, once per training epoch.

    While on, it sets ``YOLOLoss.recorder`` around each training batch and sums
    :class:`ImbalanceStats` over the epoch (over all processes in DDP). Off (not in the
    trainer's callbacks), the recorder stays None and nothing is computed.

    Logged at the end of each training epoch, to every logger (``pl_module.log``):
    ``diag/loss_share/{obj_pos,obj_neg,cls_pos,cls_neg,pos,neg,easy,hard,neg_easy,box}`` and
    ``diag/pos_per_image``, ``diag/pos_per_image/stride<s>``. To W&B only: histograms
    ``diag/g/{obj_pos,obj_neg,cls_pos,cls_neg}`` of g over M bins, ``diag/positives_per_image``,
    and the line chart ``diag/g_density`` (log10 of the fraction of each split's elements per bin:
    GHM's Fig. 1).

    Args:
        bins: M equal bins of g in [0, 1].
        easy: elements with g below this are easy (0.1).
        max_positives: the histogram of positives per image stops at this many.
    """

    def __init__(self, bins: int = 20, easy: float = 0.1, max_positives: int = 64) -> None:
        ImbalanceStats(1, bins, easy, max_positives=max_positives)  # checks the arguments now
        self.bins, self.easy, self.max_positives = bins, easy, max_positives
        self.stats: ImbalanceStats | None = None
        self._loss: YOLOLoss | None = None
        self._strides: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the module's ``YOLOLoss``, whose recorder feeds the statistics; ValueError when it has none."""
        self._loss = next((m for m in pl_module.modules() if isinstance(m, YOLOLoss)), None)
        if self._loss is None:
            raise ValueError(
                f"ImbalanceDiagnostics needs a YOLOLoss inside the LightningModule; {type(pl_module).__name__} has none"
            )

    def _record(self, record: LossRecord) -> None:
        if self.stats is None:
            assert self._loss is not None
            softmax = isinstance(self._loss.classification, SoftmaxCrossEntropy)
            device = record.box_loss.device
            self.stats = ImbalanceStats(
                len(record.shapes), self.bins, self.easy, self._loss.weights, softmax, self.max_positives, device
            )
        self._strides = list(record.strides)
        self.stats.update(record)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Drop last epoch's sums; the first recorded batch allocates fresh :class:`ImbalanceStats`."""
        self.stats = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Attach the recorder to the loss so this batch's elements are binned by g."""
        if self._loss is not None:
            self._loss.recorder = self._record

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Detach the recorder: only training batches are recorded."""
        self._detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Detach the recorder so a failed run leaves the loss as it found it."""
        self._detach()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Detach the recorder when the stage ends."""
        self._detach()

    def _detach(self) -> None:
        if self._loss is not None:
            self._loss.recorder = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sum the epoch's statistics over processes and log the ``diag/*`` scalars, plus the W&B histograms."""
        stats = self.stats
        if stats is None:
            return
        stats.state.copy_(trainer.strategy.reduce(stats.state.clone(), reduce_op="sum"))  # every rank's share
        pl_module.log_dict({f"diag/{k}": v for k, v in stats.summary(self._strides).items()})
        if wandb_run(trainer) is not None:
            log_to_wandb(trainer, wandb_media(stats))


def wandb_media(stats: ImbalanceStats) -> dict[str, Any]:
    """W&B histograms ``diag/g/<split>`` and ``diag/positives_per_image`` (images per number of
    positives, the last bin holding ``max_positives − 1`` or more), the log-density chart ``diag/g_density``."""
    import wandb

    edges = np.linspace(0.0, 1.0, stats.bins + 1)
    counts = stats.counts.cpu().numpy()
    media: dict[str, Any] = {
        f"diag/g/{name}": wandb.Histogram(np_histogram=(counts[k], edges)) for k, name in enumerate(SPLITS)
    }
    per_image = stats.per_image.cpu().numpy()
    media["diag/positives_per_image"] = wandb.Histogram(np_histogram=(per_image, np.arange(len(per_image) + 1)))
    centres = (edges[:-1] + edges[1:]) / 2
    xs, ys, keys = [], [], []
    for name, frac in stats.density().items():
        seen = frac > 0  # NaN (empty split) compares False
        if seen.any():
            xs.append(centres[seen].tolist())
            ys.append(np.log10(frac[seen]).tolist())
            keys.append(name)
    if keys:
        title = "log10 fraction of elements per gradient norm g = |p - y|"
        media["diag/g_density"] = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="g")
    return media
