import math

import torch
from torchvision.ops import batched_nms, box_iou

from detector.ops.assign import GroundTruth, assign
from detector.ops.boxes import anchor_grid, batched_box_iou, decode, encode, unletterbox, wh_iou
from detector.ops.postprocess import postprocess

ANCHORS = torch.tensor(
    [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]],
    dtype=torch.float32,
)
STRIDES = [8, 16, 32]
SHAPES = [(40, 40), (20, 20), (10, 10)]  # a 320 x 320 input


def _gt(*boxes_per_image: list[list[float]]) -> GroundTruth:
    targets = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.arange(len(b))}
        for b in boxes_per_image
    ]
    return GroundTruth.from_targets(targets, torch.device("cpu"))


def test_wh_iou_closed_form() -> None:
    # 30x30 against 33x23: inter 30*23 = 690, union 900 + 759 - 690 = 969.
    assert math.isclose(
        wh_iou(torch.tensor([[30.0, 30.0]]), torch.tensor([[33.0, 23.0]])).item(), 690 / 969, rel_tol=1e-6
    )


def test_batched_box_iou_equals_torchvision() -> None:
    a, b = torch.rand(3, 7, 4) * 50, torch.rand(3, 5, 4) * 50
    a[..., 2:] += a[..., :2]
    b[..., 2:] += b[..., :2]
    ref = torch.stack([box_iou(x, y) for x, y in zip(a, b)])
    assert torch.allclose(batched_box_iou(a, b), ref, atol=1e-6)


def test_assignment_hand_built() -> None:
    # Image 0: a 30x30 box centred at (100, 60): best anchor (33, 23) = scale 0, anchor 2; cell (12, 7).
    #          row = 2·1600 + 7·40 + 12 = 3492.
    # Image 1: a 200x150 box centred at (160, 160): best anchor (156, 198) = scale 2, anchor 1; cell (5, 5).
    #          row = 3·1600 + 3·400 + 1·100 + 5·10 + 5 = 6155.
    gt = _gt([[85, 45, 115, 75]], [[60, 85, 260, 235]])
    b, r, g = assign(gt, ANCHORS, STRIDES, SHAPES)
    assert b.tolist() == [0, 1] and r.tolist() == [3492, 6155] and g.tolist() == [0, 1]


def test_assignment_collision_last_ground_truth_wins() -> None:
    # Two same-size boxes whose centres share cell (12, 7) of scale 0: darknet keeps the later one.
    gt = _gt([[85, 45, 115, 75], [86, 46, 116, 76], [200, 200, 230, 230]])
    b, r, g = assign(gt, ANCHORS, STRIDES, SHAPES)
    assert sorted(zip(r.tolist(), g.tolist())) == [(3492, 1), (2 * 1600 + 26 * 40 + 26, 2)]


def test_assignment_no_ground_truth() -> None:
    gt = _gt([], [])
    b, r, g = assign(gt, ANCHORS, STRIDES, SHAPES)
    assert len(b) == len(r) == len(g) == 0 and gt.padded.shape == (2, 1, 4)


def test_encode_decode_round_trip() -> None:
    cells, anchor_wh, steps = anchor_grid(SHAPES, ANCHORS, STRIDES)
    rows = torch.tensor([3492, 6155, 0, 6299])
    centre = (cells[rows] + torch.tensor([[0.25, 0.5], [0.9, 0.1], [0.5, 0.5], [0.01, 0.99]])) * steps[rows]
    wh = torch.tensor([[30.0, 30.0], [200.0, 150.0], [4.0, 9.0], [300.0, 120.0]])
    boxes = torch.cat((centre - wh / 2, centre + wh / 2), 1)
    t = encode(boxes, cells[rows], anchor_wh[rows], steps[rows])
    assert torch.allclose(t[:, :2], torch.tensor([[0.25, 0.5], [0.9, 0.1], [0.5, 0.5], [0.01, 0.99]]), atol=1e-5)
    raw = torch.cat((torch.logit(t[:, :2]), t[:, 2:]), 1)
    assert torch.allclose(decode(raw, cells[rows], anchor_wh[rows], steps[rows]), boxes, atol=1e-3)


def test_anchor_grid_layout() -> None:
    cells, anchor_wh, steps = anchor_grid(SHAPES, ANCHORS, STRIDES)
    assert cells.shape == (6300, 2) and anchor_wh.shape == (6300, 2) and steps.shape == (6300, 1)
    assert cells[3492].tolist() == [12, 7] and anchor_wh[3492].tolist() == [33, 23] and steps[3492].item() == 8
    assert cells[6155].tolist() == [5, 5] and anchor_wh[6155].tolist() == [156, 198] and steps[6155].item() == 32


def test_unletterbox_inverts_letterbox() -> None:
    orig = torch.tensor([[10.0, 20.0, 200.0, 100.0]])
    scale, pad_x, pad_y = 320 / 480, 0.0, (320 - 240 * 320 / 480) / 2
    boxed = orig * scale + torch.tensor([pad_x, pad_y, pad_x, pad_y])
    back = unletterbox(boxed, torch.tensor([scale, pad_x, pad_y]), torch.tensor([240, 480]))
    assert torch.allclose(back, orig, atol=1e-4)


def test_postprocess_matches_per_image_nms_reference() -> None:
    torch.manual_seed(1)
    outs = [torch.randn(2, 3, h, w, 5 + 4) for h, w in SHAPES]
    dets = postprocess(outs, ANCHORS, STRIDES, conf_thresh=0.3, iou_thresh=0.5, max_det=50)
    cells, anchor_wh, steps = anchor_grid(SHAPES, ANCHORS, STRIDES)
    for i, det in enumerate(dets):
        raw = torch.cat([o[i].reshape(-1, 9) for o in outs])
        boxes = decode(raw, cells, anchor_wh, steps)
        scores = raw[:, 4:5].sigmoid() * raw[:, 5:].sigmoid()
        rows, labels = (scores > 0.3).nonzero(as_tuple=True)
        keep = batched_nms(boxes[rows], scores[rows, labels], labels, 0.5)[:50]
        assert torch.allclose(det["scores"], scores[rows, labels][keep])
        assert torch.equal(det["labels"], labels[keep])
        assert torch.allclose(det["boxes"], boxes[rows][keep])
        assert len(det["scores"]) == 50  # random logits leave many candidates: capped at max_det


def test_assignment_with_iou_thresh_adds_every_anchor_above_it() -> None:
    # Shape IoUs of a 30x30 box with the COCO anchors: (16,30) .533, (33,23) .712, (30,61) .49,
    # (62,45) .323, the rest below .15. At 0.3: anchors 1, 2 of scale 0 at cell (12, 7) and
    # anchors 0, 1 of scale 1 at cell (6, 3).
    gt = _gt([[85, 45, 115, 75]])
    b, r, g = assign(gt, ANCHORS, STRIDES, SHAPES, iou_thresh=0.3)
    assert sorted(r.tolist()) == [1600 + 7 * 40 + 12, 3492, 4800 + 3 * 20 + 6, 4800 + 400 + 3 * 20 + 6]
    assert g.tolist() == [0, 0, 0, 0] and b.tolist() == [0, 0, 0, 0]
    b, r, g = assign(gt, ANCHORS, STRIDES, SHAPES, iou_thresh=0.9)  # only the best survives
    assert r.tolist() == [3492]
