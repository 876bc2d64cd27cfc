import pytest
import torch

from detector.models import PRESETS, YOLOv3


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
