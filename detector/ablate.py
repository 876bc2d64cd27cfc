"""Train every loss recipe with several seeds on the same data, then tabulate and plot mean ± std per recipe.

    python -m detector.ablate --config configs/default.yaml --recipes configs/losses/*.yaml --seeds 0 1 2
    python -m detector.ablate --config configs/default.yaml --recipes configs/losses/*.yaml --seeds 0 1 2 \\
        --jobs 2 --out runs/ablation -- --trainer.max_epochs 10      # anything after -- goes to every run
    python -m detector.ablate ... --list           # the task grid and the SLURM job-array commands
    python -m detector.ablate ... --task 4         # run task 4 only (a SLURM array task)
    python -m detector.ablate --collect runs/ablation   # tabulate what the tasks wrote

Each (recipe, seed) is one ``train.py`` fit, ``--config BASE --config RECIPE [extra] --seed_everything
SEED --data.seed SEED`` (weights, batch order and augmentation follow the seed; the embedded dataset's
own ``data.embedded.seed`` stays as configured, so every run sees the same images), its best checkpoint
validated at the end; each writes ``OUT/runs/<recipe>-s<seed>.json``. A run whose JSON exists is
skipped (``--force`` reruns it), so an interrupted ablation resumes. The report is ``OUT/ablation.md``,
``OUT/ablation.json`` and ``OUT/ablation.png``; W&B gets one run per fit in one group and a ``summary``
run with the tables and the plot. The exit status is 1 when a run failed or is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from .ablate_report import RULE, end_markdown, end_of_training, log_summary, markdown, plot, summarize
from .ablate_runs import Grid, fit_task, load_grid, load_runs, run_file, run_local, save_grid, stale_runs


def build_parser() -> argparse.ArgumentParser:
    """The command line (everything before ``--``; what follows goes to every ``train.py`` run)."""
    p = argparse.ArgumentParser(prog="python -m detector.ablate", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--config", help="base config, e.g. configs/default.yaml")
    p.add_argument("--recipes", nargs="+", help="loss recipe YAML files; runs are named after the file stem")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--reference", help="recipe name the others are compared with (default: the first recipe)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, as separate processes (default 1)")
    p.add_argument("--out", default="runs/ablation", help="folder for runs/*.json, ablation.md/.json/.png")
    p.add_argument("--group", help="W&B group (default: kept from OUT/grid.json, else ablation-<time>)")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    p.add_argument("--list", action="store_true", help="print the task grid and the SLURM commands; run nothing")
    p.add_argument("--task", type=int, help="run only this task index (a SLURM array task); no report")
    p.add_argument("--collect", metavar="DIR", help="only tabulate the runs found in DIR (after a job array)")
    p.add_argument("--threads", type=int, help="per run: torch threads (set by --jobs; default: torch's)")
    p.add_argument("--max-workers", type=int, help="per run: cap on data.num_workers (set by --jobs)")
    return p


def default_group(out: Path) -> str:
    """The group of an earlier ablation in ``out``, else ``ablation-<SLURM array job id>``, else ``ablation-<time>``."""
    if (out / "grid.json").is_file():
        return load_grid(out).group
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"ablation-{os.environ['SLURM_ARRAY_JOB_ID']}"
    return datetime.now().strftime("ablation-%Y%m%d-%H%M%S")


def _no_nan(x: Any) -> Any:
    """``x`` with NaN floats as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def report(grid: Grid, out: Path, reference: str | None) -> int:
    """Write ablation.md/.json/.png from ``OUT/runs/*.json`` (and the W&B summary run); 1 if a run failed or is missing."""
    reference = reference or grid.names[0]
    if reference not in grid.names:
        raise ValueError(f"--reference {reference}: not one of the recipes {', '.join(grid.names)}")
    runs = load_runs(grid, out)
    summary = summarize(runs, grid.names, grid.seeds, reference)
    extra = f", extra arguments `{shlex.join(grid.extra)}`" if grid.extra else ""
    header = (
        f"Ablation `{grid.group}`: {len(grid.names)} recipes × {len(grid.seeds)} seeds "
        f"({', '.join(map(str, grid.seeds))}) on `{grid.config}`{extra}; reference `{reference}`."
    )
    end = end_of_training(runs, grid.names)
    table = markdown(summary, runs, grid.seeds, header) + end_markdown(end)
    (out / "ablation.md").write_text(table)
    doc = {"grid": asdict(grid), "reference": reference, "rule": RULE, "recipes": summary, "end": end, "runs": runs}
    (out / "ablation.json").write_text(json.dumps(_no_nan(doc), indent=2) + "\n")
    plot(summary, out / "ablation.png", reference)
    if grid.uses_wandb:
        log_summary(summary, runs, grid.group, str(out), out / "ablation.png")
    print(table)
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    bad = [f"{n} ({r['status']})" for n, r in runs.items() if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(runs)} runs did not finish: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def print_list(grid: Grid, argv: list[str], out: Path) -> None:
    """The task grid, then the commands that run it as a SLURM job array and collect it."""
    print("task  run")
    for i in range(len(grid)):
        print(f"{i:4d}  {grid.run_name(i)}")
    args = shlex.join(a for a in argv if a != "--list")
    print("\nAs a SLURM job array (from the repository root), then the report once every task has ended:")
    print(f"  jid=$(sbatch --parsable --array 0-{len(grid) - 1} scripts/slurm/ablate.sbatch {args})")
    print(f"  sbatch --dependency afterany:$jid --wrap {shlex.quote(f'python -m detector.ablate --collect {out}')}")


def make_grid(args: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser) -> Grid:
    """The grid the arguments ask for; a user mistake exits with one line."""
    if not args.config or not args.recipes:
        parser.error("--config and --recipes are required (or --collect DIR)")
    missing = [p for p in [args.config, *args.recipes] if not Path(p).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        grid = Grid(args.config, tuple(args.recipes), tuple(args.seeds), tuple(extra), args.group or "")
        if args.task is not None:
            grid.task(args.task)  # an index outside the grid: one line
        if args.reference is not None and args.reference not in grid.names:
            raise ValueError(f"--reference {args.reference}: not one of the recipes {', '.join(grid.names)}")
        return Grid(grid.config, grid.recipes, grid.seeds, grid.extra, args.group or default_group(Path(args.out)))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run, list, run one task of, or collect an ablation; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    if args.collect:
        try:
            return report(load_grid(Path(args.collect)), Path(args.collect), args.reference)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
    out = Path(args.out)
    grid = make_grid(args, argv[cut + 1 :], parser)
    if args.list:
        print_list(grid, argv, out)
        return 0
    stale = [] if args.force else stale_runs(grid, out)
    if stale:
        parser.error(f"{out / 'runs'} holds runs made with other settings ({', '.join(stale)}): --force reruns them")
    save_grid(grid, out)
    runs = load_runs(grid, out)
    todo = [i for i in range(len(grid)) if args.force or runs[grid.run_name(i)]["status"] != "ok"]
    if args.task is not None:
        if args.task not in todo:
            print(f"{run_file(out, grid.run_name(args.task))} exists: skipped (--force reruns it)")
            return 0
        fit_task(grid, args.task, out, args.threads, args.max_workers)
        return 0
    print(
        f"{len(grid)} runs, {len(grid) - len(todo)} already done (skipped), {len(todo)} to run, {args.jobs} at a time"
    )
    run_local(grid, todo, out, args.jobs)
    return report(grid, out, args.reference)


if __name__ == "__main__":
    sys.exit(main())
