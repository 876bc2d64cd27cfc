"""The non-finite guard: a step with a NaN/Inf in its outputs, loss or gradients is skipped (weights and
buffers untouched, counted) or stops the run with the global step and the image ids; a checkpoint with
non-finite weights is never written."""

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import free_port
from lightning.pytorch.plugins.precision import MixedPrecision

from detector.data import DetectionDataModule
from detector.data.shapes import ShapesConfig
from detector.losses import BCE, CARL, GHMC, ISR, CIoULoss, DIoULoss, FocalLoss, GIoULoss, SoftmaxCrossEntropy, YOLOLoss
from detector.models import YOLOv3
from detector.module import DetectorModule, NonFiniteLossError

BAD = 1  # index of the poisoned training batch


class PoisonBatch(L.Callback):
    """Puts a NaN into batch ``BAD`` (a pixel, or the loss or the gradients through ``criterion.poison``)
    and records the module's full state (parameters and buffers) before and after every step."""

    def __init__(self, where: str) -> None:
        self.where, self.states, self.ids = where, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        if batch_idx == BAD:
            self.ids = [int(t["image_id"]) for t in batch[1]]
            if self.where == "pixel":
                batch[0][0, 0, 5, 7] = float("nan")
            else:
                pl_module.criterion.poison = self.where

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.criterion.poison = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


class PoisonableLoss(YOLOLoss):
    """The YOLO loss with GHM-C (stateful buffers); while ``poison`` is "loss" the loss is NaN, while
    it is "grad" the loss is as usual (finite) but the gradient reaching the outputs is infinite."""

    poison: str | None = None

    def forward(self, outputs, *args, **kwargs):
        if self.poison == "grad":
            outputs[0].register_hook(lambda g: g * float("inf"))
        out = super().forward(outputs, *args, **kwargs)
        if self.poison == "loss":
            out["loss"] = out["loss"] * float("nan")
        return out


def _fit(tmp_path: Path, where: str, mode: str, **trainer: Any) -> tuple[DetectorModule, PoisonBatch, L.Trainer]:
    dm = DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=12, num_val=4),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    loss = PoisonableLoss(objectness=GHMC(10, 0.75), classification=GHMC(10, 0.75))
    model = DetectorModule(dm.class_names, "nano", loss=loss, nonfinite=mode, lr=0.05, warmup_epochs=0)
    cb = PoisonBatch(where)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **trainer)  # fmt: skip
    trainer.fit(model, dm)
    return model, cb, trainer


@pytest.mark.parametrize("where", ["pixel", "loss", "grad"])
def test_skip_leaves_weights_and_buffers_untouched(tmp_path: Path, where: str) -> None:
    model, cb, trainer = _fit(tmp_path, where, "skip")
    before, after, end = cb.states[BAD], cb.states[BAD + 1], cb.states[-1]
    assert model.nonfinite_skipped == 1 and float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    for k in before:  # parameters, BatchNorm statistics and GHM-C's running counts: bit for bit
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["criterion.objectness.acc"], end["criterion.objectness.acc"])  # training went on
    changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], end[k])]
    assert changed  # the other batches did update the weights
    assert all(torch.isfinite(v).all() for v in end.values() if v.is_floating_point())


@pytest.mark.parametrize("where", ["pixel", "loss", "grad"])
def test_stop_names_step_and_image_ids(tmp_path: Path, where: str) -> None:
    with pytest.raises(NonFiniteLossError) as err:
        _fit(tmp_path, where, "stop")
    what = {"pixel": "network outputs", "loss": "loss", "grad": "gradients"}[where]
    ids = sorted(DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=12, num_val=4),
                                     num_workers=0, image_size=64)._train_base.image_ids)  # fmt: skip
    message = str(err.value)
    assert f"non-finite {what} at global step {BAD} " in message
    listed = [int(x) for x in message.split("image ids of the batch: [")[1].split("]")[0].split(",")]
    assert len(listed) == 4 and set(listed) <= set(ids)
    loss = float(message.split("; loss ")[1].split(")")[0])
    assert math.isfinite(loss) == (where == "grad")  # the gradients are caught behind a finite loss


def test_with_a_grad_scaler_overflowing_gradients_are_left_to_it(tmp_path: Path) -> None:
    """16-mixed: the GradScaler skips a step whose gradients overflow (routine while it finds its scale),
    so the guard must neither stop nor count it; the step still changes no parameter."""
    scaler = torch.amp.GradScaler("cpu")  # Lightning makes one only on CUDA; the logic is the same
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    model, cb, _ = _fit(tmp_path, "grad", "stop", plugins=[plugin])
    before, after = cb.states[BAD], cb.states[BAD + 1]
    assert model.nonfinite_skipped == 0 and scaler.get_scale() < 2.0**16  # the scaler skipped and backed off
    for k, _ in model.named_parameters():
        assert torch.equal(before[k], after[k]), k


def test_a_learning_rate_that_blows_up_the_weights_is_stopped_at_the_first_bad_step(tmp_path: Path) -> None:
    """``lr`` 1e6: step 0 updates the weights to ~1e7; at step 1 the loss is still finite (~1e28) but
    the gradients are not. That step must not go through."""
    dm = DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=12, num_val=4),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    model = DetectorModule(dm.class_names, "nano", lr=1e6, warmup_epochs=0, nonfinite="stop")
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at global step 1 \(epoch 0; loss ") as err:
        trainer.fit(model, dm)
    assert math.isfinite(float(str(err.value).split("; loss ")[1].split(")")[0]))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


LOSSES = {
    "ghm": lambda: YOLOLoss(objectness=GHMC(10, 0.75), classification=GHMC(10, 0.75)),
    "isr_carl": lambda: YOLOLoss(classification=ISR(FocalLoss()), box=CARL(GIoULoss())),
    "isr_bce_ciou": lambda: YOLOLoss(objectness=FocalLoss(), classification=ISR(BCE()), box=CIoULoss()),
    "softmax_diou": lambda: YOLOLoss(classification=SoftmaxCrossEntropy(), box=DIoULoss(), normalize="num_pos"),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_nonfinite_outputs_without_failing(name: str, bad: float) -> None:
    """The guard checks after the loss and the backward pass, so the losses (GHM-C's bins, PISA's
    ranks and NMS clusters) see the NaN/Inf outputs: they must give a non-finite loss or gradient, not fail."""
    model = YOLOv3(3, "nano")
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([0, 2])}]  # fmt: skip
    for i, t in enumerate(targets):
        t["image_id"] = torch.tensor(i)
    outputs = [o.clone() for o in model(torch.rand(2, 3, 64, 64))]
    outputs[0][0, 0, 0, 0, :] = bad  # an anchor's every value
    outputs[1][1, 1, 1, 1, 2] = bad  # one box coordinate
    loss = LOSSES[name]()(outputs, targets, model.anchors, model.strides)["loss"]
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert not (torch.isfinite(loss) and torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def test_checkpoint_with_nonfinite_weights_is_not_written(tmp_path: Path) -> None:
    dm = DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=4, num_val=4),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    model = DetectorModule(dm.class_names, "nano")
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "ok.ckpt")
    assert torch.load(tmp_path / "ok.ckpt", weights_only=False)["nonfinite_skipped"] == 0
    with torch.no_grad():
        model.model.heads[0][-1].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"global step 1: non-finite values in \['model.heads.0.1.weight'\]"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


DDP_SCRIPT = """
import sys, lightning as L, torch
from detector.data import DetectionDataModule
from detector.data.shapes import ShapesConfig
from detector.losses import YOLOLoss
from detector.module import DetectorModule

class Loss(YOLOLoss):
    poison = None
    def forward(self, outputs, *args, **kwargs):
        if self.poison == "grad":
            outputs[0].register_hook(lambda g: g * float("inf"))
        out = super().forward(outputs, *args, **kwargs)
        if self.poison == "loss":  # NaN added as a constant: the gradients stay finite on every process
            out["loss"] = out["loss"] + torch.tensor(float("nan"))
        return out

class PoisonOneRank(L.Callback):  # only one process sees each problem
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rank = trainer.global_rank
        if batch_idx == 1 and rank == 0:
            batch[0][0, 0, 3, 3] = float("nan")  # NaN outputs; the gradient all-reduce spreads the NaN
        pl_module.criterion.poison = {(2, 1): "loss", (3, 0): "grad"}.get((batch_idx, rank))

out = sys.argv[1]
dm = DetectionDataModule(out + "/shapes", embedded=ShapesConfig(num_train=20, num_val=4), image_size=64,
                         batch_size=2, num_workers=0)
model = DetectorModule(dm.class_names, "nano", loss=Loss(), warmup_epochs=0)
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=5,
                    limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[PoisonOneRank()])
trainer.fit(model, dm)
torch.save({"skipped": model.nonfinite_skipped, "params": dict(model.named_parameters()),
            "state": model.state_dict(), "step": trainer.global_step},
           f"{out}/rank{trainer.global_rank}.pt")
"""


def test_ddp_processes_agree_to_skip(tmp_path: Path) -> None:
    """A NaN output on rank 0, a NaN loss with finite gradients on rank 1, an infinite gradient behind a finite
    loss on rank 0: both processes skip those three steps (no hang), update on the other two, stay identical."""
    script = tmp_path / "ddp_skip.py"
    script.write_text(DDP_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": root,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 3 and r0["step"] == r1["step"] == 5
    for k, v in r0["params"].items():  # DDP keeps the parameters identical (BatchNorm statistics are per process)
        assert torch.equal(v, r1["params"][k]), k
    for state in (r0["state"], r1["state"]):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
