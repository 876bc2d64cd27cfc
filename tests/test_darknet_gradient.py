"""The darknet recipe trains with darknet's gradient, recomputed with plain loops from ``yolo_layer.c``.

``forward_yolo_layer`` writes ``delta = target − output`` into every output channel and
``backward_yolo_layer`` adds it to the network's gradient as it is; the weight update divides by the
batch, so the gradient of the loss is ``−delta / B``. The reference below follows the C code's loops
(pjreddie/darknet ``src/yolo_layer.c``): for every anchor of every cell, objectness ``0 − σ(o)``,
zeroed when the decoded box has IoU > ignore_thresh with a truth of the image; for every truth, the
best of all anchors by centred shape IoU, and if it belongs to this layer's mask, box deltas
``scale·(t* − σ(t))`` (x, y) and ``scale·(t* − t)`` (w, h) with ``scale = 2 − w·h``, objectness
``1 − σ(o)`` and classes ``[c == class] − σ(c)``. Boxes are in units of the network input.
"""

import math
from pathlib import Path

import pytest
import torch

from detector.losses import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96
STRIDES = [8, 16, 32]
ANCHORS = [(3, 4), (4, 7), (8, 5), (7, 14), (14, 10), (14, 28), (27, 21), (36, 46), (86, 75)]
MASKS = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
CLASSES = 4
# (cx, cy, w, h) pixels and class; every box's best anchor and cell differ (no two truths on one anchor)
TRUTHS = [
    [((20.5, 30.25), (8, 5), 1), ((50.0, 40.0), (14, 10), 0), ((60.0, 50.0), (36, 46), 3)],
    [((70.25, 20.5), (4, 7), 2), ((48.0, 48.0), (86, 75), 1), ((30.0, 70.0), (14, 28), 0)],
]
# (image, scale, anchor, truth index, f): that anchor, at the truth's cell, decodes the truth scaled by f
# (same centre), IoU 1/f²: 0.83 and 0.91 (ignored at 0.5 and 0.7), 0.64 (ignored at 0.5 only).
LOOKALIKES = [(0, 0, 0, 0, 1.1), (0, 1, 0, 1, 1.1), (0, 2, 0, 2, 1.25), (1, 2, 0, 1, 1.05)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _overlap(x1: float, w1: float, x2: float, w2: float) -> float:
    return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)


def _box_iou(a: tuple, b: tuple) -> float:
    """darknet's box_iou on (x, y, w, h) centre boxes."""
    w, h = _overlap(a[0], a[2], b[0], b[2]), _overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if w < 0 or h < 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def darknet_delta(outputs: list[torch.Tensor], ignore_thresh: float) -> tuple[list, list]:
    """``delta`` per scale as nested lists ``[B][A][H][W][5 + C]``, and the objectness weight (1 = trained)."""
    deltas, obj_trained = [], []
    for s, out in enumerate(outputs):
        x = out.tolist()
        n_b, n_a, lh, lw = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
        delta = [[[[[0.0] * (5 + CLASSES) for _ in range(lw)] for _ in range(lh)] for _ in range(n_a)] for _ in x]
        trained = [[[[1.0] * lw for _ in range(lh)] for _ in range(n_a)] for _ in x]
        for b in range(n_b):
            truths = [(cx / SIZE, cy / SIZE, w / SIZE, h / SIZE, c) for (cx, cy), (w, h), c in TRUTHS[b]]
            for j in range(lh):
                for i in range(lw):
                    for n in range(n_a):
                        tx, ty, tw, th, to = x[b][n][j][i][:5]
                        aw, ah = ANCHORS[MASKS[s][n]]
                        pred = ((i + _sigmoid(tx)) / lw, (j + _sigmoid(ty)) / lh, math.exp(tw) * aw / SIZE,
                                math.exp(th) * ah / SIZE)  # fmt: skip
                        best_iou = max(_box_iou(pred, t[:4]) for t in truths)
                        delta[b][n][j][i][4] = 0 - _sigmoid(to)
                        if best_iou > ignore_thresh:
                            delta[b][n][j][i][4] = 0.0
                            trained[b][n][j][i] = 0.0
            for tx_, ty_, tw_, th_, cls in truths:
                i, j = int(tx_ * lw), int(ty_ * lh)
                best_iou, best_n = 0.0, 0
                for k, (aw, ah) in enumerate(ANCHORS):
                    iou = _box_iou((0, 0, aw / SIZE, ah / SIZE), (0, 0, tw_, th_))
                    if iou > best_iou:
                        best_iou, best_n = iou, k
                if best_n not in MASKS[s]:
                    continue
                n = MASKS[s].index(best_n)
                o, d = x[b][n][j][i], delta[b][n][j][i]
                scale = 2 - tw_ * th_
                aw, ah = ANCHORS[best_n]
                d[0] = scale * (tx_ * lw - i - _sigmoid(o[0]))
                d[1] = scale * (ty_ * lh - j - _sigmoid(o[1]))
                d[2] = scale * (math.log(tw_ * SIZE / aw) - o[2])
                d[3] = scale * (math.log(th_ * SIZE / ah) - o[3])
                d[4] = 1 - _sigmoid(o[4])
                trained[b][n][j][i] = 1.0
                if d[5]:  # delta_yolo_class: a second truth on the same anchor only sets its own class
                    d[5 + cls] = 1 - _sigmoid(o[5 + cls])
                else:
                    for c in range(CLASSES):
                        d[5 + c] = (1.0 if c == cls else 0.0) - _sigmoid(o[5 + c])
        deltas.append(delta)
        obj_trained.append(trained)
    return deltas, obj_trained


def _outputs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(2, 3, SIZE // s, SIZE // s, 5 + CLASSES, generator=g) for s in STRIDES]
    for b, s, n, t, f in LOOKALIKES:
        (cx, cy), (w, h), _ = TRUTHS[b][t]
        stride = STRIDES[s]
        i, j = int(cx / stride), int(cy / stride)
        aw, ah = ANCHORS[MASKS[s][n]]
        ox, oy = torch.logit(torch.tensor([cx / stride - i, cy / stride - j], dtype=torch.float64)).tolist()
        outs[s][b, n, j, i, :4] = torch.tensor([ox, oy, math.log(f * w / aw), math.log(f * h / ah)])
    return [o.requires_grad_() for o in outs]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for (cx, cy), (w, h), _ in image]),
            "labels": torch.tensor([c for *_, c in image]),
        }
        for image in TRUTHS
    ]


def _grads(recipe: str, outs: list[torch.Tensor]) -> list[torch.Tensor]:
    loss_fn = load_recipe(ROOT / "configs" / "losses" / f"{recipe}.yaml")
    anchors = torch.tensor(ANCHORS, dtype=torch.float32).view(3, 3, 2)
    for o in outs:
        o.grad = None
    loss_fn(outs, _targets(), anchors, STRIDES)["loss"].backward()
    return [o.grad.clone() for o in outs]


@pytest.mark.parametrize("recipe, thresh", [("darknet", 0.7), ("paper", 0.5)])
def test_recipe_gradient_is_minus_darknet_delta_over_batch(recipe: str, thresh: float) -> None:
    outs = _outputs()
    deltas, trained = darknet_delta(outs, thresh)
    grads = _grads(recipe, outs)
    for s, (grad, delta) in enumerate(zip(grads, deltas)):
        expected = -torch.tensor(delta) / 2  # B = 2 images
        assert (grad - expected).abs().max() < 1e-6, f"scale {s}: {(grad - expected).abs().max():.2e}"
    ignored = sum(int((torch.tensor(t) == 0).sum()) for t in trained)
    assert ignored >= (4 if thresh == 0.5 else 3)  # the lookalikes (at least) are ignored
    positives = sum(int((torch.tensor(d)[..., 5:] != 0).any(-1).sum()) for d in deltas)
    assert positives == 6 and all(torch.tensor(d)[..., :4].abs().sum() > 0 for d in deltas)  # all three scales


def test_mse_obj_objectness_gradient_goes_through_the_sigmoid() -> None:
    outs = _outputs(1)
    deltas, trained = darknet_delta(outs, 0.7)
    grads = _grads("mse_obj", outs)
    for grad, out, delta, w in zip(grads, outs, deltas, trained):
        delta, w = torch.tensor(delta), torch.tensor(w)
        p = torch.sigmoid(out.detach()[..., 4])
        y = (delta[..., 5:] != 0).any(-1).float()  # the positives
        torch.testing.assert_close(grad[..., 4], 2 * (p - y) * p * (1 - p) * w / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad[..., :4], -delta[..., :4] / 2, rtol=0, atol=1e-6)  # box, classes: darknet
        torch.testing.assert_close(grad[..., 5:], -delta[..., 5:] / 2, rtol=0, atol=1e-6)
