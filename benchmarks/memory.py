"""Peak memory of a training step, per model preset and batch size.

    python benchmarks/memory.py                                    # CPU: nano and yolov3, batch 1, 8, 16
    python benchmarks/memory.py --presets nano --batches 4 16
    python benchmarks/memory.py --device cuda --precision bf16-mixed

Each (preset, batch) runs in a fresh subprocess: build the network, the default YOLO loss and SGD
(Nesterov momentum), one warm-up step, then one measured step (forward, assignment + loss,
backward, optimizer step) on a synthetic batch (20 boxes per image).
  - CPU: ``ru_maxrss`` (peak resident memory) of the child after the measured step, and before its
    first step (weights and batch only): the difference is what training adds, i.e. gradients,
    optimizer state and the step's activations (tracemalloc does not see torch's allocations);
  - CUDA: ``torch.cuda.max_memory_allocated`` during the measured step, and the memory held by
    weights, gradients and optimizer state between steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_targets

from detector.losses import YOLOLoss
from detector.models import YOLOv3

SIZES = {"nano": 320, "yolov3": 416, "yolov3-tiny": 416}
MB = 2**20


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(preset: str, batch: int, device: str, precision: str, channels_last: bool) -> dict[str, float]:
    """One measurement (run in its own process)."""
    size = SIZES[preset]
    torch.manual_seed(0)
    net = YOLOv3(80, preset).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    loss_fn = YOLOLoss()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.937, nesterov=True, weight_decay=5e-4)
    images = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{k: v.to(device) for k, v in t.items()} for t in synthetic_targets(batch, size, 20, 80)]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = net(images)
        loss_fn([o.float() for o in outputs], targets, net.anchors, net.strides)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = _rss_mb()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        steady = torch.cuda.memory_allocated() / MB
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() / MB, "steady": steady}
    step()
    return {"peak": _rss_mb(), "steady": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["nano", "yolov3"], choices=sorted(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, args.precision, args.channels_last)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda but torch sees no GPU\n")
    what = "max_memory_allocated" if args.device == "cuda" else "maxrss"
    print(
        f"torch {torch.__version__}, device {args.device}, precision {args.precision}, channels_last {args.channels_last}"
    )
    if args.device == "cuda":
        print(
            "| preset @ size | batch | peak during a step (MiB) | weights + grads + optimizer (MiB) | activations ≈ (MiB) |"
        )
    else:
        print("| preset @ size | batch | peak RSS (MiB) | RSS before the first step (MiB) | the step adds (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for preset in args.presets:
        for batch in args.batches:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                preset,
                str(batch),
                "--device",
                args.device,
                "--precision",
                args.precision,
            ]
            cmd += ["--channels-last"] if args.channels_last else []
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                print(f"| {preset} @ {SIZES[preset]} | {batch} | failed: {proc.stderr.strip().splitlines()[-1]} | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {preset} @ {SIZES[preset]} | {batch} | {r['peak']:.0f} | {r['steady']:.0f} | {r['peak'] - r['steady']:.0f} |",
                  flush=True)  # fmt: skip
    print(f"({what}; each row a fresh process)")


if __name__ == "__main__":
    main()
