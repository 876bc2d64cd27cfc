"""EMA of the weights: the update formula, and that validation and checkpoints use the averaged weights."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from detector.callbacks import EMA
from detector.callbacks.ema import ema_multi_avg_fn
from detector.data import DetectionDataModule
from detector.data.shapes import ShapesConfig
from detector.module import DetectorModule


def test_update_formula_with_ramp() -> None:
    decay, tau = 0.9, 2.0
    update = ema_multi_avg_fn(decay, tau)
    ema, w = [torch.tensor([1.0, 4.0])], [torch.tensor([3.0, 4.0])]
    update(ema, w, torch.tensor(1))
    d = decay * (1 - math.exp(-1 / tau))
    assert torch.allclose(ema[0], torch.tensor([d * 1 + (1 - d) * 3, 4.0]), atol=0, rtol=1e-6)
    assert ema[0][1].item() == 4.0  # equal values stay bit-identical (the anchors)
    counts = [torch.tensor([5])]
    update(counts, [torch.tensor([7])], 3)  # integer buffers are copied
    assert counts[0].item() == 7
    flat = ema_multi_avg_fn(0.5, 0)  # no ramp: the plain EMA
    x = [torch.tensor([0.0])]
    flat(x, [torch.tensor([1.0])], 10)
    assert x[0].item() == 0.5


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"warmup_steps": -1}, {"update_every_n_steps": 0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="EMA"):
        EMA(**kwargs)


def _quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_validation_and_checkpoint_use_the_averaged_weights(tmp_path: Path) -> None:
    dm = DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=8, num_val=4),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    model = DetectorModule(dm.class_names, "nano", lr=0.02, warmup_epochs=0)
    ema = EMA(decay=0.5, warmup_steps=0)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _quiet_trainer(max_epochs=2, check_val_every_n_epoch=2, num_sanity_val_steps=0, callbacks=[ema, ckpt_cb])
    trainer.fit(model, dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert int(ema._average_model.n_averaged) == 4  # 2 epochs x 2 steps
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # ShapesConfig is a safe global
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    key = "model.heads.0.1.weight"
    assert (averaged[key] - raw[key]).abs().max() > 1e-4  # the EMA is not the raw model
    for k, v in model.state_dict().items():  # after fit the model holds the averaged weights
        assert torch.equal(v, averaged[k]), k
    # fit's validation (after the last update) == a plain validation of the averaged weights, != of the raw ones
    for state, same in ((averaged, True), (raw, False)):
        fresh = DetectorModule(dm.class_names, "nano")
        fresh.load_state_dict(state)
        val = _quiet_trainer().validate(fresh, dm, verbose=False)[0]
        assert (abs(val["val/loss"] - logged["val/loss"]) < 1e-6) == same
        if same:
            assert val["val/map"] == pytest.approx(logged["val/map"], abs=1e-6)
    # validate from the checkpoint with the callback present: no swap, the averaged weights are used.
    again = _quiet_trainer(callbacks=[EMA()]).validate(DetectorModule(dm.class_names, "nano"), dm,
                                                       ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)[0]  # fmt: skip
    assert again["val/loss"] == pytest.approx(logged["val/loss"], abs=1e-6)


def test_module_argument_adds_the_callback() -> None:
    assert DetectorModule(["a"], "nano").configure_callbacks() == []
    (ema,) = DetectorModule(["a"], "nano", ema_decay=0.99, ema_warmup_steps=5).configure_callbacks()
    assert isinstance(ema, EMA) and ema.decay == 0.99 and ema.warmup_steps == 5
