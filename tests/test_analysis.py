"""Confusion matrix, F1 and PR curves on hand-made cases with known answers, COCO's matching
reproduced, the DDP gather equal to one process, and the callback on a real validation."""

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from detector.analysis import EvalData, best_f1, confusion_matrix, f1_curves, pr_curves, true_positives
from detector.callbacks import DetectionAnalysis
from detector.callbacks.analysis import STATES, gather
from detector.data import DetectionDataModule, ShapesConfig
from detector.module import DetectorModule
from detector.ops.match import match_by_iou, padded_iou

T = torch.tensor
A, B, C, BG = 0, 1, 2, 3  # classes a, b, c and the background index of a 3-class matrix


def _image(gt: list, gt_labels: list, det: list, labels: list, scores: list) -> tuple:
    return (T(det, dtype=torch.float32).view(-1, 4), T(scores).view(-1), T(labels, dtype=torch.int64).view(-1),
            T(gt, dtype=torch.float32).view(-1, 4), T(gt_labels, dtype=torch.int64).view(-1))  # fmt: skip


def _data(images: list[tuple]) -> EvalData:
    return EvalData(*(list(x) for x in zip(*images)))


SQUARE = [0.0, 0.0, 10.0, 10.0]
HAND_MADE = [
    # 0: a and b swapped: the box of a is detected as b and the box of b as a
    _image([SQUARE, [20, 0, 30, 10]], [A, B], [SQUARE, [20, 0, 30, 10]], [B, A], [0.9, 0.9]),
    # 1: c missed (its only detection scores 0.1, under the threshold); a false positive a on nothing; a found
    _image([SQUARE, [20, 20, 40, 40]], [C, A], [SQUARE, [50, 50, 60, 60], [20, 20, 40, 40]], [C, A, A], [0.1, 0.8, 0.95]),
    # 2: two detections of one a (IoU 1 and 0.8): one to one, the second is a false positive
    _image([SQUARE], [A], [SQUARE, [0, 0, 10, 8]], [A, A], [0.85, 0.9]),
    # 3: highest IoU first. IoU(d1, g1) = 85/115 = .739, IoU(d1, g2) = 95/105 = .905, IoU(d2, g2) = 1,
    #    IoU(d2, g1) = 80/120 = .667. Highest IoU first: d2-g2, d1-g1 (a->a, b->b); by score
    #    (d1 first) it would be d1-g2, d2-g1 (b->a, a->b).
    _image([SQUARE, [2, 0, 12, 10]], [A, B], [[1.5, 0, 11.5, 10], [2, 0, 12, 10]], [A, B], [0.9, 0.5]),
    # 4: nothing at all
    _image([], [], [], [], []),
    # 5: IoU 100/205 = .488 < .5: the a is missed and its detection is a false positive
    _image([SQUARE], [A], [[0, 0, 10, 20.5]], [A], [0.7]),
]  # fmt: skip


def test_confusion_matrix_hand_made() -> None:
    m = confusion_matrix(_data(HAND_MADE), 3, iou_threshold=0.5, score_threshold=0.25)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[A, A] = 3  # images 1, 2, 3
    expected[B, B] = 1  # image 3
    expected[A, B] = expected[B, A] = 1  # image 0: the swap
    expected[C, BG] = 1  # image 1: c missed (its detection is under the score threshold)
    expected[A, BG] = 1  # image 5: IoU under 0.5
    expected[BG, A] = 3  # false positives: image 1 (on nothing), image 2 (second detection), image 5
    assert torch.equal(m, expected), m
    assert m[:BG].sum(1).tolist() == [5, 2, 1]  # every ground truth once: a 5, b 2, c 1


def test_score_threshold_is_inclusive_and_drops_the_rest() -> None:
    img = [_image([SQUARE], [A], [SQUARE], [A], [0.25])]
    assert confusion_matrix(_data(img), 3, score_threshold=0.25)[A, A] == 1
    assert confusion_matrix(_data(img), 3, score_threshold=0.26)[A, BG] == 1  # missed, no false positive
    with pytest.raises(ValueError, match="label 3 of image 0 is outside 0..2"):
        confusion_matrix(_data([_image([SQUARE], [3], [], [], [])]), 3)


def _greedy_reference(iou: np.ndarray, thr: float) -> list[int]:
    """Sequential greedy: every pair with IoU >= thr, highest IoU first (ties: detection, then ground truth)."""
    pairs = sorted((-iou[d, g], d, g) for d in range(iou.shape[0]) for g in range(iou.shape[1]) if iou[d, g] >= thr)
    match, used = [-1] * iou.shape[0], set()
    for _, d, g in pairs:
        if match[d] < 0 and g not in used:
            match[d] = g
            used.add(g)
    return match


def test_match_by_iou_is_the_sequential_greedy() -> None:
    rng = random.Random(0)
    dets, gts = [], []
    for _ in range(40):  # crowded images: many detections compete for few ground truths
        g = torch.rand(rng.randint(0, 6), 2) * 30
        gts.append(torch.cat([g, g + 10 + torch.rand(len(g), 2) * 10], 1))
        d = torch.rand(rng.randint(0, 9), 2) * 30
        dets.append(torch.cat([d, d + 10 + torch.rand(len(d), 2) * 10], 1))
    box = T([[0.0, 0, 10, 10]])
    dets += [box.repeat(2, 1), torch.cat([box, box + 1])]  # exact ties: equal IoU everywhere, and shared
    gts += [box.repeat(2, 1), torch.cat([box + 1, box])]
    iou, real = padded_iou(dets, gts)
    match = match_by_iou(iou, real & (iou >= 0.3))
    for i, (d, g) in enumerate(zip(dets, gts)):
        expected = _greedy_reference(iou[i, : len(d), : len(g)].numpy(), 0.3)
        assert match[i, : len(d)].tolist() == expected, i


# PR and F1: class a with 2 ground truths and detections 0.9 (TP), 0.8 (FP), 0.6 (TP); class b with one
# ground truth found at 0.7. Class a keeping scores >= c: c in (.8, .9]: TP 1, D 1 -> F1 = 2/3;
# (.6, .8]: TP 1, D 2 -> 1/2; <= .6: TP 2, D 3 -> 4/5. Class b: 1 for c <= .7, else 0.
# Mean: (.8, .9] 1/3, (.7, .8] 1/4, (.6, .7] 3/4, <= .6: 9/10 -> best 0.9 at c = 0.6, P (2/3 + 1)/2, R 1.
KNOWN = [
    _image([SQUARE], [A], [SQUARE, [50, 50, 60, 60]], [A, A], [0.9, 0.8]),
    _image([[40, 0, 50, 10], [20, 0, 30, 10]], [A, B], [[40, 0, 50, 10], [20, 0, 30, 10]], [A, B], [0.6, 0.7]),
]


def test_f1_and_pr_known_answers() -> None:
    data = _data(KNOWN)
    scores, labels, tp, n_gt = true_positives(data, 3)
    assert n_gt.tolist() == [2, 1, 0]
    rows = sorted(zip(scores.tolist(), labels.tolist(), tp.tolist()), reverse=True)
    assert [r[0] for r in rows] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert [r[1:] for r in rows] == [(A, True), (A, False), (B, True), (A, True)]
    best = best_f1(scores, labels, tp, n_gt)
    assert best.conf == pytest.approx(0.6) and best.f1 == pytest.approx(0.9)
    assert best.precision == pytest.approx((2 / 3 + 1) / 2) and best.recall == pytest.approx(1.0)
    assert best.per_class[A].tolist() == pytest.approx([2 / 3, 1.0, 0.8]) and best.per_class[C].isnan().all()
    f1 = f1_curves(scores, labels, tp, n_gt, T([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5]))
    assert f1[A].tolist() == pytest.approx([0, 2 / 3, 2 / 3, 1 / 2, 1 / 2, 1 / 2, 1 / 2, 4 / 5, 4 / 5])
    assert f1[B].tolist() == pytest.approx([0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert f1[C].isnan().all()
    # COCO's interpolated precision of class a: 1 up to recall 1/2 (51 of the 101 thresholds), then 2/3
    _, result = gather(_kept(data), 0.5, torch.device("cpu"))
    pr = pr_curves(result, 3)
    assert pr[A].tolist() == pytest.approx([1.0] * 51 + [2 / 3] * 50)
    assert pr[B].tolist() == pytest.approx([1.0] * 101) and pr[C].isnan().all()
    assert float(pr[:2].mean(1).mean()) == pytest.approx(float(result["map_50"]))  # the curves' AP is AP50


def test_no_detection_and_no_ground_truth() -> None:
    empty = true_positives(_data([_image([SQUARE], [A], [], [], [])]), 2)
    best = best_f1(*empty)
    assert best.conf is None and best.f1 == 0.0 and best.recall == 0.0
    assert best_f1(*true_positives(_data([_image([], [], [SQUARE], [A], [0.5])]), 2)) is None


def _kept(data: EvalData, ids: list[int] | None = None) -> dict[str, list[torch.Tensor]]:
    """``data`` (xyxy) as the per-image states the callback keeps: those of the module's metric after ``update``."""
    metric = DetectorModule._make_metric()
    ids = ids if ids is not None else list(range(len(data.boxes)))
    metric.update([{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(data.boxes, data.scores, data.labels)],
                  [{"boxes": b, "labels": lab, "image_id": i} for b, lab, i in zip(data.gt_boxes, data.gt_labels, ids)])  # fmt: skip
    return {name: list(getattr(metric, name)) for name in STATES}


def _random_images(n: int, seed: int) -> EvalData:
    """Random scenes: up to 6 ground truths of 3 classes, each detected 0-3 times with jitter, some
    with the wrong class, plus loose false positives; at most 100 detections per image (COCO's cap)."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        m = int(torch.randint(0, 7, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 60
        gt = torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 30], 1)
        gl = torch.randint(0, 3, (m,), generator=g)
        copies = torch.randint(0, 4, (m,), generator=g)
        det = gt.repeat_interleave(copies, 0) + torch.randn(int(copies.sum()), 4, generator=g) * 3
        dl = gl.repeat_interleave(copies)
        dl = torch.where(torch.rand(len(dl), generator=g) < 0.2, torch.randint(0, 3, dl.shape, generator=g), dl)
        k = int(torch.randint(0, 4, (1,), generator=g))
        loose = torch.rand(k, 2, generator=g) * 80
        det = torch.cat([det, torch.cat([loose, loose + 10], 1)])
        dl = torch.cat([dl, torch.randint(0, 3, (k,), generator=g)])
        images.append((det, torch.rand(len(det), generator=g), dl, gt, gl))
    return _data(images)


def _interpolated_precision(scores, labels, tp, n_gt, k: int) -> np.ndarray:
    """COCO's accumulate for one class from true-positive flags: precision made non-increasing from
    the right, read at recall thresholds 0, 0.01, ..., 1 (0 beyond the highest recall)."""
    mine = labels == k
    order = np.argsort(-scores[mine].numpy(), kind="mergesort")
    hits = tp[mine].numpy()[order].astype(float)
    cum_tp, cum_fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall, precision = cum_tp / int(n_gt[k]), cum_tp / np.maximum(cum_tp + cum_fp, 1e-12)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return np.array([precision[i] if i < len(precision) else 0.0 for i in idx])


def test_true_positives_reproduce_coco() -> None:
    """Our COCO matching gives COCO's (faster_coco_eval's, through torchmetrics) interpolated precision."""
    data, result = gather(_kept(_random_images(60, seed=3)), 0.5, torch.device("cpu"))  # the boxes COCO saw
    scores, labels, tp, n_gt = true_positives(data, 3)
    assert 0.2 < tp.float().mean() < 0.8  # many matches and many misses: a wrong rule shows
    pr = pr_curves(result, 3)
    for k in range(3):
        np.testing.assert_allclose(_interpolated_precision(scores, labels, tp, n_gt, k), pr[k].numpy(), atol=1e-9)


def _analysis_numbers(data: EvalData, result: dict) -> dict:
    scores, labels, tp, n_gt = true_positives(data, 3)
    best = best_f1(scores, labels, tp, n_gt)
    return {"matrix": confusion_matrix(data, 3), "pr": pr_curves(result, 3), "f1": T([best.conf, best.f1]),
            "images": T(len(data.boxes))}  # fmt: skip


def _gather_worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        data = _random_images(7, seed=4)
        mine = list(range(rank, 7, 2))  # unpadded shards: 4 | 3 images
        shard = EvalData(
            *([getattr(data, f)[i] for i in mine] for f in ("boxes", "scores", "labels", "gt_boxes", "gt_labels"))
        )
        gathered, result = gather(_kept(shard, mine), 0.5, torch.device("cpu"), compute=rank == 0)
        if rank == 0:
            torch.save(_analysis_numbers(gathered, result), f"{path}/rank0.pt")
        else:
            assert gathered is None and result is None
    finally:
        dist.destroy_process_group()


def test_gather_over_uneven_shards_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _analysis_numbers(*gather(_kept(_random_images(7, seed=4)), 0.5, torch.device("cpu")))
    double = torch.load(tmp_path / "rank0.pt")
    assert int(double["images"]) == 7 and int(single["matrix"].sum()) > 10
    for key in single:
        torch.testing.assert_close(double[key], single[key], equal_nan=True, msg=key)


def test_callback_on_a_validation_and_a_test(tmp_path: Path) -> None:
    """The PNGs and numbers of a real validation: every ground truth in its row, the curves' AP is val/map_50."""
    dm = DetectionDataModule(root=str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=4, num_val=6, seed=1),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    module = DetectorModule(dm.class_names, preset="nano", conf_thresh=0.0)  # keep even the untrained scores
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path / "runs", callbacks=[DetectionAnalysis(score_threshold=0.0)])  # fmt: skip
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.test(module, dataloaders=dm.val_dataloader(), verbose=False)
    for stage in ("val", "test"):
        for name in ("confusion_matrix", "pr_curve", "f1_curve"):
            assert (tmp_path / "runs" / f"{stage}_{name}.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "runs" / "val_analysis.json").read_text())
    counts = torch.bincount(
        torch.cat([dm.val_set[i][1]["orig_labels"] for i in range(len(dm.val_set))]), minlength=len(dm.class_names)
    )
    matrix = torch.tensor(summary["confusion_matrix"])
    assert summary["images"] == 6 and summary["ground_truths"] == counts.tolist()
    assert matrix[:-1].sum(1).tolist() == counts.tolist()  # each ground truth matched or missed, once
    assert matrix[-1].sum() + matrix[:-1, :-1].sum() == summary["detections"] > 0  # score 0: every detection
    aps = [ap for ap in summary["ap"] if ap is not None]
    assert sum(aps) / len(aps) == pytest.approx(metrics["val/map_50"], abs=1e-6)
    assert (
        json.loads((tmp_path / "runs" / "test_analysis.json").read_text())["confusion_matrix"]
        == summary["confusion_matrix"]
    )


def test_callback_reads_the_module_metric(tmp_path: Path) -> None:
    """The callback's numbers from the states of the module's own metric (boxes given xyxy, kept by
    torchmetrics as xywh), kept before the module's epoch-end hook resets it: the known case above."""
    module = DetectorModule(["a", "b", "c"], preset="nano")
    data = _data(KNOWN)
    module.val_map.update([{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(data.boxes, data.scores, data.labels)],
                          [{"boxes": b, "labels": lab, "image_id": i} for i, (b, lab) in enumerate(zip(data.gt_boxes, data.gt_labels))])  # fmt: skip
    map_50 = float(module.val_map.compute()["map_50"])
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False)
    callback = DetectionAnalysis()
    callback.on_validation_epoch_end(trainer, module)
    module.val_map.reset()  # what the module's own hook does next
    callback.on_validation_end(trainer, module)
    summary = json.loads((tmp_path / "val_analysis.json").read_text())
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[A, A], expected[B, B], expected[BG, A] = 2, 1, 1  # 0.8 is the false positive
    assert torch.equal(torch.tensor(summary["confusion_matrix"]), expected)
    assert summary["best_f1"]["conf"] == pytest.approx(0.6) and summary["best_f1"]["f1"] == pytest.approx(0.9)
    assert summary["ap"][:2] == pytest.approx([(51 + 50 * 2 / 3) / 101, 1.0]) and summary["ap"][2] is None
    assert sum(summary["ap"][:2]) / 2 == pytest.approx(map_50)
    assert all((tmp_path / f"val_{name}.png").is_file() for name in ("confusion_matrix", "pr_curve", "f1_curve"))


def test_tied_scores_count_together() -> None:
    # two a; one found at 0.9, the other at 0.5 together with 3 false positives at the same 0.5. A threshold
    # keeps all of the tied ones or none: F1 = 2·1/(2 + 1) = 2/3 at 0.9 and 2·2/(2 + 5) = 4/7 at 0.5, so the
    # best is 0.9 (the true positive at 0.5 alone would give 2·2/(2 + 2) = 1, but no threshold keeps it alone).
    far = [[50.0 + 20 * i, 50, 60 + 20 * i, 60] for i in range(3)]
    img = _image([SQUARE, [20, 0, 30, 10]], [A, A], [SQUARE, [20, 0, 30, 10], *far], [A] * 5, [0.9, 0.5, 0.5, 0.5, 0.5])
    best = best_f1(*true_positives(_data([img]), 1))
    assert best.conf == pytest.approx(0.9) and best.f1 == pytest.approx(2 / 3)
    assert f1_curves(*true_positives(_data([img]), 1), T([0.5]))[A].tolist() == pytest.approx([4 / 7])
