"""Export a trained detector to ONNX, decoding included and NMS optional.

    python -m detector.export --ckpt runs/.../last.ckpt --format onnx            # boxes + scores
    python -m detector.export --ckpt runs/.../last.ckpt --format onnx --nms      # final detections

Without ``--nms`` the graph maps ``images float32 [B, 3, S, S]`` (0..1, letterboxed) to
``boxes [B, N, 4]`` (xyxy input pixels) and ``scores [B, N, C]`` (``σ(obj)·σ(cls)``), N the
anchors of all scales. With ``--nms`` it ends with the evaluation's post-processing
(``detector.ops.postprocess``: best ``max_candidates`` pairs per image above ``conf_thresh``,
class-aware NMS, ``max_det`` per image) and returns ``detections [K, 7]`` =
(image index, x1, y1, x2, y2, score, label), grouped by image, by descending score within one.
The checkpoint is read with ``torch.load(weights_only=True)``; an EMA run's ``state_dict`` holds
the averaged weights, which are the ones exported. ``--check`` compares onnxruntime with PyTorch.
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .models import YOLOv3
from .module import DetectorModule
from .ops.boxes import anchor_grid, decode, detection_scores, flatten_outputs


class DecodedYOLO(nn.Module):
    """``images [B, 3, S, S]`` -> ``boxes [B, N, 4]`` xyxy pixels, ``scores [B, N, C]``, for one input size S.

    With ``nms`` the output is ``detections [K, 7]`` instead (see the module docstring).
    """

    cells: Tensor  # (N, 2) grid cell of each anchor row
    anchor_wh: Tensor  # (N, 2) pixels
    steps: Tensor  # (N, 1) stride

    def __init__(self, model: YOLOv3, image_size: int, nms: bool = False, conf_thresh: float = 0.001,
                 nms_iou: float = 0.6, max_det: int = 100, max_candidates: int = 3000) -> None:  # fmt: skip
        super().__init__()
        if image_size <= 0 or image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
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
        raw = flatten_outputs(self.model(images)).float()  # (B, N, 5 + C)
        boxes = decode(raw, self.cells, self.anchor_wh, self.steps)  # (B, N, 4)
        scores = detection_scores(raw)  # (B, N, C)
        return boxes, scores

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        """``(boxes [B, N, 4], scores [B, N, C])``; with ``nms`` the detections ``[K, 7]`` of :func:`nms_detections`."""
        boxes, scores = self.decoded(images)
        if not self.nms:
            return boxes, scores
        return nms_detections(boxes, scores, self.conf_thresh, self.nms_iou, self.max_det, self.max_candidates)


def nms_detections(
    boxes: Tensor, scores: Tensor, conf_thresh: float, iou: float, max_det: int, max_candidates: int
) -> Tensor:
    """``detector.ops.postprocess`` in exportable operations: ``boxes [B, N, 4]``, ``scores [B, N, C]`` ->
    ``[K, 7]`` (image, x1, y1, x2, y2, score, label), by image, then by descending score.

    The per-image ``max_det`` cap counts each image's survivors with a cumulative sum over an
    image-indicator matrix ``[K, B]`` instead of ``bincount`` and Python splits.
    """
    b_n, n_cls = scores.shape[0], scores.shape[2]
    flat = scores.flatten(1)  # (B, N·C)
    top, idx = flat.topk(min(max_candidates, flat.shape[1]), dim=1)  # (B, K0)
    keep = top > conf_thresh
    img = torch.arange(b_n, device=boxes.device)[:, None].expand_as(idx)[keep]
    row, label, score = idx[keep] // n_cls, idx[keep] % n_cls, top[keep]
    cand = boxes[img, row]  # (K1, 4)
    kept = batched_nms(cand, score, img * n_cls + label, iou)  # (K2,) by descending score
    same = img[kept][:, None] == torch.arange(b_n, device=boxes.device)[None]  # (K2, B)
    rank = (same.long().cumsum(0) * same.long()).sum(1) - 1  # rank of each survivor in its image
    kept = kept[rank < max_det]
    order = torch.argsort(img[kept].float() * 2.0 - score[kept])  # image ascending, score descending
    kept = kept[order]
    return torch.cat([img[kept, None].float(), cand[kept], score[kept, None], label[kept, None].float()], 1)


def load_detector(ckpt: str | Path) -> tuple[DetectorModule, int | None]:
    """The DetectorModule of a checkpoint (``weights_only`` load, network weights only) and the
    training image size when the checkpoint records its datamodule's hyper-parameters."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in state or "hyper_parameters" not in state:
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint of DetectorModule (no state_dict/hyper_parameters)"
        )
    hp = state["hyper_parameters"]
    accepted = set(inspect.signature(DetectorModule).parameters) - {"weights", "loss", "compile", "channels_last"}
    module = DetectorModule(**{k: v for k, v in hp.items() if k in accepted})
    net = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    module.model.load_state_dict(net)
    size = state.get("datamodule_hyper_parameters", {}).get("image_size")
    return module.eval(), size


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
