"""The nano model must be able to learn: it overfits a handful of generated images to a high mAP@50."""

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from detector.data import CocoDetection, ShapesConfig, TransformedDataset, collate, ensure_shapes, val_transforms
from detector.losses import YOLOLoss
from detector.module import DetectorModule


def test_nano_overfits_a_handful_of_images(tmp_path: Path) -> None:
    root = ensure_shapes(tmp_path / "shapes", ShapesConfig(num_train=6, num_val=1, seed=3))
    base = CocoDetection(root / "train", root / "annotations" / "train.json")
    data = TransformedDataset(base, val_transforms(224), 224)
    loader = DataLoader(data, batch_size=6, collate_fn=collate)
    model = DetectorModule(base.class_names, preset="nano", lr=0.02, warmup_epochs=5, loss=YOLOLoss(box_weight=2.0))
    trainer = L.Trainer(
        max_epochs=150, check_val_every_n_epoch=150, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=10.0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, loader, loader)
    assert sum(len(base[i]["boxes"]) for i in range(len(base))) >= 10
    assert trainer.callback_metrics["val/map_50"] >= 0.9, trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
