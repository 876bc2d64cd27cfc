"""The non-finite guard: a NaN batch is skipped (weights and buffers untouched, counted) or stops the run
with the global step and the image ids; a checkpoint with non-finite weights is never written."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import free_port

from detector.data import DetectionDataModule
from detector.data.shapes import ShapesConfig
from detector.losses import GHMC, YOLOLoss
from detector.module import DetectorModule, NonFiniteLossError

BAD = 1  # index of the poisoned training batch


class PoisonBatch(L.Callback):
    """Puts a NaN into batch ``BAD`` (a pixel, or the loss through ``criterion.poison``) and records
    the module's full state (parameters and buffers) before and after every step."""

    def __init__(self, where: str) -> None:
        self.where, self.states, self.ids = where, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        if batch_idx == BAD:
            self.ids = [int(t["image_id"]) for t in batch[1]]
            if self.where == "pixel":
                batch[0][0, 0, 5, 7] = float("nan")
            else:
                pl_module.criterion.poison = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.criterion.poison = False

    def on_train_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


class PoisonableLoss(YOLOLoss):
    """The YOLO loss with GHM-C (stateful buffers), turned NaN while ``poison`` is set."""

    poison = False

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.poison:
            out["loss"] = out["loss"] * float("nan")
        return out


def _fit(tmp_path: Path, where: str, mode: str) -> tuple[DetectorModule, PoisonBatch, L.Trainer]:
    dm = DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=12, num_val=4),
                             image_size=64, batch_size=4, num_workers=0)  # fmt: skip
    loss = PoisonableLoss(objectness=GHMC(10, 0.75), classification=GHMC(10, 0.75))
    model = DetectorModule(dm.class_names, "nano", loss=loss, nonfinite=mode, lr=0.05, warmup_epochs=0)
    cb = PoisonBatch(where)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])  # fmt: skip
    trainer.fit(model, dm)
    return model, cb, trainer


@pytest.mark.parametrize("where", ["pixel", "loss"])
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


@pytest.mark.parametrize("where", ["pixel", "loss"])
def test_stop_names_step_and_image_ids(tmp_path: Path, where: str) -> None:
    with pytest.raises(NonFiniteLossError) as err:
        _fit(tmp_path, where, "stop")
    what = "network outputs" if where == "pixel" else "loss"
    ids = sorted(DetectionDataModule(str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=12, num_val=4),
                                     num_workers=0, image_size=64)._train_base.image_ids)  # fmt: skip
    message = str(err.value)
    assert f"non-finite {what} at global step {BAD} " in message
    listed = [int(x) for x in message.split("image ids of the batch: [")[1].split("]")[0].split(",")]
    assert len(listed) == 4 and set(listed) <= set(ids)


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
from detector.module import DetectorModule

class PoisonRank0(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1 and trainer.global_rank == 0:  # only one process sees the NaN
            batch[0][0, 0, 3, 3] = float("nan")

out = sys.argv[1]
dm = DetectionDataModule(out + "/shapes", embedded=ShapesConfig(num_train=16, num_val=4), image_size=64,
                         batch_size=2, num_workers=0)
model = DetectorModule(dm.class_names, "nano", warmup_epochs=0)
trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3,
                    limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[PoisonRank0()])
trainer.fit(model, dm)
torch.save({"skipped": model.nonfinite_skipped, "params": dict(model.named_parameters()),
            "state": model.state_dict(), "step": trainer.global_step},
           f"{out}/rank{trainer.global_rank}.pt")
"""


def test_ddp_processes_agree_to_skip(tmp_path: Path) -> None:
    """NaN on rank 0 only: both processes skip that batch (no hang) and stay identical."""
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
    assert r0["skipped"] == r1["skipped"] == 1 and r0["step"] == r1["step"] == 3
    for k, v in r0["params"].items():  # DDP keeps the parameters identical (BatchNorm statistics are per process)
        assert torch.equal(v, r1["params"][k]), k
    for state in (r0["state"], r1["state"]):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
