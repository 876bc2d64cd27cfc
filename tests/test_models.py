import pytest
import torch
from torch import nn

from detector.models import PRESETS, Backbone, YOLOv3
from detector.models.layers import ConvBNAct


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_shapes_every_preset(preset: str) -> None:
    model = YOLOv3(num_classes=7, preset=preset).eval()
    outs = model(torch.rand(2, 3, 256, 320))
    assert len(outs) == len(model.strides) == len(PRESETS[preset].anchors)
    for out, stride in zip(outs, model.strides):
        assert out.shape == (2, 3, 256 // stride, 320 // stride, 5 + 7)


def test_every_parameter_gets_a_gradient() -> None:
    model = YOLOv3(num_classes=3, preset="nano")
    sum(o.square().mean() for o in model(torch.rand(2, 3, 64, 64))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_full_yolov3_is_darknet53_sized() -> None:
    # YOLOv3-416 on COCO has 61.9 M parameters (darknet's yolov3.cfg); 80 classes here too.
    n = sum(p.numel() for p in YOLOv3(num_classes=80, preset="yolov3").parameters())
    assert 61.0e6 < n < 62.5e6


def test_prior_bias_of_objectness() -> None:
    model = YOLOv3(num_classes=4, preset="nano")
    bias = model.heads[0][-1].bias.view(3, -1)  # deepest scale first in self.heads
    assert torch.allclose(bias[:, 4], torch.full((3,), torch.log(torch.tensor(8 / 13**2)).item()), atol=1e-5)


def test_bad_preset_and_anchors_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'yolov4'.*nano"):
        YOLOv3(num_classes=3, preset="yolov4")
    with pytest.raises(ValueError, match="needs 3 scales"):
        YOLOv3(num_classes=3, preset="nano", anchors=[[(10, 10)]])


def test_load_local_weights(tmp_path) -> None:
    src = YOLOv3(num_classes=3, preset="nano")
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.ckpt")
    dst = YOLOv3(num_classes=5, preset="nano", weights=str(tmp_path / "w.ckpt"))  # heads differ: skipped
    assert torch.equal(dst.backbone.stem[0].weight, src.backbone.stem[0].weight)
    assert dst.heads[0][-1].weight.shape[0] == 3 * 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        YOLOv3(num_classes=3, weights=str(tmp_path / "missing.pt"))


class _Strided(Backbone):
    """A small backbone of stride-2 convs returning maps of ``widths`` channels from stride ``first`` on."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 40), first: int = 8) -> None:
        super().__init__()
        chans = [3] + [8] * (first.bit_length() - 2) + list(widths)  # 8 channels at strides 2 .. first/2
        self.convs = nn.ModuleList(ConvBNAct(c_in, c_out, 3, 2) for c_in, c_out in zip(chans, chans[1:]))
        self.out_channels = list(widths)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], images
        for conv in self.convs:
            x = conv(x)
            feats.append(x)
        return feats[-len(self.out_channels) :]


def test_injected_backbone_is_used_with_the_presets_neck() -> None:
    backbone = _Strided()
    model = YOLOv3(num_classes=4, preset="nano", backbone=backbone)
    assert model.backbone is backbone and model.strides == [8, 16, 32]
    # the first conv of each conv set (deep first) takes the backbone map (+ half the deeper mid, upsampled)
    assert [cset[0][0].in_channels for cset in model.sets] == [
        40,
        24 + 128 // 2,
        16 + 64 // 2,
    ]  # nano: mids 32, 64, 128
    outs = model(torch.rand(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 64 // s, 96 // s, 9) for s in (8, 16, 32)]
    sum(o.square().mean() for o in outs).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_injecting_the_presets_own_backbone_is_the_preset() -> None:
    """Same parameters, same initialisation under the same seed: the default builds its backbone first too."""
    for preset in PRESETS:
        torch.manual_seed(3)
        own = YOLOv3(num_classes=5, preset=preset).state_dict()
        torch.manual_seed(3)
        given = YOLOv3(num_classes=5, preset=preset, backbone=PRESETS[preset].backbone()).state_dict()
        assert list(own) == list(given) and all(torch.equal(own[k], given[k]) for k in own)


def test_two_scale_backbone_needs_a_two_scale_preset() -> None:
    model = YOLOv3(num_classes=2, preset="yolov3-tiny", backbone=_Strided((32, 48), first=16))
    assert [tuple(o.shape[2:4]) for o in model(torch.rand(1, 3, 64, 64))] == [(4, 4), (2, 2)]
    with pytest.raises(ValueError, match=r"returns 2 feature maps .* preset 'nano' has 3 scales; .* \['yolov3-tiny'\]"):
        YOLOv3(num_classes=2, preset="nano", backbone=_Strided((32, 48), first=16))


def test_backbone_mistakes_are_clear_errors() -> None:
    bare = Backbone()
    with pytest.raises(ValueError, match="backbone Backbone must set out_channels"):
        YOLOv3(num_classes=2, backbone=bare)
    off = YOLOv3(num_classes=2, backbone=_Strided(first=16))  # maps at strides 16, 32, 64
    with pytest.raises(ValueError, match=r"deepest feature map is \(1, 1\) for a \(64, 64\) input, not 2, 2"):
        off(torch.rand(2, 3, 64, 64))
