"""``python -m detector.ablate``: statistics over seeds, the task grid, parallel runs, SLURM array tasks, failures.

One tiny grid (2 recipes × 2 seeds, 1 epoch on 8 images at 64 px) runs once with ``--jobs 2``; the
SLURM script reruns one of its tasks with a fake array environment, which must give the same numbers.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector import ablate, ablate_runs
from detector.ablate_report import compare, end_markdown, end_of_training, markdown, mean_std, summarize
from detector.ablate_runs import Grid, cores

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["configs/losses/paper.yaml", "configs/losses/focal.yaml"]
TINY = [
    "--data.embedded.num_train", "8", "--data.embedded.num_val", "4", "--data.image_size", "64",
    "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_epochs", "1",
    "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


def test_mean_and_sample_std_on_known_values() -> None:
    mean, std = mean_std([0.1, 0.2, 0.4])
    # Σ(x − 7/30)² = 0.046667; / (n − 1 = 2) -> 0.023333; sqrt -> 0.152753 (dividing by n would give 0.124722)
    assert mean == pytest.approx(0.233333, abs=1e-6) and std == pytest.approx(0.152753, abs=1e-6)
    assert mean_std([0.5]) == (0.5, None)
    ref = [0.1, 0.2, 0.3]
    assert compare(ref, [0.35, 0.4, 0.5]) == (pytest.approx(0.216667, abs=1e-6), "above")
    assert compare(ref, [0.0, 0.05, 0.09])[1] == "below"
    assert compare(ref, [0.25, 0.4, 0.5])[1] == "within"  # overlaps: 0.25 < 0.3
    assert compare(ref, [0.3, 0.4, 0.5])[1] == "within"  # a tie is not a separation
    assert compare(ref, [0.9])[1] == "too few seeds" and compare([0.2], [0.1, 0.3])[1] == "too few seeds"


def test_summary_and_table_on_known_runs() -> None:
    def ok(recipe: str, seed: int, m: float, m50: float) -> dict:
        return {
            "recipe": recipe,
            "seed": seed,
            "status": "ok",
            "metrics": {"val/map": m, "val/map_50": m50},
            "minutes": 2.0,
        }

    runs = {f"a-s{s}": ok("a", s, m, 2 * m) for s, m in zip((0, 1, 2), (0.1, 0.2, 0.3))}
    runs |= {"b-s0": ok("b", 0, 0.35, 0.1), "b-s1": ok("b", 1, 0.45, 0.15)}
    runs["b-s2"] = {"recipe": "b", "seed": 2, "status": "failed", "error": "ValueError: boom"}
    summary = summarize(runs, ["a", "b"], [0, 1, 2], reference="a")
    a, b = summary["a"], summary["b"]
    assert (a["runs"], b["runs"], b["seeds"]) == (3, 2, 3)
    assert b["val/map"]["values"] == {0: 0.35, 1: 0.45}  # the failed seed is left out
    assert b["val/map"]["mean"] == pytest.approx(0.4) and b["val/map"]["std"] == pytest.approx(math.sqrt(0.005))
    assert b["val/map"]["delta"] == pytest.approx(0.2) and b["val/map"]["verdict"] == "above"
    assert b["val/map_50"]["delta"] == pytest.approx(0.125 - 0.4) and b["val/map_50"]["verdict"] == "below"
    assert a["val/map"]["verdict"] == "reference"
    table = markdown(summary, {**runs, "b-s2": runs["b-s2"]}, [0, 1, 2], "header")
    assert "| a | 3/3 | 0.200 ± 0.100 | reference | 0.400 ± 0.200 | reference | 2.0 |" in table
    assert (
        "| b | 2/3 | 0.400 ± 0.071 | +0.200 (all seeds above) | 0.125 ± 0.035 | -0.275 (all seeds below) | 2.0 |"
        in table
    )
    assert "| b | 2 | – | – | – | failed: ValueError: boom |" in table
    assert "| a | 1 | 0.2000 | 0.4000 | 2.0 | ok |" in table


def test_end_of_training_on_known_curves() -> None:
    def run(recipe: str, maps: list[float], status: str = "ok") -> dict:
        curve = [{"epoch": e, "val/map": m, "val/map_50": 2 * m} for e, m in enumerate(maps)]
        return {"recipe": recipe, "status": status, "curve": curve}

    runs = {
        "a-s0": run("a", [0.0, 0.9, 0.1, 0.3, 0.2]),  # the last 3: 0.1, 0.3, 0.2
        "a-s1": run("a", [0.5, 0.4, 0.4, 0.4]),  # 0.4, 0.4, 0.4
        "a-s2": run("a", [0.1, 0.2, 0.3], status="failed"),  # left out
        "b-s0": run("b", [0.7]),  # one validation: no spread, left out
    }
    end = end_of_training(runs, ["a", "b"], last=3)
    assert set(end) == {"a"} and end["a"]["runs"] == 2
    r0 = end["a"]["per_run"]["a-s0"]
    assert (r0["n"], r0["final"], r0["min"], r0["max"]) == (3, 0.2, 0.1, 0.3)
    assert r0["drop"] == pytest.approx(0.8)  # 0.1 after the 0.9 of epoch 1, which is outside the last 3
    assert end["a"]["per_run"]["a-s1"]["drop"] == pytest.approx(0.1) and end["a"]["drop"] == pytest.approx(0.8)
    assert r0["mean"] == pytest.approx(0.2) and r0["std"] == pytest.approx(0.1)
    assert end["a"]["final"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert end["a"]["mean"][0] == pytest.approx(0.3) and end["a"]["spread"] == pytest.approx(0.05)  # (0.1 + 0) / 2
    text = end_markdown(end, last=3)
    assert "| a | 2 | 0.300 ± 0.141 | 0.300 ± 0.141 | 0.050 | 0.800 |" in text
    assert "| a-s0 | 3 | 0.2000 | 0.2000 | 0.1000 | 0.1000 | 0.3000 | 0.8000 |" in text
    assert end_of_training({"b-s0": run("b", [0.7])}, ["b"]) == {} and end_markdown({}) == ""
    rising = end_of_training({"c-s0": run("c", [0.1, 0.2, 0.3, 0.4])}, ["c"])["c"]["per_run"]["c-s0"]
    assert rising["drop"] == 0.0 and rising["std"] > 0  # still improving: spread, but no drop


def test_task_index_is_a_bijection_onto_the_grid() -> None:
    recipes, seeds = ("x/a.yaml", "y/b.yaml", "c.yaml"), (3, 0, 7, 11)
    grid = Grid("base.yaml", recipes, seeds, (), "g")
    tasks = [grid.task(i) for i in range(len(grid))]
    assert len(grid) == 12 and len(set(tasks)) == 12 and set(tasks) == {(r, s) for r in recipes for s in seeds}
    assert tasks[:5] == [("x/a.yaml", 3), ("x/a.yaml", 0), ("x/a.yaml", 7), ("x/a.yaml", 11), ("y/b.yaml", 3)]
    assert len({grid.run_name(i) for i in range(12)}) == 12 and grid.run_name(11) == "c-s11"
    for bad in (-1, 12):
        with pytest.raises(ValueError, match="outside the grid"):
            grid.task(bad)
    with pytest.raises(ValueError, match="recipe file name"):
        Grid("base.yaml", ("x/a.yaml", "y/a.yaml"), (0,), (), "g")
    with pytest.raises(ValueError, match="seed"):
        Grid("base.yaml", ("a.yaml",), (1, 1), (), "g")
    with pytest.raises(ValueError, match="--seed_everything"):
        Grid("base.yaml", ("a.yaml",), (1,), ("--seed_everything=4",), "g")


def test_list_prints_the_array_range(capsys: pytest.CaptureFixture) -> None:
    argv = ["--config", "configs/default.yaml", "--recipes", *RECIPES, "--seeds", "0", "1", "2", "--list"]
    assert ablate.main(argv) == 0
    text = capsys.readouterr().out
    assert "   5  focal-s2" in text and "--array 0-5 scripts/slurm/ablate.sbatch" in text


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], int]:
    """The 2 × 2 grid run with --jobs 2: (out, the command's arguments, its exit status)."""
    tmp = tmp_path_factory.mktemp("ablate")
    argv = ["--config", "configs/default.yaml", "--recipes", *RECIPES, "--seeds", "0", "1", "--jobs", "2"]
    argv += ["--out", str(tmp / "out"), "--", *TINY, "--data.root", str(tmp / "shapes")]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = ablate.main(argv)
    finally:
        os.chdir(cwd)
    return tmp / "out", argv, status


def test_parallel_grid_reports_mean_and_std_of_its_seeds(grid_run: tuple[Path, list[str], int]) -> None:
    out, _, status = grid_run
    names = ["paper-s0", "paper-s1", "focal-s0", "focal-s1"]
    assert status == 0 and sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(names)
    runs = {n: json.loads((out / "runs" / f"{n}.json").read_text()) for n in names}
    assert {r["status"] for r in runs.values()} == {"ok"}
    assert {r["threads"] for r in runs.values()} == {max(1, cores() // 2)}  # each process its share of the cores
    report = json.loads((out / "ablation.json").read_text())
    table = (out / "ablation.md").read_text()
    for recipe in ("paper", "focal"):
        for metric in ("val/map", "val/map_50"):
            values = [runs[f"{recipe}-s{s}"]["metrics"][metric] for s in (0, 1)]
            stat = report["recipes"][recipe][metric]
            assert stat["values"] == {"0": values[0], "1": values[1]}
            assert stat["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert stat["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in table
        assert f"| {recipe} | 2/2 |" in table
        for seed in (0, 1):  # one validation in the 1-epoch fit: its curve point is what the fit logged
            curve = runs[f"{recipe}-s{seed}"]["curve"]
            assert [p["epoch"] for p in curve] == [0]  # not the sanity check, not the best checkpoint's validation
            # the only checkpoint is that epoch's, so the final validation repeats the curve's point
            assert curve[0]["val/map"] == pytest.approx(runs[f"{recipe}-s{seed}"]["metrics"]["val/map"], abs=1e-6)
        # the seed reaches the run: weights, batches and augmentation differ, so the validation loss does
        assert runs[f"{recipe}-s0"]["metrics"]["val/loss"] != runs[f"{recipe}-s1"]["metrics"]["val/loss"]
        for seed in (0, 1):
            config = (out / "runs" / f"{recipe}-s{seed}" / "config.yaml").read_text()
            assert f"seed_everything: {seed}\n" in config and f"\n  seed: {seed}\n" in config
            assert "\n    seed: 0\n" in config  # data.embedded.seed: every run trains on the same images


def test_sbatch_task_reproduces_a_local_run_and_collect_reports_missing(
    grid_run: tuple[Path, list[str], int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, argv, _ = grid_run
    local = json.loads((out / "runs" / "paper-s1.json").read_text())
    array_out = tmp_path / "array"
    args = [a if a != str(out) else str(array_out) for a in argv if a not in ("--jobs", "2")]
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_ARRAY_JOB_ID": "77", "PYTHON": sys.executable}
    env |= {"SLURM_CPUS_PER_TASK": str(local["threads"]), "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "scripts" / "slurm" / "ablate.sbatch")
    refused = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "job-array task" in refused.stderr
    env["SLURM_ARRAY_TASK_ID"] = "1"  # task 1 = paper, seed 1
    proc = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [p.name for p in (array_out / "runs").glob("*.json")] == ["paper-s1.json"]
    task = json.loads((array_out / "runs" / "paper-s1.json").read_text())
    assert task["metrics"] == local["metrics"]  # the same seed twice: identical numbers
    assert json.loads((array_out / "grid.json").read_text())["group"] == "ablation-77"
    assert ablate.main(["--collect", str(array_out)]) == 1
    table = (array_out / "ablation.md").read_text()
    assert "| paper | 1/2 |" in table and "| focal | 0/2 |" in table
    assert "| paper | 0 | – | – | – | missing |" in table and "| focal | 1 | – | – | – | missing |" in table
    assert "3 of 4 runs did not finish" in capsys.readouterr().err


def test_failed_run_is_reported_and_the_others_kept(
    grid_run: tuple[Path, list[str], int], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, argv, _ = grid_run
    broken = tmp_path / "broken.yaml"
    broken.write_text("# a recipe with a typo\nmodel:\n  loss:\n    init_args:\n      normalize: per_image\n")
    (tmp_path / "out" / "runs").mkdir(parents=True)
    shutil.copy(out / "runs" / "paper-s0.json", tmp_path / "out" / "runs" / "paper-s0.json")  # done: skipped
    extra = argv[argv.index("--") :]
    grid = ["--config", "configs/default.yaml", "--recipes", RECIPES[0], str(broken), "--seeds", "0"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = ablate.main([*grid, "--out", str(tmp_path / "out"), *extra])
        with pytest.raises(SystemExit) as refused:  # paper-s0 in the folder was made with other extra arguments
            ablate.main([*grid, "--out", str(tmp_path / "out"), *extra, "--trainer.max_epochs", "2"])
    finally:
        os.chdir(cwd)
    assert status == 1 and refused.value.code == 2
    assert "runs made with other settings (paper-s0)" in capsys.readouterr().err
    kept = json.loads((tmp_path / "out" / "runs" / "paper-s0.json").read_text())
    assert kept == json.loads((out / "runs" / "paper-s0.json").read_text())
    failed = json.loads((tmp_path / "out" / "runs" / "broken-s0.json").read_text())
    assert (
        failed["status"] == "failed"
        and failed["error"].startswith("error: model.loss")
        and "per_image" in failed["error"]
    )
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert f"| broken | 0 | – | – | – | failed: {failed['error']} |" in table and "| broken | 0/1 |" in table
    assert f"| paper | 0 | {kept['metrics']['val/map']:.4f} |" in table
    assert not (tmp_path / "out" / "runs" / "paper-s0.log").exists()  # the finished run was not rerun


def test_local_runs_share_gpus_and_cores_and_record_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in interpreter records each run's environment, holds its GPU for a moment and dies
    (exit 137, as the kernel's OOM killer leaves it) without writing a result."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'lock={tmp_path}/gpu-$CUDA_VISIBLE_DEVICES; mkdir "$lock" 2>/dev/null || echo CLASH >> {tmp_path}/env\n'
        f'echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS $*" >> {tmp_path}/env\n'
        'sleep 0.2; rmdir "$lock"; echo "Killed"; exit 137\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(ablate_runs, "visible_gpus", lambda: ["3", "5"])
    monkeypatch.setattr(ablate_runs, "cores", lambda: 8)
    grid = Grid("base.yaml", ("a.yaml", "b.yaml"), (0, 1, 2), ("--trainer.max_epochs", "2"), "g")
    ablate_runs.run_local(grid, range(6), tmp_path / "out", jobs=2)
    lines = (tmp_path / "env").read_text().splitlines()
    assert "CLASH" not in lines and len(lines) == 6  # never two runs on one GPU at a time
    words = [line.split() for line in lines]
    assert {w[0] for w in words} == {"3", "5"} and {w[1] for w in words} == {"4"}  # 8 cores // 2 jobs
    assert sorted(int(w[w.index("--task") + 1]) for w in words) == list(range(6))
    assert all(w[w.index("--threads") :][:4] == ["--threads", "4", "--max-workers", "3"] for w in words)
    assert all(w[-3:] == ["--", "--trainer.max_epochs", "2"] for w in words)
    runs = ablate_runs.load_runs(grid, tmp_path / "out")
    assert {r["status"] for r in runs.values()} == {"failed"}
    assert {r["error"] for r in runs.values()} == {"exit status 137: Killed"}


def test_docs_example_table_is_what_the_code_writes() -> None:
    """docs/ablation.md shows a report for made-up per-seed values: the code writes exactly its rows."""
    block = (ROOT / "docs" / "ablation.md").read_text().split("it reads:\n\n```text\n", 1)[1].split("```", 1)[0]
    summary_rows, run_rows = block.strip().split("\n\n")
    runs = {}
    for line in run_rows.splitlines()[2:]:
        recipe, seed, m, m50, minutes, status = [c.strip() for c in line.strip("|").split("|")]
        run = {"recipe": recipe, "seed": int(seed), "status": status.split(":")[0]}
        if status == "ok":
            run |= {"metrics": {"val/map": float(m), "val/map_50": float(m50)}, "minutes": float(minutes)}
        else:
            run["error"] = status.split(": ", 1)[1]
        runs[f"{recipe}-s{seed}"] = run
    recipes = list(dict.fromkeys(r["recipe"] for r in runs.values()))
    table = markdown(summarize(runs, recipes, [0, 1, 2], reference=recipes[0]), runs, [0, 1, 2], "header")
    assert summary_rows in table and run_rows in table
