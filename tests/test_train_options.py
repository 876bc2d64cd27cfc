"""Training switches: bf16-mixed on CPU, channels_last and torch.compile as module arguments."""

from pathlib import Path

import lightning as L
import pytest
import torch

from detector.data import DetectionDataModule
from detector.data.shapes import ShapesConfig
from detector.module import DetectorModule


def _data(tmp_path: Path) -> DetectionDataModule:
    return DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=8, num_val=4),
                               image_size=64, batch_size=4, num_workers=0)  # fmt: skip


def _fit(model: DetectorModule, dm: DetectionDataModule, **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip
    trainer.fit(model, dm)
    return trainer


def test_bf16_mixed_runs_on_cpu(tmp_path: Path) -> None:
    dm = _data(tmp_path)
    model = DetectorModule(dm.class_names, "nano", warmup_epochs=0)
    before = model.model.heads[0][-1].weight.detach().clone()
    trainer = _fit(model, dm, precision="bf16-mixed")
    assert trainer.global_step == 2 and model.nonfinite_skipped == 0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    weight = model.model.heads[0][-1].weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), before)  # float32 master weights moved


def test_channels_last_same_outputs_and_trains(tmp_path: Path) -> None:
    dm = _data(tmp_path)
    plain = DetectorModule(dm.class_names, "nano").eval()
    cl = DetectorModule(dm.class_names, "nano", channels_last=True).eval()
    cl.load_state_dict(plain.state_dict())
    conv = next(p for p in cl.model.parameters() if p.ndim == 4 and p.shape[-1] == 3 and p.shape[1] > 1)  # a 3x3 conv
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(images), cl(images)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert _fit(cl.train(), dm).global_step == 2


def test_compile_keeps_state_dict_keys_and_outputs(tmp_path: Path) -> None:
    plain = DetectorModule(["a", "b"], "nano").eval()
    compiled = DetectorModule(["a", "b"], "nano", compile="eager").eval()  # dynamo tracing, no code generation
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints interchangeable
    compiled.load_state_dict(plain.state_dict())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(images), compiled(images)):
            assert torch.allclose(a, b, atol=1e-5)


def test_bad_nonfinite_mode() -> None:
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'stop'"):
        DetectorModule(["a"], "nano", nonfinite="ignore")
