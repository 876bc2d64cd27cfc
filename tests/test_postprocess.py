"""One post-processing: evaluation (``postprocess``) and the export graph (``DecodedYOLO(nms=True)``) give the
same detections, and both equal a plain per-image reference (per-image top-k, per-class NMS, cap)."""

import pytest
import torch
from torchvision.ops import batched_nms

from detector.export import DecodedYOLO
from detector.models import YOLOv3
from detector.ops.postprocess import detections, postprocess

SIZE = 96


def reference(boxes: torch.Tensor, scores: torch.Tensor, conf: float, iou: float, max_det: int, max_cand: int) -> list:
    """One image at a time, as the method reads: the ``max_cand`` best (anchor, class) pairs above ``conf``,
    NMS per class, the ``max_det`` best survivors by descending score."""
    out = []
    for bx, sc in zip(boxes, scores):
        n_cls = sc.shape[1]
        top, idx = sc.flatten().topk(min(max_cand, sc.numel()))
        top, idx = top[top > conf], idx[top > conf]
        labels, rows = idx % n_cls, idx // n_cls
        kept = batched_nms(bx[rows], top, labels, iou)[:max_det]
        out.append({"boxes": bx[rows][kept], "scores": top[kept], "labels": labels[kept]})
    return out


@pytest.fixture(scope="module")
def model() -> YOLOv3:
    torch.manual_seed(0)
    net = YOLOv3(num_classes=3, preset="nano").eval()
    with torch.no_grad():  # spread the scores so that the threshold, NMS and the cap all act
        for head in net.heads:
            head[-1].bias.normal_(0, 2)
    return net


@pytest.mark.parametrize(("conf", "iou", "max_det", "max_cand"), [(0.02, 0.5, 7, 1000), (0.3, 0.6, 100, 40)])
def test_evaluation_and_export_give_the_same_detections(
    model: YOLOv3, conf: float, iou: float, max_det: int, max_cand: int
) -> None:
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    wrapper = DecodedYOLO(model, SIZE, nms=True, conf_thresh=conf, nms_iou=iou, max_det=max_det,
                          max_candidates=max_cand).eval()  # fmt: skip
    with torch.no_grad():
        evaluated = postprocess(model(images), model.anchors, model.strides, conf, iou, max_det, max_cand)
        exported = wrapper(images)  # [K, 7]: image, x1, y1, x2, y2, score, label
        expected = reference(*wrapper.decoded(images), conf, iou, max_det, max_cand)
    sizes = [len(d["scores"]) for d in evaluated]
    assert 0 < min(sizes) and (max_det in sizes) == (max_det == 7)  # detections in every image; the cap acted
    assert sizes == [len(e["scores"]) for e in expected]
    assert exported[:, 0].tolist() == [float(i) for i, n in enumerate(sizes) for _ in range(n)]
    for i, (ev, ex, ref) in enumerate(zip(evaluated, exported.split(sizes), expected)):
        assert ev["labels"].dtype == torch.int64 and ev["scores"].dtype == torch.float32
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(ev[k], ref[k]), (i, k)
        assert torch.equal(ex[:, 1:5], ev["boxes"]) and torch.equal(ex[:, 5], ev["scores"])
        assert torch.equal(ex[:, 6], ev["labels"].float())


def test_ties_grouped_by_image_and_capped() -> None:
    """Equal scores in several images (tie order is NMS's own): grouped by image, ascending, ``max_det``
    each, every survivor a distinct (box, class) pair of its image (the boxes are disjoint: NMS keeps all)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]).expand(3, 4, 4)
    scores = torch.full((3, 4, 2), 0.5)
    scores[1] = 0.0  # image 1: no candidates
    img, bx, sc, lb = detections(boxes, scores, conf_thresh=0.1, iou_thresh=0.5, max_det=5, max_candidates=100)
    assert img.tolist() == [0] * 5 + [2] * 5 and sc.tolist() == [0.5] * 10
    for i in (0, 2):
        pairs = {(tuple(b.tolist()), int(c)) for b, c in zip(bx[img == i], lb[img == i])}
        assert len(pairs) == 5 and all(b in [tuple(r) for r in boxes[0].tolist()] for b, _ in pairs)


def test_nothing_above_the_threshold() -> None:
    img, bx, sc, lb = detections(torch.rand(2, 5, 4), torch.zeros(2, 5, 3), 0.5, 0.5, 10)
    assert img.shape == (0,) and bx.shape == (0, 4) and sc.shape == (0,) and lb.shape == (0,)
    out = postprocess([torch.full((2, 3, 2, 2, 8), -20.0)], torch.ones(1, 3, 2), [32], 0.5, 0.5, 10)
    assert [d["boxes"].shape for d in out] == [(0, 4), (0, 4)]
