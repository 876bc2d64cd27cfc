"""``gather_logits``: the loss's one-pass read of the outputs equals plain indexing, value and gradient."""

import torch

from detector.losses.gather import gather_logits
from detector.ops.boxes import flatten_outputs

SHAPES = [(40, 40), (20, 20), (10, 10)]  # a 320 x 320 input


def test_gather_logits_matches_plain_indexing_and_its_gradient() -> None:
    outs = [torch.randn(2, 3, h, w, 9, requires_grad=True) for h, w in SHAPES]
    rows, batch = torch.tensor([6155, 3492, 10, 4866]), torch.tensor([1, 0, 1, 0])
    box_obj, cls = gather_logits(outs, rows, batch)
    raw = flatten_outputs(outs)
    assert torch.equal(box_obj, raw[..., :5]) and torch.equal(cls, raw[batch, rows, 5:])
    wh, wc = torch.randn_like(box_obj), torch.randn_like(cls)
    ours = torch.autograd.grad((box_obj * wh).sum() + (cls * wc).sum(), outs)
    ref = torch.autograd.grad((raw[..., :5] * wh).sum() + (raw[batch, rows, 5:] * wc).sum(), outs)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
