from pathlib import Path

import torch

from detector.anchors import main
from detector.ops.anchors import best_possible_recall, kmeans_anchors


def test_kmeans_recovers_known_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[12.0, 16.0], [60.0, 30.0], [150.0, 200.0]])
    wh = torch.cat([c * torch.exp(torch.randn(200, 2, generator=g) * 0.05) for c in centres])
    found = kmeans_anchors(wh, k=3)
    assert torch.allclose(found, centres, rtol=0.05)  # ascending area, like the centres
    assert best_possible_recall(wh, found) == 1.0
    assert best_possible_recall(wh, torch.tensor([[400.0, 400.0]])) < 0.5


def test_command_on_the_embedded_dataset(tmp_path, capsys) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(
        f"data:\n  root: {tmp_path / 'shapes'}\n  embedded: {{num_train: 20, num_val: 2}}\n  num_workers: 0\n"
    )
    default = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    anchors = main(["--config", default, "--config", str(cfg), "--k", "6", "--scales", "3"])
    out = capsys.readouterr().out
    assert anchors.shape == (6, 2) and (anchors[1:].prod(1) >= anchors[:-1].prod(1)).all()
    assert "best possible recall" in out and "anchors: [[" in out


def test_training_warns_when_anchors_fit_badly(tmp_path) -> None:
    import lightning as L
    import pytest

    from detector.data import DetectionDataModule, ShapesConfig
    from detector.module import DetectorModule

    dm = DetectionDataModule(
        root=str(tmp_path / "shapes"), embedded=ShapesConfig(num_train=8, num_val=2), num_workers=0, image_size=128
    )
    far = [[(900, 900)] * 3] * 3  # every anchor far larger than any box
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    with pytest.warns(UserWarning, match="best possible recall of only 0.000"):
        trainer.fit(DetectorModule(dm.class_names, anchors=far), datamodule=dm)
