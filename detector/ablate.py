"""Train every loss recipe on the same data and seed, then tabulate and plot the results.

    python -m detector.ablate --config configs/default.yaml --recipes configs/losses/*.yaml
    python -m detector.ablate --config configs/default.yaml --recipes configs/losses/*.yaml \\
        --out runs/ablation -- --trainer.max_epochs 10        # anything after -- goes to every run

Each recipe is one ``train.py`` fit (with the best checkpoint validated at the end), layered as
``--config BASE --config RECIPE``, with the same ``seed_everything``. W&B runs share one group;
a last run of that group holds the table and the plot. Writes ``OUT/ablation.md`` and
``OUT/ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .cli import main as cli_main  # noqa: E402
from .loggers import wandb_can_go_online  # noqa: E402


def run_recipe(base: str, recipe: str, group: str, extra: list[str]) -> dict[str, float]:
    """Fit one recipe in this process; returns its final val/map, val/map_50 and wall time in minutes."""
    import wandb

    name = Path(recipe).stem
    args = ["fit", "--config", base, "--config", recipe, *extra]
    uses_wandb = "--trainer.logger" not in " ".join(extra)
    if uses_wandb:
        args += ["--trainer.logger.init_args.group", group, "--trainer.logger.init_args.name", name]
    start = time.perf_counter()
    cli = cli_main(args)
    minutes = (time.perf_counter() - start) / 60
    if wandb.run is not None:
        wandb.finish()
    m = cli.trainer.callback_metrics
    return {"map": float(m["val/map"]), "map_50": float(m["val/map_50"]), "minutes": minutes}


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per recipe: mAP, mAP@50 and wall time."""
    lines = ["| recipe | val/map | val/map_50 | wall time (min) |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['map']:.3f} | {r['map_50']:.3f} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    """Bars of mAP and mAP@50 per recipe, wall time on a second axis."""
    names = list(results)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    ax.bar([i - 0.2 for i in x], [results[n]["map"] for n in names], 0.4, label="val/map")
    ax.bar([i + 0.2 for i in x], [results[n]["map_50"] for n in names], 0.4, label="val/map_50")
    ax.set_xticks(list(x), names, rotation=30)
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(list(x), [results[n]["minutes"] for n in names], "k.--", label="minutes")
    twin.set_ylabel("wall time (min)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_summary(results: dict[str, dict[str, float]], group: str, save_dir: str, image: Path) -> None:
    """One more W&B run in the group with the table and the plot (offline unless online is possible)."""
    import wandb

    mode: Literal["online", "offline"] = "online" if wandb_can_go_online() else "offline"
    if os.environ.get("WANDB_MODE") in ("online", "offline"):  # as WandbLogger: the environment wins
        mode = "online" if os.environ["WANDB_MODE"] == "online" else "offline"
    run = wandb.init(project="detector", group=group, name="summary", job_type="ablation", dir=save_dir, mode=mode)
    table = wandb.Table(columns=["recipe", "val/map", "val/map_50", "minutes"])
    for name, r in results.items():
        table.add_data(name, r["map"], r["map_50"], r["minutes"])
    run.log({"ablation/table": table, "ablation/plot": wandb.Image(str(image))})
    run.finish()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Parse ``--config BASE --recipes R [R ...] [--out DIR] [-- extra train.py args]`` and run the ablation."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m detector.ablate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="base config, e.g. configs/default.yaml")
    parser.add_argument("--recipes", nargs="+", required=True, help="loss recipe YAML files")
    parser.add_argument("--out", default="runs/ablation", help="folder for ablation.md / .png / .json")
    parser.add_argument("--group", default=None, help="W&B group (default: ablation-<time>)")
    args = parser.parse_args(argv)
    missing = [p for p in [args.config, *args.recipes] if not Path(p).is_file()]
    if missing:
        parser.error(f"config file(s) not found: {', '.join(missing)}")
    group = args.group or datetime.now().strftime("ablation-%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {Path(r).stem: run_recipe(args.config, r, group, extra) for r in args.recipes}
    (out / "ablation.md").write_text(markdown_table(results))
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "ablation.png")
    if "--trainer.logger" not in " ".join(extra):
        log_summary(results, group, str(out), out / "ablation.png")
    print(markdown_table(results))
    print(f"written: {out / 'ablation.md'}, {out / 'ablation.png'}")
    return results


if __name__ == "__main__":
    main()
