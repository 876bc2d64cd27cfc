"""Cluster launches resolve to the right ranks, and the cluster scripts build the right command.

A 2-node × 8-GPU job is simulated through the variables srun (SLURM) or torchrun set in each
process: the real configs (default + trainer/ddp + cluster/slurm) are instantiated by the CLI,
and Lightning's SLURMEnvironment / TorchElasticEnvironment must give every process its global
rank, local rank, node rank and the world size. No process group is created. The scripts run
with stand-ins for ``srun``, ``torchrun`` and ``scontrol`` that record their arguments.
"""

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from detector.cli import DetectorCLI, cli_kwargs, main
from detector.data import DetectionDataModule
from detector.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / name for name in ("default.yaml", "trainer/ddp.yaml", "cluster/slurm.yaml")]
LAUNCH_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)
SLURM_2X8 = {
    "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "detector", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODELIST": "gpu[017-018]", "SLURM_GPUS_PER_NODE": "8",
}  # fmt: skip


@contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """The process environment without any launcher variable, plus ``extra``; restored afterwards."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in LAUNCH_VARS
    }
    with mock.patch.dict(os.environ, {**clean, **extra}, clear=True):
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster") / "shapes"


def _cli(data_root: Path, *extra: str, configs: list[Path] = CONFIGS) -> DetectorCLI:
    args = [arg for c in configs for arg in ("--config", str(c))] + [
        "--trainer.accelerator", "cpu", "--trainer.strategy.init_args.process_group_backend", "gloo",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(data_root.parent / "runs"),
        "--data.root", str(data_root), "--data.embedded.num_train", "4", "--data.embedded.num_val", "2",
        "--data.image_size", "64", "--data.num_workers", "0", *extra,
    ]  # fmt: skip
    return DetectorCLI(DetectorModule, DetectionDataModule, run=False, args=args, **cli_kwargs())


@pytest.mark.parametrize("node,local", [(0, 0), (0, 7), (1, 0), (1, 3), (1, 7)])
def test_slurm_2x8_ranks(data_root: Path, node: int, local: int) -> None:
    env = {**SLURM_2X8, "SLURM_PROCID": str(8 * node + local), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node)}
    with _environ(env):
        trainer = _cli(data_root, "--trainer.num_nodes", "2", "--trainer.devices", "8").trainer
        cluster = trainer.strategy.cluster_environment
        assert isinstance(cluster, SLURMEnvironment)
        assert cluster.auto_requeue and cluster.requeue_signal == signal.SIGUSR1
        assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8 * node + local, local, node)
        assert (trainer.world_size, trainer.num_nodes, trainer.num_devices) == (16, 2, 8)
        assert trainer.is_global_zero == (node == local == 0)
        assert cluster.main_address == "gpu017"  # the first node of the list
        assert cluster.main_port == 15000 + 3456  # from the job id, the same in every process


@pytest.mark.parametrize("node,local", [(0, 0), (1, 5)])
def test_torchrun_2x8_ranks(data_root: Path, node: int, local: int) -> None:
    env = {
        "TORCHELASTIC_RUN_ID": "exp1", "RANK": str(8 * node + local), "LOCAL_RANK": str(local), "GROUP_RANK": str(node),
        "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
    }  # fmt: skip
    with _environ(env):
        trainer = _cli(data_root, "--trainer.num_nodes", "2", "--trainer.devices", "8", configs=CONFIGS[:2]).trainer
        assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
        assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8 * node + local, local, node)
        assert (trainer.world_size, trainer.num_nodes, trainer.num_devices) == (16, 2, 8)


def _stand_in(tmp_path: Path, name: str) -> Path:
    """An executable ``name`` on a private PATH folder that writes its arguments, one a line, to ``<name>.args``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path / name}.args"\n')
    exe.chmod(0o755)
    return bin_dir


def _run_script(tmp_path: Path, script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    path = f"{_stand_in(tmp_path, 'srun')}:{os.environ['PATH']}"
    _stand_in(tmp_path, "torchrun")
    with _environ({**env, "PATH": path, "RUNS": str(tmp_path / "runs")}):
        return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(
    "script", ["scripts/slurm/train.sbatch", "scripts/torchrun.sh", "scripts/batch_rule.sh", "scripts/resume.sh"]
)
def test_scripts_are_valid_bash(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "procs,batch,accumulate,lr",
    [
        (16, 8, 1, "0.02"),
        (8, 8, 1, "0.01"),
        (2, 8, 4, "0.01"),
        (1, 8, 8, "0.01"),
        (3, 8, 3, "0.01125"),
        (1, 64, 1, "0.01"),
    ],
)
def test_batch_rule(procs: int, batch: int, accumulate: int, lr: str) -> None:
    cmd = f"source {ROOT}/scripts/batch_rule.sh && batch_rule_args {procs} {batch} 64 0.01"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["--trainer.accumulate_grad_batches", str(accumulate), "--model.lr", lr]


def test_batch_rule_rejects_bad_input() -> None:
    proc = subprocess.run(
        ["bash", "-c", f"source {ROOT}/scripts/batch_rule.sh && batch_rule_args 0 8 64 0.01"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "positive integers" in proc.stderr


def test_sbatch_command_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    env = {
        **SLURM_2X8,
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_CPUS_PER_TASK": "8",
    }
    proc = _run_script(tmp_path, "scripts/slurm/train.sbatch", env, "--trainer.max_epochs", "3")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "train.py"]
    run_dir = tmp_path / "runs" / "slurm-123456"
    expected = {"--trainer.num_nodes": "2", "--trainer.devices": "8", "--trainer.accumulate_grad_batches": "1", "--model.lr": "0.02",
                "--data.num_workers": "7", "--trainer.default_root_dir": str(run_dir), "--trainer.logger.init_args.id": "123456"}  # fmt: skip
    assert {flag: _value(args, flag) for flag in expected} == expected
    assert "--ckpt_path" not in args and args[-2:] == ["--trainer.max_epochs", "3"]  # a first start: from scratch
    with pytest.raises(SystemExit) as exit_info:  # the command parses with the real CLI
        main([*args[3:], "--trainer.accelerator", "cpu", "--print_config"])
    assert exit_info.value.code == 0 and "num_nodes: 2" in capsys.readouterr().out
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    last = run_dir / "detector" / "123456" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    hpc.touch(), last.touch()
    for newest, older in ((hpc, last), (last, hpc)):  # a requeue resumes from whichever was written last
        os.utime(older, (1e9, 1e9))
        os.utime(newest, (2e9, 2e9))
        assert _run_script(tmp_path, "scripts/slurm/train.sbatch", env).returncode == 0
        assert _value((tmp_path / "srun.args").read_text().splitlines(), "--ckpt_path") == str(newest)
    assert not hpc.exists() and last.exists()  # an hpc_ckpt older than the checkpoint resumed from is deleted
    newer_hpc = run_dir / "hpc_ckpt_2.ckpt"
    newer_hpc.touch()
    os.utime(newer_hpc, (3e9, 3e9))
    assert _run_script(tmp_path, "scripts/slurm/train.sbatch", env).returncode == 0
    assert _value((tmp_path / "srun.args").read_text().splitlines(), "--ckpt_path") == str(newer_hpc)
    assert newer_hpc.exists() and last.exists()  # a last.ckpt is never deleted


def test_sbatch_layers_several_configs(tmp_path: Path) -> None:
    env = {**SLURM_2X8, "SLURM_SUBMIT_DIR": str(ROOT), "CONFIG": "configs/default.yaml configs/yolov3_coco.yaml"}
    assert _run_script(tmp_path, "scripts/slurm/train.sbatch", env).returncode == 0
    args = (tmp_path / "srun.args").read_text().splitlines()
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert configs == ["configs/default.yaml", "configs/yolov3_coco.yaml", "configs/trainer/ddp.yaml",
                       "configs/cluster/slurm.yaml"]  # fmt: skip


def test_sbatch_signals_before_the_time_limit() -> None:
    """SLURM's --signal is the requeue signal of configs/cluster/slurm.yaml, with at least 120 s to save."""
    lines = (ROOT / "scripts" / "slurm" / "train.sbatch").read_text().splitlines()
    (signal_line,) = [line for line in lines if line.startswith("#SBATCH --signal=")]
    name, seconds = signal_line.removeprefix("#SBATCH --signal=").split("@")
    config = yaml.safe_load((ROOT / "configs" / "cluster" / "slurm.yaml").read_text())
    (plugin,) = config["trainer"]["plugins"]
    assert name == plugin["init_args"]["requeue_signal"] == "SIGUSR1" and plugin["init_args"]["auto_requeue"]
    assert int(seconds) >= 120 and "#SBATCH --requeue" in lines


def test_resume_script_adds_the_newest_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "exp1"
    cmd = [
        "bash",
        str(ROOT / "scripts" / "resume.sh"),
        str(run_dir),
        str(_stand_in(tmp_path, "python") / "python"),
        "train.py",
    ]
    assert subprocess.run(cmd, check=True).returncode == 0
    assert (tmp_path / "python.args").read_text().splitlines() == ["train.py"]  # a first start: from scratch
    hpc, last = run_dir / "hpc_ckpt_3.ckpt", run_dir / "detector" / "exp1" / "checkpoints" / "last.ckpt"
    other = run_dir / "detector" / "exp1" / "checkpoints" / "epoch004-map0.1000.ckpt"  # a best one: not resumed from
    last.parent.mkdir(parents=True)
    for path, mtime in ((hpc, 1e9), (last, 2e9), (other, 3e9)):
        path.touch()
        os.utime(path, (mtime, mtime))
    subprocess.run(cmd, check=True)
    assert (tmp_path / "python.args").read_text().splitlines() == ["train.py", "--ckpt_path", str(last)]


def test_sbatch_refuses_tasks_that_are_not_one_per_gpu(tmp_path: Path) -> None:
    env = {**SLURM_2X8, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NTASKS_PER_NODE": "1"}
    proc = _run_script(tmp_path, "scripts/slurm/train.sbatch", env)
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr
    assert not (tmp_path / "srun.args").exists()


def test_torchrun_command(tmp_path: Path) -> None:
    env = {
        "RUN_ID": "exp1",
        "NNODES": "2",
        "NPROC": "8",
        "RDZV_HOST": "node0",
        "TORCHRUN": str(tmp_path / "bin" / "torchrun"),
    }
    proc = _run_script(tmp_path, "scripts/torchrun.sh", env, "--trainer.max_epochs", "3")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "torchrun.args").read_text().splitlines()
    expected = {"--nnodes": "2", "--nproc-per-node": "8", "--rdzv-backend": "c10d", "--rdzv-endpoint": "node0:29500",
                "--rdzv-id": "exp1", "--trainer.num_nodes": "2", "--trainer.devices": "8", "--model.lr": "0.02",
                "--trainer.logger.init_args.id": "exp1"}  # fmt: skip
    assert {flag: _value(args, flag) for flag in expected} == expected
    # every worker starts through resume.sh, which adds --ckpt_path when the run has a checkpoint
    start = args.index("--no-python")
    assert args[start + 1 : start + 6] == [
        "bash",
        "scripts/resume.sh",
        str(tmp_path / "runs" / "exp1"),
        "python",
        "train.py",
    ]
    assert "--ckpt_path" not in args and args[-2:] == ["--trainer.max_epochs", "3"]


class _Preempt(Callback):
    """Sends this process SIGUSR1 after its first training batch, as SLURM does before the time limit."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_sigusr1_saves_hpc_checkpoint_and_requeues(data_root: Path, tmp_path: Path) -> None:
    env = {**SLURM_2X8, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
    env["PATH"] = f"{_stand_in(tmp_path, 'scontrol')}:{os.environ['PATH']}"
    root = tmp_path / "job"
    common = ("--trainer.devices", "1", "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
              "--trainer.limit_val_batches", "0", "--data.batch_size", "2")  # fmt: skip
    with _environ(env):
        cli = _cli(data_root, "--trainer.strategy", "auto", *common)
        cli.trainer.callbacks.append(_Preempt())
        cli.trainer.fit(cli.model, cli.datamodule)
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "123456"]
        hpc = root / "hpc_ckpt_1.ckpt"
        assert hpc.is_file()
        cli = _cli(data_root, "--trainer.strategy", "auto", *common)
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(hpc))
        assert cli.trainer.global_step == 2  # 4 images / batch 2: resumed after the first step, not from zero
