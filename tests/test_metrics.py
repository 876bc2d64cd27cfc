"""mAP through the module's own evaluation path (decode, NMS, un-letterbox, torchmetrics) on
raw outputs built to have known answers."""

import pytest
import torch

from detector.module import DetectorModule
from detector.ops.assign import GroundTruth, assign
from detector.ops.boxes import anchor_grid, encode

SIZE = 128


def _outputs(
    module: DetectorModule, pred_boxes: list[torch.Tensor], labels: list[torch.Tensor], obj: list[float]
) -> list[torch.Tensor]:
    """Raw outputs whose only confident predictions are ``pred_boxes`` (input pixels) with ``labels``,
    objectness logit ``obj[i]`` in image i."""
    model = module.model
    shapes = [(SIZE // s, SIZE // s) for s in model.strides]
    gt = GroundTruth.from_targets(
        [{"boxes": b, "labels": lab} for b, lab in zip(pred_boxes, labels)], torch.device("cpu")
    )
    b, r, g = assign(gt, model.anchors, model.strides, shapes)
    assert len(g) == len(gt.boxes), "test boxes collide on one anchor"
    cells, anchor_wh, steps = anchor_grid(shapes, model.anchors, model.strides)
    c = model.num_classes
    raw = torch.full((len(pred_boxes), len(cells), 5 + c), -12.0)
    t = encode(gt.boxes[g], cells[r], anchor_wh[r], steps[r])
    raw[b, r, :2] = torch.logit(t[:, :2].clamp(1e-5, 1 - 1e-5))
    raw[b, r, 2:4] = t[:, 2:]
    raw[b, r, 4] = torch.tensor(obj)[b]
    raw[b, r, 5 + gt.labels[g]] = 12.0
    sizes = [model.num_anchors * h * w for h, w in shapes]
    return [x.view(len(pred_boxes), model.num_anchors, h, w, -1) for x, (h, w) in zip(raw.split(sizes, 1), shapes)]


def _evaluate(gt_boxes, gt_labels, pred_boxes, pred_labels, letterbox=(0.5, 0.0, 16.0), obj=None) -> dict:
    module = DetectorModule(["a", "b", "c"], preset="nano")
    module.eval()
    outs = _outputs(module, pred_boxes, pred_labels, obj or [12.0] * len(pred_boxes))
    module.model.forward = lambda images: outs  # type: ignore[method-assign]
    targets = [
        {
            "boxes": b,
            "labels": lab,
            "letterbox": torch.tensor(letterbox),
            "orig_size": torch.tensor([192, 256]),
            "image_id": torch.tensor(i),
        }
        for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels))
    ]
    with torch.no_grad():
        module.criterion.forward = lambda *a, **k: {"loss": torch.tensor(0.0)}  # type: ignore[method-assign]
        module.log = lambda *a, **k: None  # type: ignore[method-assign]
        module.validation_step((torch.zeros(len(targets), 3, SIZE, SIZE), targets), 0)
    return module.val_map.compute()


BOXES = [torch.tensor([[10.0, 20.0, 50.0, 60.0], [70.0, 30.0, 120.0, 100.0]]), torch.tensor([[30.0, 40.0, 90.0, 80.0]])]
LABELS = [torch.tensor([0, 1]), torch.tensor([1])]


def test_perfect_predictions_give_one() -> None:
    m = _evaluate(BOXES, LABELS, BOXES, LABELS)
    assert m["map"].item() == pytest.approx(1.0) and m["map_50"].item() == pytest.approx(1.0)
    assert m["mar_100"].item() == pytest.approx(1.0)


def test_known_shift_gives_known_map() -> None:
    # Shift every box left by d = w(1 − q)/(1 + q): IoU = (w − d)/(w + d) = q = 0.62 for all.
    # COCO thresholds 0.50, 0.55, 0.60 match, 0.65 … 0.95 do not: mAP = 3/10, AP50 = 1, AP75 = 0.
    q = 0.62
    shifted = []
    for b in BOXES:
        d = (b[:, 2] - b[:, 0]) * (1 - q) / (1 + q)
        shifted.append(b - torch.stack([d, torch.zeros_like(d), d, torch.zeros_like(d)], 1))
    m = _evaluate(BOXES, LABELS, shifted, LABELS)
    assert m["map_50"].item() == pytest.approx(1.0)
    assert m["map_75"].item() == pytest.approx(0.0)
    assert m["map"].item() == pytest.approx(0.3, abs=1e-6)


def test_missed_class_and_image_without_ground_truth() -> None:
    # Class 0 is never predicted (AP 0), class 1 perfectly (AP 1): mAP = 0.5. A third image has
    # no ground truth and no prediction, which changes nothing.
    gt = [*BOXES, torch.zeros(0, 4)]
    gl = [*LABELS, torch.zeros(0, dtype=torch.long)]
    pb = [BOXES[0][1:], BOXES[1], torch.zeros(0, 4)]
    pl = [LABELS[0][1:], LABELS[1], torch.zeros(0, dtype=torch.long)]
    m = _evaluate(gt, gl, pb, pl)
    assert m["map"].item() == pytest.approx(0.5)
    per_class = dict(zip(m["classes"].tolist(), m["map_per_class"].tolist()))
    assert per_class[0] == pytest.approx(0.0) and per_class[1] == pytest.approx(1.0)


def test_false_positive_on_empty_image_lowers_precision() -> None:
    # Image 1 has no ground truth but a class-1 prediction scored above every true one. Class 1's
    # PR curve: FP (P 0, R 0), then TP (P 1/2, R 1): interpolated precision 1/2 at every recall,
    # AP = 0.5. Class 0 stays at 1: mAP = 0.75, recall 1.
    gt = [BOXES[0], torch.zeros(0, 4)]
    gl = [LABELS[0], torch.zeros(0, dtype=torch.long)]
    m = _evaluate(gt, gl, [BOXES[0], BOXES[1]], [LABELS[0], LABELS[1]], obj=[12.0, 14.0])
    per_class = dict(zip(m["classes"].tolist(), m["map_per_class"].tolist()))
    assert per_class[0] == pytest.approx(1.0) and per_class[1] == pytest.approx(0.5)
    assert m["map"].item() == pytest.approx(0.75) and m["mar_100"].item() == pytest.approx(1.0)
