"""Write a trained checkpoint in darknet's format: ``.weights`` with its ``.cfg`` and ``.names``.

    python -m detector.darknet_export export --ckpt runs/.../last.ckpt --out runs/export/model.weights

The format itself (reading and writing the layer arrays) is ``detector.models.darknet_weights``; this
command adds the Lightning checkpoint, so it lives outside the model layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .export import load_detector
from .models.darknet_cfg import cfg_text
from .models.darknet_weights import save_darknet


def export(ckpt: str | Path, out: str | Path, image_size: int | None = None) -> list[Path]:
    """Write a Lightning checkpoint's network as ``out`` (.weights) with its ``.cfg`` and ``.names`` next to it."""
    module, trained_size = load_detector(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = image_size or trained_size or 416
    files = [out, out.with_suffix(".cfg"), out.with_suffix(".names")]
    save_darknet(module.model, files[0])
    files[1].write_text(cfg_text(module.model, size))
    files[2].write_text("".join(f"{name}\n" for name in module.class_names))
    return files


def main(argv: list[str] | None = None) -> list[Path]:
    """``python -m detector.darknet_export export --ckpt X.ckpt --out Y.weights [--image-size S]``."""
    parser = argparse.ArgumentParser(prog="python -m detector.darknet_export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> darknet .weights + .cfg + .names")
    exp.add_argument("--ckpt", required=True, help="Lightning checkpoint of DetectorModule")
    exp.add_argument("--out", required=True, help="the .weights file to write (.cfg and .names go next to it)")
    exp.add_argument("--image-size", type=int, default=None, help="[net] width/height (default: training size or 416)")
    args = parser.parse_args(argv)
    files = export(args.ckpt, args.out, args.image_size)
    print("wrote " + ", ".join(map(str, files)))
    print(f"darknet: ./darknet detector test <data file> {files[1]} {files[0]} image.jpg")
    return files


if __name__ == "__main__":
    main()
