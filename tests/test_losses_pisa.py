"""PISA: ISR-P / ISR-N hierarchical ranks and weights by hand, rescaling, gradients, CARL."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from detector.losses import BCE, CARL, ISR, BoxSet, DarknetBoxLoss, FocalLoss, GIoULoss, SampleInfo, pisa
from detector.losses.pisa import hierarchical_rank, iou_hlr_weights, nms_clusters, score_hlr_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loss_references import isr_p_reference  # noqa: E402


def _info(labels, gt_ids, ious=None, boxes=None, scores=None, image_ids=None, cls_score=None) -> SampleInfo:
    labels, gt_ids = torch.as_tensor(labels), torch.as_tensor(gt_ids)
    n = labels.numel()
    return SampleInfo(
        labels=labels,
        gt_ids=gt_ids,
        ious=torch.zeros(n) if ious is None else torch.as_tensor(ious, dtype=torch.float32),
        boxes=torch.zeros(n, 4) if boxes is None else torch.as_tensor(boxes, dtype=torch.float32),
        scores=torch.zeros(n) if scores is None else torch.as_tensor(scores, dtype=torch.float32),
        image_ids=torch.zeros(n, dtype=torch.long) if image_ids is None else torch.as_tensor(image_ids),
        cls_score=cls_score,
    )


# One class (0) with gt A (id 0: IoUs .9 .5 .7) and gt B (id 1: IoUs .6 .8); class 1 with gt 2 (IoUs .3 .4).
# Local ranks: A .9->0 .7->1 .5->2; B .8->0 .6->1; gt 2: .4->0 .3->1.
# Class 0 hierarchical order: A.9, B.8 (local 0), A.7, B.6 (local 1), A.5 -> ranks [0, 4, 2, 3, 1].
# Class 1: .4 then .3 -> ranks [1, 0]. n_max = 5, u = (5 - r) / 5.
LABELS = [0, 0, 0, 0, 0, 1, 1]
GT_IDS = [0, 0, 0, 1, 1, 2, 2]
IOUS = [0.9, 0.5, 0.7, 0.6, 0.8, 0.3, 0.4]
RANKS = [0, 4, 2, 3, 1, 1, 0]
U = [1.0, 0.2, 0.6, 0.4, 0.8, 0.8, 1.0]


def test_hierarchical_rank_by_hand():
    r = hierarchical_rank(torch.tensor(IOUS), torch.tensor(GT_IDS), torch.tensor(LABELS))
    assert r.tolist() == RANKS


def test_iou_hlr_weights_by_hand():
    w = iou_hlr_weights(torch.tensor(LABELS), torch.tensor(GT_IDS), torch.tensor(IOUS), k=2.0, bias=0.0)
    torch.testing.assert_close(w, torch.tensor(U) ** 2)
    w = iou_hlr_weights(torch.tensor(LABELS), torch.tensor(GT_IDS), torch.tensor(IOUS), k=1.0, bias=0.5)
    torch.testing.assert_close(w, 0.5 + 0.5 * torch.tensor(U))


def test_isr_p_rescaled_weights_by_hand():
    info = _info(LABELS, GT_IDS, IOUS)
    x, y = torch.zeros(7, 1), torch.ones(7, 1)  # every row's BCE is log 2
    out = ISR(BCE(), isr_n=False)(x, y, None, info)
    raw = torch.tensor(U) ** 2  # [1, .04, .36, .16, .64, .64, 1], sum 3.84
    torch.testing.assert_close(out.flatten(), math.log(2) * raw * 7 / 3.84)
    torch.testing.assert_close(out.sum(), torch.tensor(7 * math.log(2)))  # total positive loss kept


def test_isr_keeps_total_positive_loss_and_matches_reference():
    for seed in range(4):
        torch.manual_seed(seed)
        n, c = 300, 6
        gt_ids = torch.randint(0, 40, (n,))
        labels = gt_ids % c  # a ground truth has one class
        neg = torch.rand(n) < 0.3
        labels[neg], gt_ids[neg] = -1, -1
        info = _info(labels, gt_ids, torch.rand(n))
        x, y = torch.randn(n, c), torch.zeros(n, c)
        y[~neg, labels[~neg]] = 1.0
        base = BCE()(x, y)
        out = ISR(BCE(), isr_n=False)(x, y, None, info)
        torch.testing.assert_close(out, isr_p_reference(base, labels, gt_ids, info.ious), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[~neg].sum(), base[~neg].sum())
        torch.testing.assert_close(out[neg], base[neg])
        w = out.sum(1) / base.sum(1)
        torch.testing.assert_close(out, base * w[:, None])  # one weight per row, every class


def test_isr_weights_carry_no_gradient():
    torch.manual_seed(5)
    info = _info(LABELS, GT_IDS, IOUS)
    x = torch.randn(7, 3, requires_grad=True)
    y = torch.nn.functional.one_hot(torch.tensor(LABELS), 3).float()
    isr = ISR(FocalLoss(), isr_n=False)
    isr(x, y, None, info).sum().backward()
    xd = x.detach().requires_grad_()
    base = FocalLoss()(xd, y)
    w = isr.row_weights(base.detach(), None, info)
    (base * w[:, None]).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)
    bce_grad = torch.sigmoid(x.detach()) - y
    x.grad = None
    ISR(BCE(), isr_n=False)(x, y, None, info).sum().backward()
    w = ISR(BCE(), isr_n=False).row_weights(BCE()(x.detach(), y), None, info)
    torch.testing.assert_close(x.grad, w[:, None] * bce_grad)


# ISR-N example: two images. Image 0: b0 (.9) and b1 (.8) overlap (IoU 90/110 > .5), b2 (.7) and b4 (.3)
# overlap; image 1: b3 (.6) has b0's coordinates but another image. b5 scores .04 (below .05), b6 is a positive.
BOXES = [
    [0, 0, 10, 10],
    [1, 0, 11, 10],
    [20, 20, 30, 30],
    [0, 0, 10, 10],
    [21, 20, 31, 30],
    [0, 0, 10, 10],
    [0, 0, 5, 5],
]
SCORES = [0.9, 0.8, 0.7, 0.6, 0.3, 0.04, 0.5]
IMAGES = [0, 0, 0, 1, 0, 0, 0]


def _neg_info() -> SampleInfo:
    boxes = torch.tensor(BOXES, dtype=torch.float32) / 100
    return _info([-1] * 6 + [0], [-1] * 6 + [7], [0.0] * 6 + [0.5], boxes, SCORES, IMAGES)


def test_nms_clusters_by_hand():
    b = torch.tensor(BOXES[:5], dtype=torch.float32) / 100
    clusters = nms_clusters(b, torch.tensor(SCORES[:5]), torch.tensor(IMAGES[:5]), 0.5)
    assert clusters.tolist() == [0, 0, 2, 3, 2]
    # a degenerate (zero-area) box inside b0 heads its own cluster; image ids need not be dense
    b = torch.cat([b, torch.tensor([[0.05, 0.05, 0.05, 0.05]])])
    clusters = nms_clusters(b, torch.tensor(SCORES[:5] + [0.5]), torch.tensor(IMAGES[:5] + [0]) * 7, 0.5)
    assert clusters.tolist() == [0, 0, 2, 3, 2, 5]


def _greedy_clusters(boxes: torch.Tensor, scores: torch.Tensor, images: torch.Tensor, thr: float) -> list[int]:
    """Loop reference (mmcv's nms_match): the best unassigned box heads a cluster and takes its overlaps."""
    cluster = [-1] * len(scores)
    for i in scores.argsort(descending=True).tolist():
        if cluster[i] >= 0:
            continue
        cluster[i] = i
        for j in range(len(scores)):
            overlap = box_iou(boxes[i : i + 1], boxes[j : j + 1]).item()
            if cluster[j] < 0 and images[j] == images[i] and overlap > thr:
                cluster[j] = i
    return cluster


@pytest.mark.parametrize("seed, budget", [(0, None), (1, None), (2, 1000)])
def test_nms_clusters_equal_greedy_loop(seed, budget, monkeypatch):
    if budget is not None:  # many chunks of rows, the last one partial
        monkeypatch.setattr(pisa, "IOU_BUDGET", budget)
    g = torch.Generator().manual_seed(seed)
    ctr, wh = torch.rand(120, 2, generator=g), 0.05 + torch.rand(120, 2, generator=g) * 0.3
    boxes, scores = torch.cat([ctr - wh / 2, ctr + wh / 2], 1), torch.rand(120, generator=g)
    images = torch.randint(0, 4, (120,), generator=g)
    for thr in (0.3, 0.5):
        assert nms_clusters(boxes, scores, images, thr).tolist() == _greedy_clusters(boxes, scores, images, thr)


def test_isr_n_by_hand():
    # local ranks b0 0, b1 1, b2 0, b3 0, b4 1 -> hierarchical: b0 0, b2 1, b3 2, b1 3, b4 4; K = 5
    u = torch.tensor([5, 2, 4, 3, 1], dtype=torch.float32) / 5  # for b0..b4
    torch.testing.assert_close(
        score_hlr_weights(torch.tensor(BOXES[:5]).float() / 100, torch.tensor(SCORES[:5]), torch.tensor(IMAGES[:5])),
        u.sqrt(),
    )
    x, y = torch.zeros(7, 1), torch.cat([torch.zeros(6, 1), torch.ones(1, 1)])  # every BCE = log 2
    out = ISR(BCE(), isr_p=False)(x, y, None, _neg_info()).flatten() / math.log(2)
    expected = torch.cat([u.sqrt() * 5 / u.sqrt().sum(), torch.ones(2)])  # rescaled; b5, b6 keep 1
    torch.testing.assert_close(out, expected)


def test_isr_n_topk_cap():
    # neg_topk = 3: only b0, b1, b2 take part; clusters {b0, b1}, {b2}: ranks b0 0, b2 1, b1 2
    x, y = torch.zeros(7, 1), torch.cat([torch.zeros(6, 1), torch.ones(1, 1)])
    out = ISR(BCE(), isr_p=False, neg_topk=3)(x, y, None, _neg_info()).flatten() / math.log(2)
    w = torch.tensor([1.0, 1 / 3, 2 / 3]).sqrt()
    torch.testing.assert_close(out, torch.cat([w * 3 / w.sum(), torch.ones(4)]))


def test_isr_ignored_rows_take_no_part():
    x, y = torch.zeros(7, 1), torch.cat([torch.zeros(6, 1), torch.ones(1, 1)])
    weight = torch.ones(7, 1)
    weight[1] = 0  # b1 ignored: b0 alone in its cluster; ranks b0 0, b2 1, b3 2, b4 3 (K = 4)
    out = ISR(BCE(), isr_p=False)(x, y, weight, _neg_info()).flatten() / math.log(2)
    w = (torch.tensor([4.0, 3.0, 2.0, 1.0]) / 4).sqrt()
    w = w * 4 / w.sum()
    torch.testing.assert_close(out, torch.tensor([w[0], 0.0, w[1], w[2], w[3], 1.0, 1.0]))


def test_isr_switches():
    info = _info(LABELS + [-1, -1], GT_IDS + [-1, -1], IOUS + [0, 0], torch.rand(9, 4) * 0.5, [0.5] * 9)
    info.boxes[:, 2:] += 0.5
    torch.manual_seed(0)
    x, y = torch.randn(9, 1), torch.cat([torch.ones(7, 1), torch.zeros(2, 1)])
    base = BCE()(x, y)
    torch.testing.assert_close(ISR(BCE(), isr_p=False, isr_n=False)(x, y, None, info), base)
    only_p = ISR(BCE(), isr_n=False)(x, y, None, info)
    only_n = ISR(BCE(), isr_p=False)(x, y, None, info)
    both = ISR(BCE())(x, y, None, info)
    torch.testing.assert_close(only_p[7:], base[7:])
    torch.testing.assert_close(only_n[:7], base[:7])
    assert not torch.allclose(only_p[:7], base[:7]) and not torch.allclose(only_n[7:], base[7:])
    torch.testing.assert_close(both, torch.cat([only_p[:7], only_n[7:]]))


def test_isr_errors():
    with pytest.raises(ValueError, match="SampleInfo"):
        ISR(BCE())(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="rows"):
        ISR(BCE())(torch.zeros(3, 1), torch.zeros(3, 1), None, _info([0, 0], [0, 0]))
    with pytest.raises(ValueError, match="ClassificationLoss"):
        ISR(GIoULoss())
    for bad in ({"k_pos": -1.0}, {"bias_neg": 1.0}, {"neg_topk": 0}, {"nms_iou": 1.5}, {"neg_score_thresh": -0.1}):
        with pytest.raises(ValueError):
            ISR(BCE(), **bad)


def _carl_inputs(s: list[float], weight=None):
    # DarknetBoxLoss(scale="none", xy="squared", wh="squared"), pred.raw = 0, target xy = .5: row loss = tw² + th²
    n = len(s)
    target_raw = torch.tensor([[0.5, 0.5, 1.0, 0.0], [0.5, 0.5, 2.0, 0.0], [0.5, 0.5, 1.0, 1.0]][:n])
    pred = BoxSet(torch.zeros(n, 4), torch.tensor([[0.0, 0.0, 0.5, 0.5]] * n))
    target = BoxSet(target_raw, torch.tensor([[0.0, 0.0, 0.5, 0.5]] * n))
    logit = torch.logit(torch.tensor(s)).requires_grad_()
    info = _info([0] * n, list(range(n)), cls_score=torch.sigmoid(logit))
    return pred, target, info, logit


def test_carl_by_hand_and_gradient():
    # L = [1, 4]; s = [.5, 1 - 1e-6 ~ 1]: v = .2 + .8 s = [.6, 1.0]; P / Σv = 2 / 1.6 = 1.25 -> [.75, 1.25]
    pred, target, info, logit = _carl_inputs([0.5, 1.0 - 1e-6])
    out = CARL(DarknetBoxLoss(scale="none", xy="squared", wh="squared"))(pred, target, None, info)
    torch.testing.assert_close(out, torch.tensor([0.75, 5.0]), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    # through the rescaling: d/ds_i = (P/Σv)(L_i − Σ v L / Σv)(1 − b), Σ v L / Σv = (.6 + 4) / 1.6 = 2.875:
    # 1.25 · .8 · [1 − 2.875, 4 − 2.875] = [−1.875, 1.125]; ds/dlogit = s(1 − s)
    s = torch.sigmoid(logit.detach())
    torch.testing.assert_close(logit.grad, torch.tensor([-1.875, 1.125]) * s * (1 - s), rtol=1e-4, atol=1e-9)
    assert logit.grad[0] < 0 < logit.grad[1]  # the well-localised box's score is pushed up, the other's down


def _carl_mmdetection(score: torch.Tensor, box_loss: torch.Tensor, k: float, bias: float) -> torch.Tensor:
    """mmdetection's ``carl_loss`` (sigmoid scores, avg_factor 1), written as its source reads: the
    weights ``(b + (1 − b)s)^k`` times ``num_pos / weights.sum()``, the sum keeping its gradient."""
    weights = (bias + (1 - bias) * score).pow(k)
    weights = weights * (score.shape[0] / weights.sum())
    return (box_loss * weights).sum()


@pytest.mark.parametrize("k, bias", [(1.0, 0.2), (2.0, 0.1)])
def test_carl_gradient_equals_mmdetection(k, bias):
    torch.manual_seed(1)
    n = 40
    p_xy, t_xy = torch.rand(n, 2, dtype=torch.float64) * 0.4, torch.rand(n, 2, dtype=torch.float64) * 0.4
    p_wh, t_wh = 0.2 + torch.rand(n, 2, dtype=torch.float64) * 0.3, 0.2 + torch.rand(n, 2, dtype=torch.float64) * 0.3
    t_xy = torch.where(torch.rand(n, 1) < 0.5, p_xy + 0.02, t_xy)  # some well-localised, some poor
    xyxy = torch.cat([p_xy, p_xy + p_wh], 1).requires_grad_()
    target = BoxSet(torch.zeros(n, 4, dtype=torch.float64), torch.cat([t_xy, t_xy + t_wh], 1))
    logit = (torch.randn(n, dtype=torch.float64) * 2).requires_grad_()
    info = _info([0] * n, list(range(n)), cls_score=torch.sigmoid(logit))
    pred = BoxSet(torch.zeros(n, 4, dtype=torch.float64), xyxy)
    out = CARL(GIoULoss(), k=k, bias=bias)(pred, target, None, info)
    out.sum().backward()
    logit_ref, xyxy_ref = logit.detach().clone().requires_grad_(), xyxy.detach().clone().requires_grad_()
    box_loss = GIoULoss()(BoxSet(pred.raw, xyxy_ref), target)
    ref = _carl_mmdetection(torch.sigmoid(logit_ref), box_loss, k, bias)
    ref.backward()
    torch.testing.assert_close(out.sum(), ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(logit.grad, logit_ref.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(xyxy.grad, xyxy_ref.grad, rtol=1e-6, atol=0)
    # sign pattern: scores of positives whose box loss is below the v-weighted mean go up (negative
    # gradient), the others down
    loss = box_loss.detach()
    v = (bias + (1 - bias) * torch.sigmoid(logit.detach())).pow(k)
    mean = (v * loss).sum() / v.sum()
    assert torch.equal(logit.grad < 0, loss < mean)
    assert 0 < int((logit.grad < 0).sum()) < n


def test_carl_weights_sum_to_positives_and_skip_ignored_rows():
    pred, target, info, _ = _carl_inputs([0.5, 1.0 - 1e-6, 0.3])
    weight = torch.tensor([1.0, 1.0, 0.0])
    out = CARL(DarknetBoxLoss(scale="none", xy="squared", wh="squared"))(pred, target, weight, info)
    torch.testing.assert_close(out, torch.tensor([0.75, 5.0, 0.0]), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    n = 12
    p_xy = torch.rand(n, 2) * 0.4
    boxes = BoxSet(torch.randn(n, 4), torch.cat([p_xy, p_xy + 0.2 + torch.rand(n, 2) * 0.3], 1))
    t_xy = torch.rand(n, 2) * 0.4
    tboxes = BoxSet(torch.randn(n, 4), torch.cat([t_xy, t_xy + 0.2 + torch.rand(n, 2) * 0.3], 1))
    info = _info([0] * n, list(range(n)), cls_score=torch.rand(n))
    base = GIoULoss()(boxes, tboxes)
    v = CARL(GIoULoss(), k=2.0, bias=0.1)(boxes, tboxes, None, info) / base
    torch.testing.assert_close(v.sum(), torch.tensor(float(n)))
    torch.testing.assert_close(v, (0.1 + 0.9 * info.cls_score) ** 2 * n / ((0.1 + 0.9 * info.cls_score) ** 2).sum())


def test_carl_errors():
    pred, target, info, _ = _carl_inputs([0.5, 0.5])
    with pytest.raises(ValueError, match="cls_score"):
        CARL(GIoULoss())(pred, target, None, None)
    info.cls_score = None
    with pytest.raises(ValueError, match="cls_score"):
        CARL(GIoULoss())(pred, target, None, info)
    with pytest.raises(ValueError, match="BoxLoss"):
        CARL(BCE())
    with pytest.raises(ValueError, match="bias"):
        CARL(GIoULoss(), bias=1.0)
