"""The ablation's runs: the (recipe, seed) grid, one fit per task, the per-run JSON files, local parallel runs.

Task ``i`` of a grid of R recipes × S seeds is ``(recipes[i // S], seeds[i % S])`` (recipe-major), run
``<recipe>-s<seed>``. Each task is one ``train.py`` fit, ``--config BASE --config RECIPE [extra]
--seed_everything SEED --data.seed SEED``, its best checkpoint validated at the end, and writes
``OUT/runs/<recipe>-s<seed>.json``; local runs and SLURM array tasks write the same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import subprocess
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L

from .cli import DetectorCLI, cli_kwargs
from .data import DetectionDataModule
from .module import DetectorModule

# train.py options that the ablation sets for every run; extra arguments may not set them
RESERVED = ("--seed_everything", "--data.seed", "--trainer.default_root_dir")


@dataclass(frozen=True)
class Grid:
    """What an ablation runs: every recipe of ``recipes`` (YAML paths) with every seed, on ``config``."""

    config: str
    recipes: tuple[str, ...]
    seeds: tuple[int, ...]
    extra: tuple[str, ...]
    group: str

    def __post_init__(self) -> None:
        names = [Path(r).stem for r in self.recipes]
        for what, items in (("recipe file name", names), ("seed", [str(s) for s in self.seeds])):
            dup = sorted({x for x in items if items.count(x) > 1})
            if dup:
                raise ValueError(f"each {what} may appear once (runs are named <recipe>-s<seed>): {', '.join(dup)}")
        if not self.recipes or not self.seeds:
            raise ValueError("an ablation needs at least one recipe and one seed")
        bad = [a for a in self.extra if a.split("=", 1)[0] in RESERVED]
        if bad:
            raise ValueError(f"{', '.join(bad)}: set by the ablation for every run (use --seeds), not after --")

    @property
    def names(self) -> list[str]:
        """Recipe names: the file stems, ``configs/losses/focal.yaml`` -> ``focal``."""
        return [Path(r).stem for r in self.recipes]

    def __len__(self) -> int:
        return len(self.recipes) * len(self.seeds)

    def task(self, index: int) -> tuple[str, int]:
        """``(recipe path, seed)`` of task ``index`` in ``[0, len)``: ``(recipes[i // S], seeds[i % S])``."""
        if not 0 <= index < len(self):
            grid = f"{len(self.recipes)} recipes × {len(self.seeds)} seeds = tasks 0-{len(self) - 1}"
            raise ValueError(f"task {index} is outside the grid: {grid}")
        return self.recipes[index // len(self.seeds)], self.seeds[index % len(self.seeds)]

    def run_name(self, index: int) -> str:
        """``<recipe>-s<seed>`` of task ``index``."""
        recipe, seed = self.task(index)
        return f"{Path(recipe).stem}-s{seed}"

    def identity(self, index: int) -> dict[str, Any]:
        """What makes a run's result: base config, recipe, seed and extra arguments (not its resources)."""
        recipe, seed = self.task(index)
        return {"config": self.config, "recipe_file": recipe, "seed": seed, "extra": list(self.extra)}

    @property
    def uses_wandb(self) -> bool:
        """False when the extra arguments replace the logger (``--trainer.logger false``, another class)."""
        return not any(a == "--trainer.logger" or a.startswith("--trainer.logger=") for a in self.extra)

    def train_args(self, index: int, out: Path) -> list[str]:
        """The ``fit`` arguments of task ``index``. Its files (W&B run, checkpoints, ``config.yaml``) go to
        ``OUT/runs/<run>/``, where a logger other than W&B does not name its own folder."""
        recipe, seed = self.task(index)
        name = self.run_name(index)
        run_dir = str(out / "runs" / name)
        args = ["fit", "--config", self.config, "--config", recipe, *self.extra]
        args += ["--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.default_root_dir", run_dir]
        if self.uses_wandb:
            args += ["--trainer.logger.init_args.group", self.group, "--trainer.logger.init_args.name", name]
            args += ["--trainer.logger.init_args.save_dir", run_dir]
        return args


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temp file renamed into place: concurrent writers never mix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_grid(grid: Grid, out: Path) -> None:
    """``OUT/grid.json``: the grid, read back by ``--collect``."""
    write_json(out / "grid.json", asdict(grid))


def load_grid(out: Path) -> Grid:
    """The grid saved in ``OUT/grid.json``."""
    path = out / "grid.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an ablation folder (nothing was run with --out {out})")
    d = json.loads(path.read_text())
    return Grid(d["config"], tuple(d["recipes"]), tuple(d["seeds"]), tuple(d["extra"]), d["group"])


def run_file(out: Path, name: str) -> Path:
    """``OUT/runs/<name>.json``."""
    return out / "runs" / f"{name}.json"


def load_runs(grid: Grid, out: Path) -> dict[str, dict[str, Any]]:
    """Every task's result by run name, as its JSON holds it; status "missing" where no JSON exists (or
    only a failed one made with other settings), "stale" where a finished run was made with other
    settings (another base config, recipe file or extra arguments)."""
    runs = {}
    for i in range(len(grid)):
        name = grid.run_name(i)
        recipe, seed = grid.task(i)
        base = {"run": name, "recipe": Path(recipe).stem, "seed": seed}
        path = run_file(out, name)
        result = json.loads(path.read_text()) if path.is_file() else {**base, "status": "missing", "error": None}
        if result["status"] != "missing" and {k: result.get(k) for k in grid.identity(i)} != grid.identity(i):
            stale = result["status"] == "ok"
            error = f"{path} was made with other settings; rerun with --force" if stale else None
            result = {**base, "status": "stale" if stale else "missing", "error": error}
        runs[name] = result
    return runs


def stale_runs(grid: Grid, out: Path) -> list[str]:
    """Names of finished runs whose JSON holds other settings than ``grid`` asks for."""
    return [n for n, r in load_runs(grid, out).items() if r["status"] == "stale"]


class Curve(L.Callback):
    """The learning curve of a fit: ``points``, one ``{"epoch", "val/map", "val/map_50"}`` per validation
    during ``fit`` (not the sanity check, not the validation of the best checkpoint after it)."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read this validation's ``val/map`` and ``val/map_50`` (logged at its epoch end)."""
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/map" not in metrics:
            return
        point = {"epoch": trainer.current_epoch, "val/map": float(metrics["val/map"])}
        self.points.append(point | {"val/map_50": float(metrics.get("val/map_50", float("nan")))})


class _AblationCLI(DetectorCLI):
    """DetectorCLI whose fit uses at most ``max_workers`` data workers (None: as configured) and records
    the learning curve (:class:`Curve`)."""

    max_workers: int | None = None

    def before_fit(self) -> None:
        """Cap the datamodule's workers (the data are a pure function of (seed, epoch, index), whatever the
        count) and attach the curve recorder."""
        if self.max_workers is not None:
            self.datamodule.num_workers = min(self.datamodule.num_workers, self.max_workers)
        self.curve = Curve()
        self.trainer.callbacks.append(self.curve)  # type: ignore[attr-defined]  # set by its callback connector


class _Tail(io.TextIOBase):
    """A text stream that writes through to ``target`` and keeps its last lines (for a failed run's error)."""

    def __init__(self, target: Any) -> None:
        self.target, self.lines = target, deque[str](maxlen=20)

    def write(self, s: str) -> int:
        self.lines.extend(line for line in s.splitlines() if line.strip())
        return self.target.write(s)

    def flush(self) -> None:
        self.target.flush()


def _describe(err: BaseException, tail: Sequence[str]) -> str:
    """One line: the CLI's ``error: …`` line for a user mistake, else the exception's first line."""
    if isinstance(err, SystemExit):
        said = [line for line in tail if line.startswith("error:")]
        return said[-1] if said else f"exit status {err.code}"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}".rstrip(": ")


def fit_task(grid: Grid, index: int, out: Path, threads: int | None = None, max_workers: int | None = None) -> dict:
    """Run task ``index`` in this process and write ``OUT/runs/<run>.json``: status "ok" with every scalar
    ``val/*`` metric of the best checkpoint's validation and the ``curve`` of every validation during the
    fit, or status "failed" with a one-line error (re-raised)."""
    import torch
    import wandb

    if threads is not None:
        torch.set_num_threads(threads)
    name = grid.run_name(index)
    result: dict[str, Any] = {"run": name, "recipe": Path(grid.task(index)[0]).stem, **grid.identity(index)}
    result |= {"threads": torch.get_num_threads(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    tail = _Tail(sys.stderr)
    start = time.perf_counter()
    try:
        cli_class = type("CappedCLI", (_AblationCLI,), {"max_workers": max_workers})
        with contextlib.redirect_stderr(tail):
            cli = cli_class(DetectorModule, DetectionDataModule, args=grid.train_args(index, out), **cli_kwargs())
    except BaseException as err:
        traceback.print_exc()
        write_json(run_file(out, name), {**result, "status": "failed", "error": _describe(err, tail.lines)})
        raise
    finally:
        if wandb.run is not None:
            wandb.finish()
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
    ckpt = getattr(cli.trainer.checkpoint_callback, "best_model_path", None) or None
    result |= {"status": "ok", "error": None, "metrics": metrics, "minutes": (time.perf_counter() - start) / 60}
    result |= {"workers": cli.datamodule.num_workers, "best_model_path": ckpt, "curve": cli.curve.points}
    write_json(run_file(out, name), result)
    return result


def visible_gpus() -> list[str]:
    """Ids to put in ``CUDA_VISIBLE_DEVICES``, one per visible GPU (within this process's own restriction)."""
    import torch

    count = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env is not None else [str(i) for i in range(count)]
    return ids[:count]


def cores() -> int:
    """CPU cores this process may use (its affinity mask, as ``taskset`` or SLURM set it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _task_command(grid: Grid, index: int, out: Path, resources: list[str]) -> list[str]:
    """``python -m detector.ablate … --task index --force [resources] -- extra``: one run in its own process."""
    cmd = [sys.executable, "-m", f"{__package__}.ablate", "--config", grid.config, "--recipes", *grid.recipes]
    cmd += ["--seeds", *map(str, grid.seeds), "--out", str(out), "--group", grid.group, "--task", str(index)]
    return [*cmd, "--force", *resources, "--", *grid.extra]


def _settle(grid: Grid, index: int, out: Path, returncode: int, log: Path) -> dict[str, Any]:
    """The run's result as its process left it; a process that died without writing its failure (killed,
    out of memory) gets a "failed" JSON with its exit status and the last line of its log."""
    path = run_file(out, grid.run_name(index))
    result = json.loads(path.read_text()) if path.is_file() else None
    if result is None or (returncode != 0 and result.get("status") == "ok"):
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        cause = f"exit status {returncode}" if returncode != 0 else "exited without a result"
        result = {"run": grid.run_name(index), "recipe": Path(grid.task(index)[0]).stem, **grid.identity(index)}
        result |= {"status": "failed", "error": f"{cause}: {last[0]}"}
        write_json(path, result)
    return result


def run_local(grid: Grid, indices: Sequence[int], out: Path, jobs: int) -> None:
    """Run the tasks ``indices`` as ``jobs`` concurrent processes (``python -m detector.ablate --task i``),
    each with ``cores() // jobs`` threads and at most that minus one data workers when ``jobs > 1``, and one
    GPU each (round-robin) when GPUs exist. A failed process leaves a "failed" JSON; the others go on."""
    gpus = visible_gpus()
    free: queue.Queue[str | None] = queue.Queue()  # a slot per job: its GPU, handed back when its run ends
    for slot in range(jobs):
        free.put(gpus[slot % len(gpus)] if gpus else None)
    threads = max(1, cores() // jobs)
    resources = ["--threads", str(threads), "--max-workers", str(threads - 1)] if jobs > 1 else []
    env = dict(os.environ)  # children import this package, unless their working directory holds one (as python -m)
    env.pop("WANDB_SERVICE", None)  # each run starts its own wandb service (an inherited one may be gone)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    if jobs > 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)

    def one(k: int, index: int) -> None:
        name, log = grid.run_name(index), out / "runs" / f"{grid.run_name(index)}.log"
        with contextlib.suppress(FileNotFoundError):
            run_file(out, name).unlink()
        gpu = free.get()
        try:
            with log.open("w") as f:
                run_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
                cmd = _task_command(grid, index, out, resources)
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=run_env, check=False).returncode
        finally:
            free.put(gpu)
        result = _settle(grid, index, out, rc, log)
        status = "ok" if result["status"] == "ok" else f"failed ({result['error']})"
        print(f"{name} (task {k + 1} of {len(indices)}): {status}; log {log}", flush=True)

    (out / "runs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, k, i) for k, i in enumerate(indices)]:
            future.result()
