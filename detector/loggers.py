"""Weights & Biases through Lightning's ``WandbLogger``, which never prompts and never waits,
and the two helpers the W&B callbacks share (:func:`wandb_run`, :func:`log_to_wandb`)."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"


def wandb_can_go_online(timeout: float = 2.0) -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY`` or ``~/.netrc``) and its API host answers."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(WANDB_HOST) is not None
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return False
    try:
        socket.create_connection((WANDB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``mode``: "online", "offline", or "auto" (the default).

    "auto" goes online only when credentials exist and the W&B host is reachable (a 2 s check),
    otherwise offline: no login prompt, no waiting. ``WANDB_MODE`` in the environment wins.
    Offline runs are written under ``save_dir`` and can be uploaded later with ``wandb sync``.
    Remaining keyword arguments go to ``wandb.init`` (e.g. ``group``, ``tags``, ``entity``).

    ``log_model``: True logs the best and the last checkpoint of every ``ModelCheckpoint`` as a
    ``model`` artifact when training ends (aliases ``best`` and ``latest``); "all" logs each one as
    it is written. Unlike Lightning's logger this works offline too: the artifact is recorded in the
    offline run and uploaded by ``wandb sync``.
    """

    def __init__(
        self,
        project: str = "detector",
        name: str | None = None,
        save_dir: str = "runs",
        mode: Literal["auto", "online", "offline"] = "auto",
        log_model: bool = False,
        group: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode:
            offline = env_mode in ("offline", "dryrun", "disabled")
        elif mode == "auto":
            offline = not wandb_can_go_online()
        else:
            offline = mode == "offline"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if kwargs.get("settings") is None:
            kwargs["settings"] = {"silent": True, "init_timeout": 30}
        super().__init__(
            name=name, save_dir=save_dir, offline=offline, project=project, group=group, tags=tags, **kwargs
        )
        self._log_model = log_model  # set here: Lightning refuses log_model offline, wandb records it for `wandb sync`

    def finalize(self, status: str) -> None:
        """Close the run as Lightning does; offline, say where it was written and how to upload it."""
        super().finalize(status)
        if self._offline and self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            rank_zero_info(f"W&B run written offline to {run_dir}; upload it with: wandb sync {run_dir}")


def wandb_run(trainer: L.Trainer) -> Any | None:
    """The W&B run of the trainer's first ``WandbLogger`` on global rank 0; None elsewhere, and
    when no ``WandbLogger`` is attached (``--trainer.logger false``, CSV), so callbacks skip."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            return logger.experiment
    return None


def log_to_wandb(trainer: L.Trainer, data: dict[str, Any]) -> bool:
    """Log ``data`` (media, tables, charts) to the W&B run at the trainer's global step, as
    Lightning's ``WandbLogger.log_metrics`` does, so panels share the ``trainer/global_step`` axis.
    Returns False (nothing logged) where :func:`wandb_run` is None."""
    run = wandb_run(trainer)
    if run is None:
        return False
    run.log({**data, "trainer/global_step": trainer.global_step})
    return True
