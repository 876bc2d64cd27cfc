"""Imbalance diagnostics: hand-made counts and loss shares, the YOLOLoss hook, and a short fit."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from detector.callbacks import ImbalanceDiagnostics, ImbalanceStats
from detector.losses import YOLOLoss
from detector.losses.yolo_loss import LossRecord
from detector.models import YOLOv3
from detector.module import DetectorModule


def _record(
    obj: tuple, cls: tuple, box: torch.Tensor, images: torch.Tensor, rows: torch.Tensor, **rest: object
) -> LossRecord:
    """A ``LossRecord`` from the tuples a test writes by hand: obj = (logits, targets, weight, loss), cls = (logits, targets, loss)."""
    return LossRecord(*obj, *cls, box, images, rows, rest["shapes"], rest["strides"], rest["z"])  # type: ignore[arg-type]


def _logit(p: list[float]) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return (p / (1 - p)).log()


def _hand_made() -> dict:
    """One image, 2 scales of one cell with A = 2 anchors: rows 0-1 scale 0, rows 2-3 scale 1."""
    obj = (
        _logit([0.95, 0.32, 0.02, 0.5])[None],  # g = 0.05 (pos), 0.32, 0.02, ignored
        torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        torch.tensor([[0.2, 0.4, 0.1, 5.0]]),
    )
    cls = (_logit([0.78, 0.62, 0.05])[None], torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.3, 0.9, 0.05]]))
    positives = {"box": torch.tensor([0.6]), "images": torch.tensor([0]), "rows": torch.tensor([0])}
    return {"obj": obj, "cls": cls, **positives, "shapes": [(1, 1), (1, 1)], "strides": [8, 16], "z": torch.tensor(2.0)}


def test_counts_and_shares_on_a_hand_made_batch() -> None:
    stats = ImbalanceStats(num_scales=2, bins=10, easy=0.1, max_positives=4)
    stats.update(_record(**_hand_made()))
    expected = torch.zeros(4, 10, dtype=torch.float64)
    expected[0, 0] = 1  # obj_pos: g = 0.05
    expected[1, 3] = expected[1, 0] = 1  # obj_neg: g = 0.32, 0.02 (the ignored anchor is left out)
    expected[2, 2] = 1  # cls_pos: g = 0.22
    expected[3, 6] = expected[3, 0] = 1  # cls_neg: g = 0.62, 0.05
    assert torch.equal(stats.counts, expected)
    # element loss / z (z = 2): obj pos easy .1, neg hard .2, neg easy .05; cls pos hard .15, neg hard .45,
    # neg easy .025; box .3; total 1.275
    loss = torch.tensor([[0.1, 0.0], [0.05, 0.2], [0.0, 0.15], [0.025, 0.45]], dtype=torch.float64)
    torch.testing.assert_close(stats.loss, loss)
    s = stats.summary([8, 16])
    total = 1.275
    want = {"obj_pos": 0.1, "obj_neg": 0.25, "cls_pos": 0.15, "cls_neg": 0.475, "box": 0.3, "pos": 0.25,
            "neg": 0.725, "easy": 0.175, "hard": 0.8, "neg_easy": 0.075}  # fmt: skip
    for key, value in want.items():
        assert s[f"loss_share/{key}"] == pytest.approx(value / total)
    assert s["pos_per_image"] == 1.0 and s["pos_per_image/stride8"] == 1.0 and s["pos_per_image/stride16"] == 0.0


def test_weights_positives_per_scale_and_per_image_histogram() -> None:
    stats = ImbalanceStats(num_scales=2, bins=10, easy=0.1, weights=(2.0, 1.0, 0.5), max_positives=2)
    batch = _hand_made()
    stats.update(_record(**batch))
    # a second batch of two images: positives at rows 0 (scale 0), 3 and 2 (scale 1); image 0 holds two
    obj = tuple(torch.cat([t, t]) for t in batch["obj"])
    cls, box = tuple(torch.cat([t] * 3) for t in batch["cls"]), torch.cat([batch["box"]] * 3)
    stats.update(
        _record(
            **{
                **batch,
                "obj": obj,
                "cls": cls,
                "box": box,
                "images": torch.tensor([0, 0, 1]),
                "rows": torch.tensor([0, 3, 2]),
            }
        )
    )
    assert stats.positives.tolist() == [2.0, 2.0]
    assert stats.images.item() == 3.0
    assert stats.per_image.tolist() == [0.0, 3.0]  # 1, 2 (capped at max_positives - 1 = 1), 1 positives
    assert stats.counts[0].sum() == 3 and stats.counts[1].sum() == 6  # obj elements of the three images
    assert stats.counts[2].sum() == 4 and stats.counts[3].sum() == 8  # class elements of the four positives
    # the weights scale each component's part: obj pos easy 3 images x 0.2 x 2 / 2
    assert stats.loss[0, 0].item() == pytest.approx(0.6)
    assert stats.box.item() == pytest.approx(4 * 0.6 * 0.5 / 2)


def test_softmax_gradient_norm() -> None:
    stats = ImbalanceStats(num_scales=1, bins=4, easy=0.15, softmax=True)
    logits = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])  # softmax = 0.6, 0.3, 0.1
    batch = _hand_made()
    stats.update(
        _record(**{**batch, "cls": (logits, torch.tensor([[1.0, 0.0, 0.0]]), torch.ones(1, 3)), "shapes": [(2, 1)]})
    )
    assert stats.counts[2].tolist() == [0, 1, 0, 0]  # g = 0.4
    assert stats.counts[3].tolist() == [1, 1, 0, 0]  # g = 0.3, 0.1
    assert stats.loss[3].tolist() == pytest.approx([0.5, 0.5])  # 0.1 is easy (< 0.15), 0.3 hard


def _batch(seed: int, size: int = 64) -> tuple[torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(2):
        wh = torch.rand(3, 2, generator=g) * 24 + 6
        xy = torch.rand(3, 2, generator=g) * (size - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (3,), generator=g)})
    return torch.rand(2, 3, size, size, generator=g), targets


def test_hook_hands_the_elements_that_make_the_loss() -> None:
    model, loss = YOLOv3(3, "nano"), YOLOLoss(normalize="num_pos", obj_weight=2.0)
    images, targets = _batch(0)
    outputs = model(images)
    plain = loss(outputs, targets, model.anchors, model.strides)
    seen: list[LossRecord] = []
    loss.recorder = seen.append
    out = loss(outputs, targets, model.anchors, model.strides)
    assert torch.equal(out["loss"], plain["loss"]) and len(seen) == 1
    rec = seen[0]
    z = rec.z  # (objectness, classification, box)
    torch.testing.assert_close(2.0 * rec.obj_loss.sum() / z[0], out["loss_obj"])
    torch.testing.assert_close(rec.cls_loss.sum() / z[1], out["loss_cls"])
    torch.testing.assert_close(rec.box_loss.sum() / z[2], out["loss_box"])
    assert len(rec.anchor_idx) == len(rec.img_idx) == int(out["num_pos"]) and not rec.obj_logits.requires_grad
    assert rec.obj_loss.shape == rec.obj_weight.shape == rec.obj_logits.shape  # (B, N)


class _Batches(L.LightningDataModule):
    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def test_callback_logs_shares_that_match_the_logged_loss(tmp_path: Path) -> None:
    batches = [_batch(i) for i in range(3)]
    module = DetectorModule(["a", "b", "c"], "nano", loss=YOLOLoss(normalize="batch"))
    cb = ImbalanceDiagnostics(bins=10)
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[cb], log_every_n_steps=1, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, _Batches(batches))
    assert module.criterion.recorder is None
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    steps = [r for r in rows if "train/loss" in r]
    (diag,) = [r for r in rows if "diag/loss_share/pos" in r]
    assert len(steps) == 3
    total = sum(r["train/loss"] for r in steps)
    obj_share = sum(r["train/loss_obj"] for r in steps) / total
    box_share = sum(r["train/loss_box"] for r in steps) / total
    assert diag["diag/loss_share/obj_pos"] + diag["diag/loss_share/obj_neg"] == pytest.approx(obj_share, rel=1e-5)
    assert diag["diag/loss_share/box"] == pytest.approx(box_share, rel=1e-5)
    assert diag["diag/loss_share/pos"] + diag["diag/loss_share/neg"] + diag["diag/loss_share/box"] == pytest.approx(1.0)
    assert diag["diag/loss_share/easy"] + diag["diag/loss_share/hard"] + diag["diag/loss_share/box"] == pytest.approx(
        1.0
    )
    # positives do not depend on the weights (darknet's assignment is by box shape): count them directly
    crit = YOLOLoss()
    n_pos = sum(
        float(crit(module.model(im), t, module.model.anchors, module.model.strides)["num_pos"]) for im, t in batches
    )
    assert diag["diag/pos_per_image"] == pytest.approx(n_pos / 6)
    per_scale = sum(diag[f"diag/pos_per_image/stride{s}"] for s in module.model.strides)
    assert per_scale == pytest.approx(diag["diag/pos_per_image"])
