"""Darknet weights in and out, checked against darknet's own cfg files and file format.

The expected layouts below are written from pjreddie/darknet's ``cfg/yolov3-tiny.cfg`` and
``cfg/yolov3.cfg`` (section by section) and its ``src/parser.c`` (header, per-conv array order),
independently of ``detector.models.darknet_cfg``; the published file sizes of ``yolov3.weights``,
``yolov3-tiny.weights`` and ``darknet53.conv.74`` pin both.
"""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.darknet_export import main
from detector.models import YOLOv3
from detector.models.darknet_cfg import cfg_text, darknet_layers
from detector.models.darknet_weights import darknet_size, load_darknet, save_darknet

# Published sizes in bytes (pjreddie.com/media/files; AlexeyAB/darknet#1910 for yolov3.weights).
YOLOV3_BYTES, DARKNET53_CONV74_BYTES, TINY_BYTES = 248007048, 162482580, 35434956


def conv(filters: int, size: int, stride: int = 1, bn: bool = True) -> tuple:
    return ("convolutional", filters, size, stride, bn)


def tiny_cfg(classes: int) -> list[tuple]:
    """yolov3-tiny.cfg's 24 sections."""
    out = 3 * (5 + classes)
    s: list[tuple] = []
    for f in (16, 32, 64, 128, 256):
        s += [conv(f, 3), ("maxpool", 2, 2)]
    s = s[:-1] + [("maxpool", 2, 2), conv(512, 3), ("maxpool", 2, 1), conv(1024, 3)]
    s += [conv(256, 1), conv(512, 3), conv(out, 1, bn=False), ("yolo", "3,4,5"), ("route", "-4"), conv(128, 1)]
    s += [("upsample",), ("route", "-1, 8"), conv(256, 3), conv(out, 1, bn=False), ("yolo", "0,1,2")]
    return s


def yolov3_cfg(classes: int) -> list[tuple]:
    """yolov3.cfg's 107 sections."""
    s: list[tuple] = [conv(32, 3)]
    for c, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        s.append(conv(c, 3, 2))
        s += [conv(c // 2, 1), conv(c, 3), ("shortcut",)] * blocks
    for mid, feature, mask in ((512, None, "6,7,8"), (256, "61", "3,4,5"), (128, "36", "0,1,2")):
        if feature:
            s += [("upsample",), ("route", f"-1, {feature}")]
        s += [conv(mid, 1), conv(2 * mid, 3)] * 3 + [conv(3 * (5 + classes), 1, bn=False), ("yolo", mask)]
        if mid > 128:
            s += [("route", "-4"), conv(mid // 2, 1)]
    return s


def in_channels(sections: list[tuple]) -> list[int]:
    """Each section's input channels, as darknet's parser tracks them (route concatenates)."""
    ins, outs, c = [], [], 3
    for sec in sections:
        ins.append(c)
        if sec[0] == "convolutional":
            c = sec[1]
        elif sec[0] == "route":
            c = sum(outs[int(i)] if int(i) >= 0 else outs[len(outs) + int(i)] for i in sec[1].split(","))
        outs.append(c)
    return ins


def conv_shapes(sections: list[tuple]) -> list[tuple[int, int, int, bool]]:
    """(filters, input channels, size, batch_normalize) of every convolution, in cfg order."""
    return [(s[1], c, s[2], s[4]) for s, c in zip(sections, in_channels(sections)) if s[0] == "convolutional"]


def n_floats(shapes: list[tuple[int, int, int, bool]]) -> int:
    return sum(n * c * k * k + n * (4 if bn else 1) for n, c, k, bn in shapes)


def described(model: YOLOv3) -> list[tuple]:
    """Our darknet_layers in the same tuple form as the cfg descriptions above."""
    out: list[tuple] = []
    for layer in darknet_layers(model):
        o = layer.options
        if layer.kind == "convolutional":
            out.append(conv(int(o["filters"]), int(o["size"]), int(o["stride"]), o.get("batch_normalize") == "1"))
        elif layer.kind in ("route", "yolo"):
            out.append((layer.kind, o["layers"] if layer.kind == "route" else o["mask"]))
        elif layer.kind == "maxpool":
            out.append(("maxpool", int(o["size"]), int(o["stride"])))
        else:
            out.append((layer.kind,))
    return out


@pytest.fixture(scope="module")
def yolov3() -> YOLOv3:
    return YOLOv3(num_classes=80, preset="yolov3")


def test_yolov3_is_yolov3_cfg_section_by_section(yolov3: YOLOv3) -> None:
    cfg = yolov3_cfg(80)
    assert len(cfg) == 107 and cfg[74] == ("shortcut",) and cfg[86] == ("route", "-1, 61")
    assert described(yolov3) == cfg
    ours = [(c.conv.out_channels, c.conv.in_channels, c.conv.kernel_size[0], c.bn is not None)
            for c in darknet_layers(yolov3) if c.conv is not None]  # fmt: skip
    assert ours == conv_shapes(cfg)


def test_sizes_are_the_published_files(yolov3: YOLOv3) -> None:
    cfg = yolov3_cfg(80)
    assert 20 + 4 * n_floats(conv_shapes(cfg)) == YOLOV3_BYTES
    assert 20 + 4 * n_floats(conv_shapes(cfg)[:52]) == DARKNET53_CONV74_BYTES  # sections 0..73: 52 convs
    assert 20 + 4 * n_floats(conv_shapes(tiny_cfg(80))) == TINY_BYTES
    assert darknet_size(yolov3) == YOLOV3_BYTES and darknet_size(yolov3, cutoff=74) == DARKNET53_CONV74_BYTES
    tiny = YOLOv3(num_classes=80, preset="yolov3-tiny")
    assert described(tiny) == tiny_cfg(80) and darknet_size(tiny) == TINY_BYTES


def test_yolov3_backbone_only_file_loads(yolov3: YOLOv3, tmp_path: Path) -> None:
    save_darknet(yolov3, tmp_path / "darknet53.conv.74", cutoff=74)
    assert (tmp_path / "darknet53.conv.74").stat().st_size == DARKNET53_CONV74_BYTES
    keys = ("backbone.stem.0.weight", "backbone.stages.4.4.block.1.0.weight", "backbone.stages.2.0.1.weight")
    expected = {k: yolov3.state_dict()[k].clone() for k in keys}
    with torch.no_grad():
        for p in yolov3.parameters():
            p.zero_()
    assert "first 52 conv layers" in load_darknet(yolov3, tmp_path / "darknet53.conv.74")
    for k in keys:
        torch.testing.assert_close(yolov3.state_dict()[k], expected[k], rtol=1e-6, atol=0)
    assert not yolov3.heads[0][0][0].weight.any() and not yolov3.routes[1][0][1].weight.any()  # the head: untouched


# Our modules holding yolov3-tiny.cfg's 13 convolutions, in cfg order.
TINY_MODULES = ["backbone.to16.0", "backbone.to16.2", "backbone.to16.4", "backbone.to16.6", "backbone.to16.8",
                "backbone.to32.1", "backbone.to32.4", "sets.0.0", "heads.0.0", "heads.0.1", "routes.0.0",
                "heads.1.0", "heads.1.1"]  # fmt: skip


def tiny_arrays(classes: int) -> list[dict[str, np.ndarray]]:
    """Distinct float32 values per conv: beta, gamma, mean, var (some tiny) or bias; weight as arange."""
    arrays = []
    for i, (n, c, k, bn) in enumerate(conv_shapes(tiny_cfg(classes))):
        ch = np.arange(n, dtype=np.float32)
        a = {"bias": i + ch / 1000, "weight": ((np.arange(n * c * k * k) % 1000) / 1e4 + i).astype(np.float32)}
        if bn:
            var = (0.5 + ch / n).astype(np.float32)
            var[::7] = 1e-6  # where darknet's eps (1e-5) and ours (1e-3) differ most
            a |= {"gamma": (1 + i / 10 - ch / (2 * n)).astype(np.float32), "mean": -i - ch / 100, "var": var}
        arrays.append({key: v.astype(np.float32) for key, v in a.items()})
    return arrays


def write_file(path: Path, arrays: list[dict[str, np.ndarray]], header: bytes) -> None:
    """darknet's layout: the header, then per conv biases, [scales, rolling_mean, rolling_variance], weights."""
    order = ("bias", "gamma", "mean", "var", "weight")
    path.write_bytes(header + b"".join(a[k].astype("<f4").tobytes() for a in arrays for k in order if k in a))


HEADERS = {
    "0.2.0 int64 seen": (struct.pack("<3iq", 0, 2, 0, 5_000_000_000), 5_000_000_000),
    "0.1.0 int32 seen": (struct.pack("<4i", 0, 1, 0, 64_000), 64_000),
    "1.0.0 int64 seen": (struct.pack("<3iq", 1, 0, 0, 7), 7),
    "1000.2.0 int32 seen": (struct.pack("<4i", 1000, 2, 0, 9), 9),
}


@pytest.mark.parametrize("header", HEADERS, ids=list(HEADERS))
def test_independent_tiny_file_loads_into_the_expected_tensors(header: str, tmp_path: Path) -> None:
    arrays = tiny_arrays(classes=2)
    write_file(tmp_path / "tiny.weights", arrays, HEADERS[header][0])
    model = YOLOv3(num_classes=2, preset="yolov3-tiny")
    summary = load_darknet(model, tmp_path / "tiny.weights")
    assert "whole network" in summary and f"seen {HEADERS[header][1]}" in summary
    for path, a in zip(TINY_MODULES, arrays):
        module = model.get_submodule(path)
        conv_, bn = (module, None) if isinstance(module, torch.nn.Conv2d) else (module[0], module[1])
        assert torch.equal(conv_.weight.detach().flatten(), torch.from_numpy(a["weight"])), path
        if bn is None:
            assert torch.equal(conv_.bias.detach(), torch.from_numpy(a["bias"])), path
            continue
        var = torch.from_numpy(a["var"]).double()
        assert torch.equal(bn.bias.detach(), torch.from_numpy(a["bias"])), path
        assert torch.equal(bn.running_mean, torch.from_numpy(a["mean"])) and torch.equal(bn.running_var, var.float())
        gamma = torch.from_numpy(a["gamma"]).double() * (var + 1e-3).sqrt() / (var + 1e-5).sqrt()
        torch.testing.assert_close(bn.weight.detach().double(), gamma, rtol=1e-7, atol=0)
        x = torch.randn(2, bn.num_features, 3, 3)  # darknet's eval-mode batch norm, by hand
        ref = (x - torch.from_numpy(a["mean"])[:, None, None]) / (var.float()[:, None, None] + 1e-5).sqrt()
        ref = ref * torch.from_numpy(a["gamma"])[:, None, None] + torch.from_numpy(a["bias"])[:, None, None]
        torch.testing.assert_close(bn.eval()(x), ref, rtol=1e-5, atol=1e-5)


def test_tiny_prefix_file_leaves_the_rest_untouched(tmp_path: Path) -> None:
    arrays = tiny_arrays(classes=2)[:9]  # darknet partial yolov3-tiny.cfg ... yolov3-tiny.conv.15 15
    write_file(tmp_path / "yolov3-tiny.conv.15", arrays, HEADERS["0.2.0 int64 seen"][0])
    model = YOLOv3(num_classes=2, preset="yolov3-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "first 9 conv layers" in load_darknet(model, tmp_path / "yolov3-tiny.conv.15")
    loaded = {k for k in before if any(k.startswith(m + ".") for m in TINY_MODULES[:9])}
    assert len(loaded) == 9 * 6  # 9 conv-BN pairs: conv weight; BN weight, bias, mean, var, count
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in loaded if not k.endswith("num_batches_tracked")}


def randomised(preset: str, classes: int, seed: int) -> YOLOv3:
    torch.manual_seed(seed)
    model = YOLOv3(num_classes=classes, preset=preset)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(1e-6, 2.0), m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(("preset", "classes"), [("yolov3-tiny", 3), ("nano", 5)])
def test_round_trip_gives_the_same_outputs(preset: str, classes: int, tmp_path: Path) -> None:
    src = randomised(preset, classes, seed=0)
    n = save_darknet(src, tmp_path / "m.weights", seen=123)
    assert (tmp_path / "m.weights").stat().st_size == 20 + 4 * n == darknet_size(src)
    dst = randomised(preset, classes, seed=1)
    assert "seen 123" in load_darknet(dst, tmp_path / "m.weights")
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(src(images), dst(images)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, v in src.state_dict().items():  # bit-exact, but BN gamma (converted to darknet's eps and back)
        if k.endswith(".weight") and v.ndim == 1:
            torch.testing.assert_close(dst.state_dict()[k], v, rtol=1e-6, atol=0)
        else:
            assert torch.equal(dst.state_dict()[k], v), k


def test_whole_file_for_other_classes_skips_only_the_output_convs(tmp_path: Path) -> None:
    src = randomised("nano", 80, seed=0)
    save_darknet(src, tmp_path / "coco.weights")
    dst = randomised("nano", 3, seed=1)
    outputs_before = [h[1].weight.clone() for h in dst.heads]
    summary = load_darknet(dst, tmp_path / "coco.weights")
    assert "whole network; 3 output convs for 80 classes skipped (model: 3)" in summary
    assert all(torch.equal(h[1].weight, w) for h, w in zip(dst.heads, outputs_before))
    assert torch.equal(dst.heads[2][0][0].weight, src.heads[2][0][0].weight)
    assert torch.equal(dst.routes[1][0][1].running_var, src.routes[1][0][1].running_var)


def test_backbone_only_file_leaves_the_head_untouched(tmp_path: Path) -> None:
    # nano's Darknet-53: stem, 5 stride-2 convs, 7 residual blocks (3 sections each) = 27 sections
    src = randomised("nano", 3, seed=0)
    save_darknet(src, tmp_path / "nano.conv.26", cutoff=26)  # the cutoff from the name
    (tmp_path / "backbone.weights").write_bytes((tmp_path / "nano.conv.26").read_bytes())  # from the size
    for name in ("nano.conv.26", "backbone.weights"):
        dst = randomised("nano", 3, seed=1)
        before = {k: v.clone() for k, v in dst.state_dict().items()}
        assert "first 20 conv layers" in load_darknet(dst, tmp_path / name)
        for k, v in dst.state_dict().items():
            expected = src.state_dict()[k] if k.startswith("backbone.") and "num_batches" not in k else before[k]
            torch.testing.assert_close(v, expected, rtol=1e-6, atol=0)


def test_files_that_do_not_fit_are_one_line_errors(tmp_path: Path) -> None:
    model = randomised("nano", 3, seed=0)
    save_darknet(model, tmp_path / "m.weights")
    full = (darknet_size(model) - 20) // 4
    data = (tmp_path / "m.weights").read_bytes()
    cases = {
        "short.weights": (data[:-4], f"holds {full - 1} floats, but preset 'nano' with 3 classes takes {full} "),
        "long.weights": (data + data[-4:], f"holds {full + 1} floats, .* takes {full} \\(whole network, 37 conv\\)"),
        "odd.weights": (data[:-2], "is not a whole number of float32"),
        "tiny.weights": (data[:12], "too short \\(12 bytes\\)"),
        "nano.conv.15": (data, f"holds {full} floats, but the first 15 darknet layers \\(12 conv\\)"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as err:
            load_darknet(YOLOv3(num_classes=3, preset="nano"), tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="preset 'yolov3-tiny'"):
        load_darknet(YOLOv3(num_classes=3, preset="yolov3-tiny"), tmp_path / "m.weights")


def test_model_weights_tells_darknet_from_torch_files(tmp_path: Path) -> None:
    src = randomised("nano", 3, seed=0)
    save_darknet(src, tmp_path / "d.weights")
    torch.save(src.state_dict(), tmp_path / "t.weights")  # a torch file, whatever its name
    for name in ("d.weights", "t.weights"):
        dst = YOLOv3(num_classes=3, preset="nano", weights=str(tmp_path / name))
        torch.testing.assert_close(dst.heads[0][0][1].running_var, src.heads[0][0][1].running_var, rtol=0, atol=0)


def parse_cfg(text: str) -> list[tuple[str, dict[str, str]]]:
    sections: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        if line.startswith("["):
            sections.append((line.strip("[]"), {}))
        elif "=" in line:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip()] = value.strip()
    return sections


def test_export_writes_weights_cfg_and_names(tmp_path: Path) -> None:
    src = randomised("yolov3-tiny", 3, seed=0)
    hp = {"class_names": ["car", "dog", "kite"], "preset": "yolov3-tiny"}
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "hyper_parameters": hp},
               tmp_path / "last.ckpt")  # fmt: skip
    files = main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out/tiny.weights")])
    assert [f.name for f in files] == ["tiny.weights", "tiny.cfg", "tiny.names"]
    assert files[2].read_text() == "car\ndog\nkite\n"
    cfg = parse_cfg(files[1].read_text())
    assert cfg[0] == ("net", {"batch": "1", "subdivisions": "1", "width": "416", "height": "416", "channels": "3"})
    expected = tiny_cfg(3)
    assert [kind for kind, _ in cfg[1:]] == [s[0] for s in expected]
    for (kind, opts), sec in zip(cfg[1:], expected):
        if kind == "convolutional":
            assert (opts["filters"], opts["size"], opts["stride"], opts["pad"]) == (
                str(sec[1]),
                str(sec[2]),
                str(sec[3]),
                "1",
            )
            assert (opts.get("batch_normalize"), opts["activation"]) == (("1", "leaky") if sec[4] else (None, "linear"))
        if kind == "yolo":
            assert opts["mask"] == sec[1] and (opts["classes"], opts["num"]) == ("3", "6")
            assert opts["anchors"] == "10,14,  23,27,  37,58,  81,82,  135,169,  344,319"
    assert [opts["layers"] for kind, opts in cfg[1:] if kind == "route"] == ["-4", "-1, 8"]
    dst = YOLOv3(num_classes=3, preset="yolov3-tiny", weights=str(files[0])).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src(images), dst(images)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "width=320\nheight=320\n" in cfg_text(src, 320)
    for bad in (300, 0, -32):
        with pytest.raises(ValueError) as err:
            cfg_text(src, bad)
        assert str(err.value) == f"image_size must be a positive multiple of 32 (the largest stride), got {bad}"


def test_tiny_stride1_pool_ignores_cells_past_the_edge() -> None:
    # darknet's maxpool (size 2, stride 1) skips the out-of-bounds cells: the last row/column keeps its value
    pool = YOLOv3(num_classes=1, preset="yolov3-tiny").backbone.to32[2:4]
    x = -torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # negative, as leaky-ReLU outputs may be
    expected = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]])
    assert torch.equal(pool(x)[0, 0], expected)
