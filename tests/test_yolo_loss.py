import math

import pytest
import torch

from detector.losses import BCE, BCEObjectness, ClassificationLoss, DarknetBoxLoss
from detector.losses.yolo_loss import YOLOLoss
from detector.models import YOLOv3

ANCHORS = torch.tensor(
    [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]],
    dtype=torch.float32,
)
STRIDES = [8, 16, 32]


class Recorder(BCEObjectness):
    """BCE objectness that keeps the targets and weights it was given."""

    def forward(self, logits, targets, weight=None, info=None):  # noqa: ANN001, ANN201
        self.seen = (targets.detach().clone(), weight.detach().clone())
        return super().forward(logits, targets, weight, info)


def _outputs(batch: int = 1, classes: int = 2) -> list[torch.Tensor]:
    return [torch.zeros(batch, 3, h, h, 5 + classes, requires_grad=True) for h in (40, 20, 10)]


def test_objectness_targets_and_ignore_mask() -> None:
    # A 30x30 box centred at (100, 60) is learnt at row 3492 (scale 0, anchor 2, cell (12, 7)).
    # With zero logits every anchor predicts its own anchor box at its cell centre; the
    # (30, 61)-anchor of scale 1 at cell (6, 3) predicts centre (104, 56), size 30x61:
    # IoU with the ground truth = 26·30 / (900 + 1830 − 780) = 0.4 -> not ignored at 0.5,
    # but ignored at 0.35. The positive itself is never ignored.
    target = [{"boxes": torch.tensor([[85.0, 45.0, 115.0, 75.0]]), "labels": torch.tensor([1])}]
    row_s1 = 3 * 1600 + 0 * 400 + 3 * 20 + 6
    for thresh, ignored in ((0.5, False), (0.35, True)):
        rec = Recorder()
        YOLOLoss(objectness=rec, ignore_thresh=thresh)(_outputs(), target, ANCHORS, STRIDES)
        t, w = rec.seen[0].view(-1), rec.seen[1].view(-1)
        assert t.sum() == 1 and t[3492] == 1
        assert w[3492] == 1
        assert (w[row_s1] == 0) == ignored


def test_closed_form_with_zero_logits() -> None:
    # Zero logits: every BCE element is log 2; one positive with 2 classes; normalize by batch (B = 1).
    # objectness: 6300 anchors, none ignored at 0.99 -> 6300·log 2.  classes: 2·log 2.
    # box (darknet's gradient, 2 − wh): σ(0) = 0.5 against cell offsets (0.375, 0.375): BCE − entropy =
    # log 2 − H(.375) each; tw = th = 0 against log(30/33), log(30/23): ½ squared error; scale 2 − (30/320)².
    target = [{"boxes": torch.tensor([[84.0, 44.0, 114.0, 74.0]]), "labels": torch.tensor([1])}]  # centre (99, 59)
    out = YOLOLoss(ignore_thresh=0.99)(_outputs(), target, ANCHORS, STRIDES)
    assert math.isclose(out["loss_obj"].item(), 6300 * math.log(2), rel_tol=1e-5)
    assert math.isclose(out["loss_cls"].item(), 2 * math.log(2), rel_tol=1e-5)
    kl = math.log(2) + 0.375 * math.log(0.375) + 0.625 * math.log(0.625)
    box = (2 - (30 / 320) ** 2) * (2 * kl + (math.log(30 / 33) ** 2 + math.log(30 / 23) ** 2) / 2)
    assert math.isclose(out["loss_box"].item(), box, rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), 6302 * math.log(2) + box, rel_tol=1e-5)


TWO_IMAGES = [
    {"boxes": torch.tensor([[84.0, 44.0, 114.0, 74.0], [10.0, 10.0, 210.0, 160.0]]), "labels": torch.tensor([0, 1])},
    {"boxes": torch.tensor([[100.0, 100.0, 160.0, 140.0]]), "labels": torch.tensor([1])},
]


@pytest.mark.parametrize(
    "mode,divisors",
    [
        ("batch", (2, 2, 2)),
        ("num_pos", (3, 3, 3)),
        ("num_anchors", (2 * 6300, 2 * 6300, 2 * 6300)),
        ("valid", (2 * 6300, 3 * 2, 3)),  # nothing ignored at 0.99; 3 positives × 2 classes; 3 positives
        ({"objectness": "valid", "classification": "batch", "box": "num_pos"}, (2 * 6300, 2, 3)),
    ],
)
def test_normalisation_modes(mode, divisors) -> None:
    outs = _outputs(batch=2)
    raw = YOLOLoss(normalize="batch", ignore_thresh=0.99)(outs, TWO_IMAGES, ANCHORS, STRIDES)
    got = YOLOLoss(normalize=mode, ignore_thresh=0.99)(outs, TWO_IMAGES, ANCHORS, STRIDES)
    assert got["num_pos"].item() == 3
    for k, divisor in zip(("loss_obj", "loss_cls", "loss_box"), divisors):
        assert math.isclose(got[k].item(), raw[k].item() * 2 / divisor, rel_tol=1e-5)


def test_valid_objectness_normaliser_counts_non_ignored_anchors() -> None:
    # zero logits: the ignore mask at 0.35 drops some anchors; `valid` divides by the rest (GHM-C's tot)
    outs = _outputs(batch=2)
    rec = Recorder()
    out = YOLOLoss(objectness=rec, ignore_thresh=0.35, normalize="valid")(outs, TWO_IMAGES, ANCHORS, STRIDES)
    kept = int(rec.seen[1].sum())
    assert 0 < kept < 2 * 6300
    assert math.isclose(out["loss_obj"].item(), math.log(2), rel_tol=1e-5)  # every kept element is log 2


def test_component_weights() -> None:
    target = [{"boxes": torch.tensor([[84.0, 44.0, 114.0, 74.0]]), "labels": torch.tensor([0])}]
    base = YOLOLoss()(_outputs(), target, ANCHORS, STRIDES)
    w = YOLOLoss(obj_weight=2.0, cls_weight=0.5, box_weight=3.0)(_outputs(), target, ANCHORS, STRIDES)
    expected = 2 * base["loss_obj"] + 0.5 * base["loss_cls"] + 3 * base["loss_box"]
    assert torch.allclose(w["loss"], expected, rtol=1e-6)


def test_image_without_ground_truth_has_finite_loss_and_gradients() -> None:
    model = YOLOv3(num_classes=3, preset="nano")
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = YOLOLoss()(model(torch.rand(2, 3, 64, 64)), targets, model.anchors, model.strides)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss_cls"] == 0 and out["loss_box"] == 0


def test_finite_loss_and_gradient_to_every_parameter() -> None:
    model = YOLOv3(num_classes=3, preset="nano")
    targets = [
        {"boxes": torch.tensor([[4.0, 8.0, 40.0, 30.0], [30.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([1])},
    ]
    out = YOLOLoss()(model(torch.rand(2, 3, 64, 64)), targets, model.anchors, model.strides)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert bad == []


def test_defaults_are_darknet_recipe() -> None:
    loss = YOLOLoss()
    assert isinstance(loss.objectness, BCEObjectness) and isinstance(loss.classification, BCE)
    assert isinstance(loss.box, DarknetBoxLoss) and isinstance(loss.objectness, ClassificationLoss)
    with pytest.raises(ValueError, match="normalize"):
        YOLOLoss(normalize="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize"):
        YOLOLoss(normalize={"objectness": "valid", "box": "batch"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="normalize"):
        YOLOLoss(normalize={"objectness": "valid", "classification": "tot", "box": "batch"})  # type: ignore[dict-item]
