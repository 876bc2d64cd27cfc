from pathlib import Path

import torch

from detector.anchors import best_possible_recall, kmeans_anchors, main


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
    cfg.write_text(f"data:\n  root: {tmp_path / 'shapes'}\n  embedded: {{num_train: 20, num_val: 2}}\n  num_workers: 0\n")
    default = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    anchors = main(["--config", default, "--config", str(cfg), "--k", "6", "--scales", "3"])
    out = capsys.readouterr().out
    assert anchors.shape == (6, 2) and (anchors[1:].prod(1) >= anchors[:-1].prod(1)).all()
    assert "best possible recall" in out and "anchors: [[" in out
