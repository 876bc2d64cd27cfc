"""ONNX export: onnxruntime gives PyTorch's decoded boxes and scores, and the evaluation's detections with --nms."""

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.export import DecodedYOLO, load_detector, main
from detector.module import DetectorModule
from detector.ops.postprocess import postprocess

# The export needs the [export] extra (pip install -e ".[export]"), which `pip install -e ".[dev]"`
# does not bring: without it these tests skip with this reason instead of breaking collection.
_EXTRA = 'ONNX export needs the export extra: pip install -e ".[export]"'
pytest.importorskip("onnx", reason=_EXTRA)
pytest.importorskip("onnxscript", reason=_EXTRA)
ort = pytest.importorskip("onnxruntime", reason=_EXTRA)

SIZE = 64
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as Lightning writes it (state_dict, hyper_parameters, the datamodule's), GHM-C buffers included."""
    torch.manual_seed(0)
    module = DetectorModule(NAMES, "nano", conf_thresh=0.02, nms_iou=0.5, max_det=7)
    with torch.no_grad():  # spread the scores so that NMS and the max_det cap both act
        module.model.heads[-1][-1].bias.normal_(0, 2)
    path = tmp_path_factory.mktemp("export") / "model.ckpt"
    state = {
        **module.state_dict(),
        "criterion.objectness.acc": torch.ones(30),
    }  # a stateful loss's buffer: not exported
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"image_size": SIZE}}, path)  # fmt: skip
    return path


def _images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_decoded_outputs_match(ckpt: Path, tmp_path: Path) -> None:
    out = main(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.onnx")])
    module, size = load_detector(ckpt)
    assert size == SIZE and module.hparams.max_det == 7
    boxes, scores = ort.InferenceSession(str(out)).run(None, {"images": _images().numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores = DecodedYOLO(module.model, SIZE).decoded(_images())
    n = 3 * ((SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2)
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 3)
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-6, rtol=1e-5)


def test_nms_graph_matches_evaluation_postprocess(ckpt: Path, tmp_path: Path) -> None:
    out = main(["--ckpt", str(ckpt), "--nms", "--output", str(tmp_path / "nms.onnx")])
    (dets,) = ort.InferenceSession(str(out)).run(None, {"images": _images().numpy()})
    module, _ = load_detector(ckpt)
    with torch.no_grad():
        ref = postprocess(module.model(_images()), module.model.anchors, module.model.strides, 0.02, 0.5, 7)
    assert [len(r["scores"]) for r in ref] == [7, 7]  # the cap acted: the test covers it
    assert list(dets[:, 0]) == [0.0] * 7 + [1.0] * 7
    for i, r in enumerate(ref):
        mine = dets[dets[:, 0] == i]
        np.testing.assert_allclose(mine[:, 1:5], r["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(mine[:, 5], r["scores"].numpy(), atol=1e-6)
        np.testing.assert_array_equal(mine[:, 6], r["labels"].numpy())


def test_dynamic_batch_and_check_flag(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = main(["--ckpt", str(ckpt), "--output", str(tmp_path / "c.onnx"), "--check"])
    diff = float(capsys.readouterr().out.split("max abs difference ")[1])
    assert diff < 1e-3
    boxes, _ = ort.InferenceSession(str(out)).run(None, {"images": torch.rand(3, 3, SIZE, SIZE).numpy()})
    assert boxes.shape[0] == 3


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--ckpt", str(tmp_path / "nope.ckpt")])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {str(tmp_path / 'nope.ckpt')!r} does not exist"
