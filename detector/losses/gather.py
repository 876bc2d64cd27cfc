"""Read the network outputs' box/objectness channels everywhere and their class channels at the
positives only, with a backward that writes the outputs' gradient in one pass."""

from __future__ import annotations

import torch
from torch import Tensor


class _BoxObjAndClasses(torch.autograd.Function):
    """``out [B, A, H, W, 5 + C]`` -> ``box_obj [B, A·H·W, 5]``, ``cls [P, C]`` at ``(b, a, j, i)``.

    Autograd's own slicing and indexing would each materialise a zero-filled gradient of the
    whole output and add them; here backward allocates one and scatters both into it.
    """

    @staticmethod
    def forward(ctx, out: Tensor, b: Tensor, a: Tensor, j: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        ctx.save_for_backward(b, a, j, i)
        ctx.shape, ctx.stride = out.shape, out.stride()
        return out[..., :5].reshape(out.shape[0], -1, 5), out[b, a, j, i, 5:]

    @staticmethod
    def backward(ctx, g_box_obj: Tensor, g_cls: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        b, a, j, i = ctx.saved_tensors
        # the output's own memory layout (the output conv's, permuted), so nothing downstream copies it
        grad = torch.empty_strided(ctx.shape, ctx.stride, dtype=g_box_obj.dtype, device=g_box_obj.device).zero_()
        grad[..., :5] = g_box_obj.view(*ctx.shape[:-1], 5)
        grad[b, a, j, i, 5:] = g_cls  # positions are unique (one ground truth per anchor)
        return grad, None, None, None, None


def gather_logits(outputs: list[Tensor], anchor_idx: Tensor, img_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Box/objectness logits of every anchor and class logits of the positives.

    Args:
        outputs: per scale ``[B, A, H_s, W_s, 5 + C]``.
        anchor_idx, img_idx: ``[P]`` positives as rows of the flat layout (``anchor_grid``) and image indices.
    Returns:
        ``box_obj [B, N, 5]`` in the flat layout, ``cls [P, C]`` in the order of ``anchor_idx``.
    """
    rows, batch = anchor_idx, img_idx
    box_obj, classes, order = [], [], []
    start = 0
    for out in outputs:
        _, a_n, h, w, _ = out.shape
        n = a_n * h * w
        sel = ((rows >= start) & (rows < start + n)).nonzero().squeeze(1)
        local = rows[sel] - start
        part, cls = _BoxObjAndClasses.apply(out, batch[sel], local // (h * w), local % (h * w) // w, local % w)
        box_obj.append(part)
        classes.append(cls)
        order.append(sel)
        start += n
    cls = torch.cat(classes)
    return torch.cat(box_obj, 1), cls[torch.argsort(torch.cat(order))]
