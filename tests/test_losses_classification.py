"""Classification and objectness losses: closed forms, gradients, smoothing, focal loss."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from detector.losses import BCE, BCEObjectness, FocalLoss, MSEObjectness, SoftmaxCrossEntropy

LOG2 = math.log(2.0)


def test_bce_closed_form():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # log(1 + e^-2) = 0.126928, and 2 + log(1 + e^-2) = 2.126928
    expected = torch.tensor([[LOG2, LOG2], [0.1269280, 2.1269280]])
    torch.testing.assert_close(BCE()(x, y), expected)
    weight = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    torch.testing.assert_close(BCE()(x, y, weight), expected * weight)


def test_bce_label_smoothing():
    # eps = 0.2: y = 1 -> 0.9, y = 0 -> 0.1
    x = torch.tensor([[0.0, 2.0, 2.0]])
    y = torch.tensor([[1.0, 1.0, 0.0]])
    loss = BCE(label_smoothing=0.2)(x, y)
    # x = 0: -0.9 log .5 - .1 log .5 = log 2; x = 2, y = .9: .9 * 0.126928 + .1 * 2.126928 = 0.3269280
    # x = 2, y = .1: .1 * 0.126928 + .9 * 2.126928 = 1.9269280
    torch.testing.assert_close(loss, torch.tensor([[LOG2, 0.3269280, 1.9269280]]))


def test_bce_gradient_is_p_minus_y():
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.rand(6, 5)  # soft targets too
    BCE()(x, y).sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()) - y)


def test_darknet_delta_is_minus_bce_gradient():
    torch.manual_seed(1)
    x = torch.randn(10, 1, requires_grad=True)
    y = (torch.rand(10, 1) > 0.5).float()
    BCEObjectness()(x, y).sum().backward()
    delta = y - torch.sigmoid(x.detach())  # darknet: delta = target - output, fed back as the gradient
    torch.testing.assert_close(delta, -x.grad)


def test_softmax_cross_entropy_closed_form():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(SoftmaxCrossEntropy()(x, y), torch.tensor([[LOG2, 0.0], [0.0, LOG2]]))
    # logits [1, 2, 3], class 2: log(e + e^2 + e^3) - 3 = log(1 + e^-1 + e^-2) = 0.4076060
    x = torch.tensor([[1.0, 2.0, 3.0]])
    loss = SoftmaxCrossEntropy()(x, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.0, 0.4076060]]))


def test_softmax_label_smoothing():
    # eps = 0.3, C = 3: y = [0, 0, 1] -> [0.1, 0.1, 0.8]; -log softmax = [2.407606, 1.407606, 0.407606]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    loss = SoftmaxCrossEntropy(label_smoothing=0.3)(x, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(loss, torch.tensor([[0.2407606, 0.1407606, 0.3260848]]))
    assert loss.sum().item() == pytest.approx(0.7076060, abs=1e-6)


def test_softmax_gradient_is_softmax_minus_y():
    torch.manual_seed(2)
    x = torch.randn(7, 4, requires_grad=True)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (7,)), 4).float()
    SoftmaxCrossEntropy()(x, y).sum().backward()  # CE = sum over C of the elementwise loss
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), 1) - y)


def test_mse_objectness_value_and_gradient():
    x = torch.tensor([[0.0], [math.log(3.0)]])  # p = 0.5, 0.75
    y = torch.tensor([[1.0], [0.0]])
    torch.testing.assert_close(MSEObjectness()(x, y), torch.tensor([[0.25], [0.5625]]))
    torch.manual_seed(3)
    x = torch.randn(8, 1, requires_grad=True)
    y = torch.rand(8, 1)
    MSEObjectness()(x, y).sum().backward()
    p = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, 2 * (p - y) * p * (1 - p))


def test_bce_objectness_equals_bce():
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [0.0]])
    torch.testing.assert_close(BCEObjectness()(x, y), torch.tensor([[LOG2], [2.1269280]]))


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.75, 0.0), (0.5, 1.5), (None, 2.0)])
def test_focal_equals_torchvision(alpha, gamma):
    torch.manual_seed(4)
    x = torch.randn(20, 6) * 3
    y = (torch.rand(20, 6) < 0.2).float()
    ours = FocalLoss(alpha=alpha, gamma=gamma)(x, y)
    ref = sigmoid_focal_loss(x, y, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(ours, ref)


def test_focal_closed_form_and_gamma_zero():
    # x = 0, y = 1: p_t = .5, alpha_t = .25, (1 - p_t)^2 = .25 -> .0625 log 2 = 0.0433217
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(FocalLoss()(x, y), torch.tensor([[0.0433217, 0.75 * 0.25 * LOG2]]))
    torch.manual_seed(5)
    x = torch.randn(10, 3)
    y = (torch.rand(10, 3) < 0.5).float()
    bce = BCE()(x, y)
    alpha_t = 0.75 * y + 0.25 * (1 - y)
    torch.testing.assert_close(FocalLoss(alpha=0.75, gamma=0.0)(x, y), alpha_t * bce)
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=0.0)(x, y), bce)
    p_t = torch.where(y > 0, torch.sigmoid(x), 1 - torch.sigmoid(x))
    torch.testing.assert_close(FocalLoss(alpha=None, gamma=2.0)(x, y), (1 - p_t) ** 2 * bce)


def test_focal_weight():
    x, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 3.0]])
    torch.testing.assert_close(FocalLoss()(x, y, w), FocalLoss()(x, y) * w)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="label_smoothing"):
        BCE(label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxCrossEntropy(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        BCE()(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="weight"):
        MSEObjectness()(torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(3))


def test_sigmoid_reference_numbers():
    # the closed-form constants above, recomputed in float64
    assert math.log(1 + math.exp(-2)) == pytest.approx(0.1269280, abs=1e-7)
    assert 0.9 * 0.1269280 + 0.1 * 2.1269280 == pytest.approx(0.3269280, abs=1e-7)
    assert math.log(1 + math.exp(-1) + math.exp(-2)) == pytest.approx(0.4076060, abs=1e-7)
