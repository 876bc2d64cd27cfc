"""Online or offline (``detector.loggers.wandb_mode``): wandb's own credential lookup for the server
wandb is configured for, then a TCP probe of that server's host; never a prompt.

Every test starts from a clean W&B environment: no key, no identity token, an empty netrc file
(``NETRC``), an empty wandb config folder, and a fresh wandb singleton (its settings are read once).
No test needs the network: a server that must answer is a socket listening on 127.0.0.1.
"""

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.sdk import wandb_setup
from wandb.sdk.lib.wbauth import authenticate

from detector.loggers import wandb_has_credentials, wandb_mode

KEY = "k" * 40  # the shape wandb accepts for an API key
FAKE = "http://wandb.detector-test.invalid:8080"  # a self-hosted server that does not exist


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    monkeypatch.setattr(authenticate, "_session_auth", None)
    return tmp_path


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every (host, port) the online check tries to connect to."""
    seen: list[tuple[str, int]] = []
    connect = socket.create_connection

    def recording(address: tuple[str, int], *args, **kwargs) -> socket.socket:  # noqa: ANN002, ANN003
        seen.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", recording)
    return seen


@pytest.fixture
def server() -> Iterator[str]:
    """A listening socket on 127.0.0.1, as the URL of a reachable self-hosted W&B server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _netrc(env: Path, machine: str) -> None:
    (env / "netrc").write_text(f"machine {machine}\n  login user\n  password {KEY}\n")


def test_no_credentials_is_offline_without_probing(env: Path, probes: list) -> None:
    assert wandb_mode("auto") == "offline" and probes == []


def test_self_hosted_server_from_netrc_unreachable_is_offline(env: Path, probes: list, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", FAKE)
    _netrc(env, "wandb.detector-test.invalid:8080")
    assert wandb_has_credentials(FAKE)  # found for the configured host ...
    assert wandb_mode("auto", timeout=1.0) == "offline"  # ... which does not answer
    assert probes == [("wandb.detector-test.invalid", 8080)]  # the configured host, not api.wandb.ai


def test_netrc_for_another_host_is_no_credentials(env: Path, probes: list, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", FAKE)
    _netrc(env, "api.wandb.ai")  # credentials for the cloud, but wandb is configured for the self-hosted server
    assert not wandb_has_credentials(FAKE)
    assert wandb_mode("auto") == "offline" and probes == []


def test_reachable_server_with_credentials_is_online(env: Path, probes: list, server: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", server)
    assert wandb_mode("auto") == "offline"  # no credentials yet
    _netrc(env, server.removeprefix("http://"))
    assert wandb_mode("auto") == "online"
    assert probes == [("127.0.0.1", int(server.rsplit(":", 1)[1]))]


@pytest.mark.parametrize("source", ["api_key", "identity_token", "settings_file"])
def test_every_credential_source_of_wandb_counts(env: Path, server: str, monkeypatch, source: str) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", server)
    if source == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", KEY)
    elif source == "identity_token":
        (env / "token").write_text("header.payload.signature")
        monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(env / "token"))
    else:
        (env / "wandb_config").mkdir()
        (env / "wandb_config" / "settings").write_text(f"[default]\nbase_url = {server}\napi_key = {KEY}\n")
    assert wandb_mode("auto") == "online"


def test_bad_credentials_count_as_none(env: Path, server: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", server)
    monkeypatch.setenv("WANDB_API_KEY", "too-short")
    with pytest.warns(UserWarning, match="W&B credentials for .* are not usable"):
        assert wandb_mode("auto") == "offline"


def test_the_environment_and_explicit_modes_win(env: Path, probes: list, server: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("WANDB_BASE_URL", server)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_mode("offline") == "offline" and wandb_mode("online") == "online"
    for env_mode, expected in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled"), ("online", "online")):  # fmt: skip
        monkeypatch.setenv("WANDB_MODE", env_mode)
        assert wandb_mode("auto") == wandb_mode("online") == expected
    assert probes == []
    with pytest.raises(ValueError, match="W&B mode must be"):
        monkeypatch.delenv("WANDB_MODE")
        wandb_mode("sometimes")


def test_auto_mode_without_credentials_starts_an_offline_run(env: Path) -> None:
    """The main job on a fresh machine: no WANDB_MODE, no key, "auto" -> an offline run, not wandb's
    "No API key configured" (wandb ignores WANDB_MODE set after its settings singleton exists, which
    the credential lookup creates; the mode must reach ``wandb.init``). A fresh interpreter, so
    wandb's process-wide state is as on a first run."""
    import os
    import subprocess
    import sys

    code = (
        "from detector.loggers import WandbLogger\n"
        f"run = WandbLogger(save_dir={str(env / 'runs')!r}, mode='auto').experiment\n"
        "print('OFFLINE', run.settings._offline, run.dir)\n"
        "run.finish()\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean |= {"WANDB_CONFIG_DIR": str(env / "wandb_config"), "NETRC": str(env / "netrc"), "HOME": str(env)}
    clean["WANDB_BASE_URL"] = FAKE  # nothing answers there: "auto" must choose offline
    done = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("OFFLINE"))
    assert line.split()[1] == "True"
    assert str(env / "runs") in line
