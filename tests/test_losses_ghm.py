"""GHM-C: bin counts, weights, momentum, state, exclusion of ignored elements, loop reference."""

import io
import math
import sys
from pathlib import Path

import pytest
import torch

from detector.losses import BCE, GHMC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loss_references import ghmc_reference  # noqa: E402


def _logits_for_g(g: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, 1] with target 0, so that g = |σ(x) − 0| = the given values."""
    p = torch.tensor(g, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()[:, None], torch.zeros(len(g), 1)


def test_one_bin_is_mean_bce():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4) * 2, (torch.rand(50, 4) < 0.3).float()
    weight = (torch.rand(50, 4) < 0.8).float()
    out = GHMC(bins=1, momentum=0.0)(x, y, weight)
    valid = weight > 0
    torch.testing.assert_close(out[valid].mean(), BCE()(x, y)[valid].mean())
    assert (out[~valid] == 0).all()


def test_known_bin_counts_give_known_weights():
    # bins = 4, edges 0, .25, .5, .75, 1: counts [3, 0, 2, 1], tot = 6, n = 3 non-empty bins
    x, y = _logits_for_g([0.1, 0.1, 0.1, 0.6, 0.6, 0.9])
    ghm = GHMC(bins=4, momentum=0.0)
    w = ghm.harmonizing_weights(x, y, None)
    # w = tot / (count_b * n): 6 / 9, 6 / 6, 6 / 3
    torch.testing.assert_close(w.flatten(), torch.tensor([2 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 2.0]))
    torch.testing.assert_close(ghm(x, y), w * BCE()(x, y))
    assert w.mean().item() == pytest.approx(1.0)  # without momentum the weights average to 1


def test_zero_weight_elements_are_not_counted():
    x, y = _logits_for_g([0.1, 0.1, 0.1, 0.6, 0.6, 0.9, 0.1, 0.9])
    weight = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [0.0], [0.0]])
    w = GHMC(bins=4, momentum=0.0).harmonizing_weights(x, y, weight)
    torch.testing.assert_close(w.flatten(), torch.tensor([2 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 2.0, 0.0, 0.0]))
    out = GHMC(bins=4, momentum=0.0)(x, y, weight * 3)  # weight also multiplies the result
    torch.testing.assert_close(out, 3 * weight * w * BCE()(x, y))


def test_g_equal_one_lands_in_last_bin():
    x = torch.tensor([[100.0], [-100.0], [0.0]])  # σ = 1.0 exactly in float32
    y = torch.tensor([[0.0], [1.0], [0.0]])
    ghm = GHMC(bins=4, momentum=0.0)
    g = (torch.sigmoid(x) - y).abs()
    assert g[0].item() == 1.0 and g[1].item() == 1.0
    assert ghm._bin_index(g.clone(), None).flatten().tolist() == [3, 3, 2]
    # bins: [0, 0, 1, 2]: tot 3, n 2 -> g = 1: 3 / (2 * 2), g = .5: 3 / (1 * 2)
    torch.testing.assert_close(ghm.harmonizing_weights(x, y, None).flatten(), torch.tensor([0.75, 0.75, 1.5]))


def test_momentum_running_average_by_hand():
    ghm = GHMC(bins=4, momentum=0.75)
    x1, y1 = _logits_for_g([0.1, 0.1, 0.1, 0.6, 0.6, 0.9])  # counts [3, 0, 2, 1], tot 6, n 3
    w1 = ghm.harmonizing_weights(x1, y1, None)
    # acc = 0.25 * counts = [.75, 0, .5, .25]; w = 6 / (acc_b * 3)
    torch.testing.assert_close(ghm.acc, torch.tensor([0.75, 0.0, 0.5, 0.25]))
    torch.testing.assert_close(w1.flatten(), torch.tensor([8 / 3, 8 / 3, 8 / 3, 4.0, 4.0, 8.0]))
    x2, y2 = _logits_for_g([0.1, 0.3, 0.3, 0.3])  # counts [1, 3, 0, 0], tot 4, n 2
    w2 = ghm.harmonizing_weights(x2, y2, None)
    # acc = [.75 * .75 + .25 * 1, .75 * 0 + .25 * 3, .5 (empty: kept), .25 (kept)] = [.8125, .75, .5, .25]
    torch.testing.assert_close(ghm.acc, torch.tensor([0.8125, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(w2.flatten(), torch.tensor([4 / 1.625, 4 / 1.5, 4 / 1.5, 4 / 1.5]))


def test_eval_mode_leaves_running_counts_alone():
    ghm = GHMC(bins=4, momentum=0.75)
    x, y = _logits_for_g([0.1, 0.6])
    ghm.eval()
    w = ghm.harmonizing_weights(x, y, None)
    assert (ghm.acc == 0).all()
    torch.testing.assert_close(w.flatten(), torch.tensor([2 / (0.25 * 2), 2 / (0.25 * 2)]))


def _two_steps(ghm: GHMC) -> None:
    torch.manual_seed(1)
    for _ in range(2):
        ghm(torch.randn(40, 3) * 2, (torch.rand(40, 3) < 0.2).float())


def test_state_dict_round_trip():
    ghm = GHMC(bins=10, momentum=0.75)
    _two_steps(ghm)
    assert "acc" in ghm.state_dict() and ghm.acc.sum() > 0
    restored = GHMC(bins=10, momentum=0.75)
    restored.load_state_dict(ghm.state_dict())
    torch.testing.assert_close(restored.acc, ghm.acc, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(ghm.state_dict(), buf)
    buf.seek(0)
    from_disk = GHMC(bins=10, momentum=0.75)
    from_disk.load_state_dict(torch.load(buf))
    torch.testing.assert_close(from_disk.acc, ghm.acc, rtol=0, atol=0)
    x, y = torch.randn(30, 3), (torch.rand(30, 3) < 0.2).float()
    torch.testing.assert_close(from_disk(x, y), ghm(x, y), rtol=0, atol=0)  # resumed = continued


@pytest.mark.parametrize("bins, momentum", [(30, 0.75), (10, 0.0), (7, 0.5)])
def test_equals_loop_reference(bins, momentum):
    torch.manual_seed(bins)
    ghm, acc = GHMC(bins=bins, momentum=momentum), torch.zeros(bins)
    for _ in range(3):
        x = torch.randn(300, 8) * 3
        y = (torch.rand(300, 8) < 0.1).float()
        weight = (torch.rand(300, 1) < 0.9).float().expand(300, 8)
        ours = ghm(x, y, weight)
        ref = ghmc_reference(x, y, weight, acc, bins=bins, momentum=momentum)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        tot = (weight > 0).sum().item()
        assert ours.sum().item() / tot == pytest.approx(ref.sum().item() / tot, rel=1e-6)
    if momentum > 0:
        torch.testing.assert_close(ghm.acc, acc, rtol=1e-6, atol=0)


def test_gradient_is_weighted_bce_gradient():
    torch.manual_seed(3)
    x = (torch.randn(20, 3) * 2).requires_grad_()
    y = (torch.rand(20, 3) < 0.3).float()
    ghm = GHMC(bins=5, momentum=0.0)
    ghm(x, y).sum().backward()
    w = GHMC(bins=5, momentum=0.0).harmonizing_weights(x.detach(), y, None)
    torch.testing.assert_close(x.grad, w * (torch.sigmoid(x.detach()) - y))


def test_empty_input_and_bad_arguments():
    out = GHMC()(torch.zeros(0, 80), torch.zeros(0, 80))
    assert out.shape == (0, 80)
    assert math.isfinite(out.sum().item())
    with pytest.raises(ValueError, match="bins"):
        GHMC(bins=0)
    with pytest.raises(ValueError, match="momentum"):
        GHMC(momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        GHMC(momentum=-0.1)


@pytest.mark.parametrize("bins", [1, 7, 30, 100])
def test_bin_index_is_floor_of_g_times_bins(bins: int) -> None:
    # Bin b holds [b/M, (b+1)/M); g = 1 goes to the last bin; invalid elements to the extra slot M.
    ghm = GHMC(bins)
    g = torch.cat([torch.rand(10000), torch.tensor([0.0, 1.0, 0.5, 0.25])])
    expected = torch.minimum((g * bins).floor().long(), torch.tensor(bins - 1))
    assert torch.equal(ghm._bin_index(g.clone(), None), expected)
    valid = torch.rand(g.shape) < 0.5
    assert torch.equal(ghm._bin_index(g.clone(), valid), torch.where(valid, expected, bins))
    # away from the edges this is the reference's table lookup (edges i/M, last one + 1e-6)
    edges = torch.arange(bins + 1).float() / bins
    edges[-1] += 1e-6
    assert torch.equal(expected[:10000], torch.bucketize(g[:10000], edges[1:], right=True))


def test_ghm_recipe_equals_the_papers_loss_sum_over_tot():
    """The ghm recipe's objectness and class terms are GHM-C's own ``Σ w·BCE / tot`` (mmdetection's GHMC),
    ratio 1, over two steps (the second uses the running counts): no other divisor in between."""
    from detector.losses import load_recipe

    loss_fn = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "losses" / "ghm.yaml")
    anchors = torch.tensor([[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]) / 3.0  # fmt: skip
    acc_obj, acc_cls = torch.zeros(30), torch.zeros(30)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        outs = [torch.randn(2, 3, s, s, 9, generator=g) * 0.5 for s in (16, 8, 4)]  # 128 px, 4 classes
        xy = torch.rand(2, 6, 2, generator=g) * 80
        boxes = torch.cat([xy, xy + 8 + torch.rand(2, 6, 2, generator=g) * 40], -1)
        targets = [{"boxes": b, "labels": torch.randint(0, 4, (6,), generator=g)} for b in boxes]
        seen: list = []
        loss_fn.recorder = seen.append
        out = loss_fn(outs, targets, anchors, [8, 16, 32])
        rec = seen[0]
        logits, obj_t, obj_w = rec.obj_logits, rec.obj_targets, rec.obj_weight
        tot = max((obj_w > 0).sum().item(), 1.0)
        ref_obj = ghmc_reference(logits.reshape(-1, 1), obj_t.reshape(-1, 1), obj_w.reshape(-1, 1), acc_obj).sum() / tot
        assert 0 < tot < obj_w.numel()  # the ignore mask is active: tot is not the number of anchors
        assert out["loss_obj"].item() / ref_obj.item() == pytest.approx(1.0, rel=1e-5)
        c_logits, c_t = rec.cls_logits, rec.cls_targets
        ref_cls = ghmc_reference(c_logits, c_t, torch.ones_like(c_t), acc_cls).sum() / c_t.numel()
        assert out["loss_cls"].item() / ref_cls.item() == pytest.approx(1.0, rel=1e-5)
