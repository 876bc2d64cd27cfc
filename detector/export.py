"""Export a trained detector to ONNX, decoding included and NMS optional.

    python -m detector.export --ckpt runs/.../last.ckpt --format onnx            # boxes + scores
    python -m detector.export --ckpt runs/.../last.ckpt --format onnx --nms      # final detections

Without ``--nms`` the graph maps ``images float32 [B, 3, S, S]`` (0..1, letterboxed) to
``boxes [B, N, 4]`` (xyxy input pixels) and ``scores [B, N, C]`` (``σ(obj)·σ(cls)``), N the
anchors of all scales. With ``--nms`` it ends with the evaluation's own post-processing
(``detector.ops.postprocess.detections``: best 1000 pairs per image above ``conf_thresh``,
class-aware NMS, ``max_det`` per image) and returns ``detections [K, 7]`` =
(image index, x1, y1, x2, y2, score, label), grouped by image, by descending score within one.

The network is rebuilt from the checkpoint's hyper-parameters (:func:`load_detector`), an injected
backbone included (its class must be importable, as at training time), then given the checkpoint's
weights; the checkpoint is read with ``torch.load(weights_only=True)``. An EMA run's ``state_dict``
holds the averaged weights, which are the ones exported. ``--check`` compares onnxruntime with PyTorch.
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import instantiate_module
from torch import Tensor, nn

from .models import YOLOv3
from .module import DetectorModule
from .ops.boxes import anchor_grid
from .ops.postprocess import MAX_CANDIDATES, boxes_and_scores, detections
from .structures import check_image_size

# Settings that do not shape the network: export builds it eager and in the default memory format,
# gives it the checkpoint's weights (not the pretrained file it started from) and trains nothing.
NOT_THE_NETWORK = {"weights": None, "compile": False, "channels_last": False, "optimizer": None, "lr_scheduler": None}


class DecodedYOLO(nn.Module):
    """``images [B, 3, S, S]`` -> ``boxes [B, N, 4]`` xyxy pixels, ``scores [B, N, C]``, for one input size S.

    With ``nms`` the output is ``detections [K, 7]`` instead (see the module docstring).
    """

    cells: Tensor  # (N, 2) grid cell of each anchor row
    anchor_wh: Tensor  # (N, 2) pixels
    steps: Tensor  # (N, 1) stride

    def __init__(self, model: YOLOv3, image_size: int, nms: bool = False, conf_thresh: float = 0.001,
                 nms_iou: float = 0.6, max_det: int = 100, max_candidates: int = MAX_CANDIDATES) -> None:  # fmt: skip
        super().__init__()
        check_image_size(image_size)
        self.model, self.nms = model, nms
        self.conf_thresh, self.nms_iou = conf_thresh, nms_iou
        self.max_det, self.max_candidates = max_det, max_candidates
        shapes = [(image_size // s, image_size // s) for s in model.strides]
        cells, anchor_wh, steps = anchor_grid(shapes, model.anchors, model.strides)  # (N, 2), (N, 2), (N, 1)
        self.register_buffer("cells", cells, persistent=False)
        self.register_buffer("anchor_wh", anchor_wh, persistent=False)
        self.register_buffer("steps", steps, persistent=False)

    def decoded(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images [B, 3, S, S]`` -> ``boxes [B, N, 4]`` xyxy input pixels, ``scores [B, N, C]`` (obj x class)."""
        return boxes_and_scores(self.model(images), self.cells, self.anchor_wh, self.steps)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        """``(boxes [B, N, 4], scores [B, N, C])``; with ``nms`` the detections ``[K, 7]`` (see the module docstring)."""
        boxes, scores = self.decoded(images)
        if not self.nms:
            return boxes, scores
        img, boxes, scores, labels = detections(
            boxes, scores, self.conf_thresh, self.nms_iou, self.max_det, self.max_candidates
        )
        return torch.cat([img[:, None].float(), boxes, scores[:, None], labels[:, None].float()], 1)


def load_detector(ckpt: str | Path) -> tuple[DetectorModule, int | None]:
    """The DetectorModule of a checkpoint, in eval mode, and the training image size when the checkpoint
    records its datamodule's hyper-parameters.

    The module is rebuilt from the saved hyper-parameters as ``load_from_checkpoint`` does (Lightning's
    ``instantiate_module``, which also builds injected parts from their ``class_path``), with the
    settings of ``NOT_THE_NETWORK`` replaced; then the network (``model.*``) gets the checkpoint's
    weights, strictly. Training-only state (a stateful loss's buffers) is not the network's.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in state or "hyper_parameters" not in state:
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint of DetectorModule (no state_dict/hyper_parameters)"
        )
    try:
        module = rebuild(state["hyper_parameters"])
    except ArgumentError as err:  # e.g. a backbone class that cannot be imported here
        reason = " ".join(str(err).split())
        raise ValueError(
            f"cannot rebuild the model of {str(path)!r} from its hyper-parameters: {reason[:400]}"
        ) from err
    net = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    try:
        module.model.load_state_dict(net)
    except RuntimeError as err:  # a backbone given in Python is not a hyper-parameter: the preset's was rebuilt
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"the network rebuilt from the hyper-parameters of {str(path)!r} does not fit its weights ({first} "
            f"{' '.join(str(err).split())[len(first) : len(first) + 200]} ...); was its backbone given in Python?"
        ) from err
    size = state.get("datamodule_hyper_parameters", {}).get("image_size")
    return module.eval(), size


def rebuild(hparams: dict[str, Any]) -> DetectorModule:
    """A DetectorModule from saved hyper-parameters: those its constructor takes (older checkpoints may
    hold others, e.g. ``momentum``), ``NOT_THE_NETWORK`` replaced, built through jsonargparse."""
    accepted = inspect.signature(DetectorModule).parameters
    config = {k: v for k, v in hparams.items() if k in accepted} | NOT_THE_NETWORK
    return instantiate_module(DetectorModule, config)


def export_onnx(wrapper: DecodedYOLO, output: Path, image_size: int, opset: int = 17) -> None:
    """Write ``wrapper`` as ONNX with a dynamic batch axis (TorchScript-based exporter: the NMS graph
    has data-dependent shapes, which it maps to ONNX's NonZero and NonMaxSuppression)."""
    example = torch.rand(1, 3, image_size, image_size)
    names = ["detections"] if wrapper.nms else ["boxes", "scores"]
    axes = {"images": {0: "batch"}} | ({"detections": {0: "num"}} if wrapper.nms else {n: {0: "batch"} for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and advanced-indexing notes
        torch.onnx.export(wrapper.eval(), (example,), str(output), input_names=["images"], output_names=names,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)  # fmt: skip


def check_onnx(wrapper: DecodedYOLO, output: Path, images: Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs on ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = wrapper(images)
    ref = [ref] if isinstance(ref, Tensor) else list(ref)
    if any(tuple(g.shape) != tuple(r.shape) for g, r in zip(got, ref)):
        raise ValueError(
            f"onnxruntime shapes {[g.shape for g in got]} differ from PyTorch's {[tuple(r.shape) for r in ref]}"
        )
    return max(float((torch.from_numpy(g) - r).abs().max()) if r.numel() else 0.0 for g, r in zip(got, ref))


def main(argv: list[str] | None = None) -> Path:
    """Command line: export ``--ckpt`` to ONNX, check it against PyTorch with onnxruntime, return the file written."""
    parser = argparse.ArgumentParser(description="Export a DetectorModule checkpoint to ONNX (decoding included).")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--output", help="output file (default: the checkpoint's path with .onnx)")
    parser.add_argument("--nms", action="store_true", help="end the graph with confidence filter + class-aware NMS")
    parser.add_argument("--image-size", type=int, help="input side (default: the training image size)")
    parser.add_argument("--conf-thresh", type=float, help="default: the checkpoint's model.conf_thresh")
    parser.add_argument("--nms-iou", type=float, help="default: the checkpoint's model.nms_iou")
    parser.add_argument("--max-det", type=int, help="default: the checkpoint's model.max_det")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on 2 random images")
    args = parser.parse_args(argv)
    try:
        module, trained_size = load_detector(args.ckpt)
        size = args.image_size or trained_size
        if size is None:
            raise ValueError("the checkpoint does not record the image size: pass --image-size")
        hp = module.hparams
        wrapper = DecodedYOLO(module.model, size, args.nms, _pick(args.conf_thresh, hp["conf_thresh"]),
                              _pick(args.nms_iou, hp["nms_iou"]), int(_pick(args.max_det, hp["max_det"])))  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    output = Path(args.output) if args.output else Path(args.ckpt).with_suffix(".onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(wrapper, output, size, args.opset)
    print(
        f"wrote {output} ({'detections [K, 7]' if args.nms else 'boxes [B, N, 4], scores [B, N, C]'}, input {size} px)"
    )
    if args.check:
        print(
            f"onnxruntime vs PyTorch: max abs difference {check_onnx(wrapper, output, torch.rand(2, 3, size, size)):.2e}"
        )
    return output


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


if __name__ == "__main__":
    main()
