"""Cost of ``DetectionAnalysis`` on a ``validate`` run: the validation epoch with it over without it.

    python benchmarks/analysis.py                 # the main job's 200 validation images at 320, nano
    python benchmarks/analysis.py --threads 1     # steadier on a busy machine

Both sides run ``Trainer.validate`` of the real ``DetectorModule`` over the same preloaded batches (no
data loading), alternating, the fastest of ``--repeat`` runs counting. With the callback the epoch also
gathers the detections, runs the COCO evaluation once more at IoU 0.5 (torchmetrics' extended
summary), matches for the confusion matrix and the F1 curve, and draws and writes three PNGs. Inside
``fit`` a validation only keeps references (no cost); this analysis then runs once, when training ends.
Head states as in ``benchmarks/eval.py``: ``prior`` (untrained: few detections) and ``busy`` (every
score 0.25: 100 detections per image, the most the matching and the figures can get).
A breakdown of the analysis alone follows (gather + COCO; matching, F1 and figures), timed once more
on its own: (validate + analysis alone) / validate is a second estimate that a shared machine's load
disturbs less than the difference of two whole epochs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the detector package, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval import eval_arguments, make_busy, prepare  # noqa: E402

from detector.callbacks import DetectionAnalysis  # noqa: E402
from detector.callbacks.analysis import STATES, gather  # noqa: E402
from detector.module import DetectorModule  # noqa: E402


def time_validate(module: DetectorModule, batches: list, repeat: int, root: str) -> tuple[float, float]:
    """Best seconds of ``Trainer.validate`` without and with ``DetectionAnalysis`` (alternating)."""
    loader = DataLoader(batches, batch_size=None)
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    plain, analysed = L.Trainer(**kwargs), L.Trainer(**kwargs, callbacks=[DetectionAnalysis()])
    times: dict[L.Trainer, list[float]] = {plain: [], analysed: []}
    for _ in range(repeat + 1):  # the first round warms up
        for trainer, seen in times.items():
            start = time.perf_counter()
            trainer.validate(module, dataloaders=loader, verbose=False)
            seen.append(time.perf_counter() - start)
    return min(times[plain][1:]), min(times[analysed][1:])


def breakdown(module: DetectorModule, batches: list, root: str) -> dict[str, float]:
    """Seconds of the analysis' parts on one validation's kept states."""
    module.eval()
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # outside a Trainer loop
    with torch.inference_mode():
        for images, targets in batches:
            module._eval_step((images, targets), module.val_map, "val")
    kept = {name: list(getattr(module.val_map, name)) for name in STATES}
    module.val_map.reset()
    callback = DetectionAnalysis()
    t0 = time.perf_counter()
    data, result = gather(kept, 0.5, torch.device("cpu"))
    t1 = time.perf_counter()
    assert data is not None and result is not None
    callback._analyse(data, result, module.class_names, Path(root), "val")
    t2 = time.perf_counter()
    return {
        "gather+coco": t1 - t0,
        "match+f1+figures": t2 - t1,
        "detections/image": len(torch.cat(data.scores)) / len(data.scores),
    }


def main() -> None:
    args = eval_arguments(__doc__.split("\n")[0], images=200).parse_args()
    batches, names = prepare(args)
    n = sum(len(b[0]) for b in batches)
    print(f"nano @ {args.size}, {n} validation images in batches of {args.batch}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as root:
        for state in ("prior", "busy"):
            module = DetectorModule(names, "nano")
            if state == "busy":
                make_busy(module)
            without, with_ = time_validate(module, batches, args.repeat, root)
            parts = breakdown(module, batches, root)
            alone = parts["gather+coco"] + parts["match+f1+figures"]
            print(
                f"{state:6s} validate {without:6.2f} s, with DetectionAnalysis {with_:6.2f} s: ratio {with_ / without:5.3f};"
                f" the analysis alone {alone:.3f} s: (validate + analysis) / validate {(without + alone) / without:5.3f}"
            )
            print("       " + "   ".join(f"{k} {v:.3f}" for k, v in parts.items()))  # fmt: skip


if __name__ == "__main__":
    main()
