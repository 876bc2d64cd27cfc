"""Weights & Biases through Lightning's ``WandbLogger``, which never prompts and never waits,
the online/offline decision (:func:`wandb_mode`) and the two helpers the W&B callbacks share
(:func:`wandb_run`, :func:`log_to_wandb`)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

Mode = Literal["online", "offline", "disabled"]


def wandb_server() -> str:
    """The W&B server URL wandb itself would use: ``WANDB_BASE_URL``, else its settings files, else the cloud."""
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings.base_url


def wandb_has_credentials(server: str) -> bool:
    """True when wandb finds credentials for ``server`` without prompting.

    wandb's own lookup (``wandb.sdk.lib.wbauth.authenticate_session`` with ``prompt=False``, as
    ``wandb.login(prompt=False)`` does, but without touching the session or any file), in its order:
    ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE``, the netrc file (``NETRC`` or ``~/.netrc``)
    entry for the server's host, the ``api_key`` of wandb's settings files. Credentials in a bad
    format count as none (with a warning)."""
    from wandb.errors import Error as WandbError
    from wandb.sdk.lib import wbauth

    try:
        auth = wbauth.authenticate_session(host=server, source="detector", prompt=False, update_session=False)
    except (WandbError, ValueError) as err:
        rank_zero_warn(f"W&B credentials for {server} are not usable ({err}); logging offline")
        return False
    return auth is not None


def server_reachable(server: str, timeout: float = 2.0) -> bool:
    """True when the host of ``server`` (its port, else 443 for https and 80 for http) accepts a TCP
    connection within ``timeout`` seconds, name lookup included."""
    parts = urlsplit(server)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup must not hold us up
    thread.start()
    thread.join(timeout)
    return bool(answered)


def wandb_can_go_online(timeout: float = 2.0) -> bool:
    """True when wandb has credentials for its configured server and that server's host answers."""
    server = wandb_server()
    return wandb_has_credentials(server) and server_reachable(server, timeout)


def wandb_mode(requested: str = "auto", timeout: float = 2.0) -> Mode:
    """How a W&B run should start: "online", "offline" or "disabled"; never prompts.

    ``WANDB_MODE`` in the environment wins ("disabled"; "offline"/"dryrun" -> "offline"; anything
    else "online"). Otherwise "online"/"offline" are kept as requested, and "auto" is "online" only
    when :func:`wandb_can_go_online` (credentials for the configured server, which answers within
    ``timeout`` s), else "offline". Offline runs are uploaded later with ``wandb sync``.
    """
    env = os.environ.get("WANDB_MODE")
    if env:
        return "disabled" if env == "disabled" else "offline" if env in ("offline", "dryrun") else "online"
    if requested not in ("auto", "online", "offline"):
        raise ValueError(f"W&B mode must be 'auto', 'online' or 'offline', got {requested!r}")
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "online" if wandb_can_go_online(timeout) else "offline"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``mode``: "online", "offline", or "auto" (the default).

    "auto" goes online only when wandb has credentials for its server and that server answers
    (:func:`wandb_mode`), otherwise offline: no login prompt, no waiting. ``WANDB_MODE`` in the
    environment wins. Offline runs are written under ``save_dir`` and can be uploaded later with
    ``wandb sync``. Remaining keyword arguments go to ``wandb.init`` (e.g. ``group``, ``tags``,
    ``entity``, ``id``; a given ``id`` resumes that run: Lightning passes ``resume="allow"``).

    ``log_model``: True logs, when ``fit`` ends, the best checkpoint (the ``best_model_path`` of the
    first ``ModelCheckpoint`` with a monitor) with alias ``best`` and then the newest checkpoint file
    of any ``ModelCheckpoint`` (``last.ckpt``) with alias ``latest``, as versions of the ``model``
    artifact ``model-<run id>`` (file ``model.ckpt``; metadata ``epoch``, ``step``, ``score``); the run
    summary's ``model/best/epoch``, ``model/best/step``, ``model/latest/epoch``, ``model/latest/step``
    say what each holds. "all" does the same after every checkpoint save. Unlike Lightning's logger
    this works offline too: the artifacts are recorded in the offline run and uploaded by ``wandb sync``.
    """

    def __init__(
        self,
        project: str = "detector",
        name: str | None = None,
        save_dir: str = "runs",
        mode: Literal["auto", "online", "offline"] = "auto",
        log_model: bool | Literal["all"] = False,
        group: str | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        resolved = wandb_mode(mode)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        if kwargs.get("settings") is None:
            kwargs["settings"] = {"silent": True, "init_timeout": 30}
        # the CLI passes every wandb.init argument, unset ones as None; resume=None would make wandb
        # start a new run under a given id instead of continuing it (Lightning's own default is "allow")
        kwargs["resume"] = kwargs.get("resume") or "allow"
        # the mode goes to wandb.init itself: Lightning's `offline` only sets WANDB_MODE, which wandb
        # ignores once its settings singleton exists (wandb_mode's credential lookup creates it)
        kwargs["mode"] = resolved
        offline = resolved == "offline"
        super().__init__(
            name=name, save_dir=save_dir, offline=offline, project=project, group=group, tags=tags, **kwargs
        )
        self._log_model = log_model  # set here: Lightning refuses log_model offline, wandb records it for `wandb sync`
        self._logged: dict[str, float] = {}  # "path|aliases" -> modification time when logged
        self._saved: set[str] = set()  # checkpoint files written since they were last logged

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Note the ``ModelCheckpoint``'s files (to log when ``fit`` ends); ``log_model="all"``: log now."""
        self._checkpoint_callbacks[id(checkpoint_callback)] = checkpoint_callback
        self._saved.update(p for p in (checkpoint_callback.best_model_path, checkpoint_callback.last_model_path) if p)
        if self._log_model == "all":
            self._log_checkpoints()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Log the best and latest checkpoints (``log_model``) after a ``fit`` that saved any and
        succeeded; offline, say where the run was written and how to upload it."""
        if status == "success" and self._log_model and self._saved:
            self._log_checkpoints()
        if self._offline and self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            rank_zero_info(f"W&B run written offline to {run_dir}; upload it with: wandb sync {run_dir}")

    def _log_checkpoints(self) -> None:
        """Log ``best`` then ``latest``, each unless already logged unchanged, and ``latest`` again
        whenever ``best`` was just logged: wandb gives every logged version the alias ``latest`` too,
        and W&B keeps it on the newest one."""
        if self._experiment is None or getattr(self._experiment, "disabled", False):
            return
        callbacks = list(self._checkpoint_callbacks.values())
        paths = {p for p in self._saved if Path(p).is_file()}  # top-k files replaced since are gone
        self._saved = paths
        if not paths:
            return
        saved = {p: _epoch_step(p) for p in paths}
        # the newest state; at equal steps a last*.ckpt (the file --ckpt_path last resumes), then the newer file
        latest = max(paths, key=lambda p: (saved[p][1], Path(p).name.startswith("last"), Path(p).stat().st_mtime))
        ranked = next((cb for cb in callbacks if cb.monitor and cb.best_model_path in paths), None)
        if ranked is None or ranked.best_model_path == latest:
            score = ranked.best_model_score if ranked else None
            self._log_checkpoint(latest, ["best", "latest"], saved[latest], score)
        elif self._log_checkpoint(
            ranked.best_model_path, ["best"], saved[ranked.best_model_path], ranked.best_model_score
        ):
            self._log_checkpoint(latest, ["latest"], saved[latest], None, force=True)
        else:
            self._log_checkpoint(latest, ["latest"], saved[latest], None)

    def _log_checkpoint(
        self, path: str, aliases: list[str], epoch_step: tuple[int, int], score: Any, force: bool = False
    ) -> bool:
        """One version of the ``model`` artifact, its epoch and step in the metadata and the summary;
        False (nothing logged) when this file was logged unchanged with these aliases before."""
        import wandb

        run: Any = self._experiment
        epoch, step = epoch_step
        run.summary.update({f"model/{a}/{k}": v for a in aliases for k, v in (("epoch", epoch), ("step", step))})
        key = f"{path}|{','.join(aliases)}"
        mtime = Path(path).stat().st_mtime
        if self._logged.get(key) == mtime and not force:
            return False
        self._logged[key] = mtime
        metadata = {"epoch": epoch, "step": step, "original_filename": Path(path).name}
        if score is not None:
            metadata["score"] = float(score)
        artifact = wandb.Artifact(name=self._checkpoint_name or f"model-{run.id}", type="model", metadata=metadata)
        artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
        run.log_artifact(artifact, aliases=aliases)
        return True


def _epoch_step(path: str) -> tuple[int, int]:
    """``(epoch, global_step)`` stored in a Lightning checkpoint (memory-mapped: the tensors are not read)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("epoch", -1)), int(state.get("global_step", -1))


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
