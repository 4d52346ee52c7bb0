"""deploy/: the compose file and the env file template give the bot, the model server and the
trainer one registry path, mounted where each sees it, with one variable per thing; the trainer
reaches a GPU and runs the bot's retrain steps, which the bot's torch-free image cannot."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from bot.settings import BotSettings
from formats.lora import same_base
from formats.paths import DEPRECATED, RolecastPaths
from serving.cli import registry_for
from serving.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose and systemd read them (comments and blank lines skipped,
    surrounding quotes dropped)."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def service_env(compose: dict, name: str) -> dict[str, str]:
    """A service's environment: its env_file (the template, as the README says to copy it),
    then its `environment`, which wins."""
    service = compose["services"][name]
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for file in [files] if isinstance(files, str) else files:
        assert file == "rolecast.env"
        env.update(read_env_file(DEPLOY / "rolecast.env.example"))
    extra = service.get("environment") or {}
    if isinstance(extra, list):
        extra = dict(item.split("=", 1) for item in extra)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mounts(compose: dict, name: str) -> dict[str, str]:
    """Named volumes of a service: container path -> volume."""
    found = {}
    for entry in compose["services"][name].get("volumes", []):
        source, _, target = str(entry).partition(":")
        found[target.split(":")[0]] = source
    return found


def interpolate(text: str, env: dict[str, str]) -> str:
    """`${VAR}` and `${VAR:-default}` as compose fills them from `--env-file rolecast.env`."""

    def value(match: re.Match[str]) -> str:
        name, _, default = match.group(1).partition(":-")
        return env.get(name) or default

    return re.sub(r"\$\{([^}]+)\}", value, text)


@pytest.fixture
def compose() -> dict:
    """The configuration compose renders with the env file template."""
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    rendered: dict = yaml.safe_load(
        interpolate(text, read_env_file(DEPLOY / "rolecast.env.example"))
    )
    return rendered


def gpus(compose: dict, name: str) -> list[str]:
    """The GPUs a service reserves (device ids; [] when it reserves none)."""
    reservations = (
        compose["services"][name].get("deploy", {}).get("resources", {}).get("reservations", {})
    )
    found = []
    for device in reservations.get("devices", []):
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        found += [str(d) for d in device["device_ids"]]
    return found


def health_port(compose: dict, name: str) -> int:
    test = " ".join(compose["services"][name]["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)/health", test)
    assert match, test
    return int(match.group(1))


def in_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(("ROLECAST_", "XDG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ROLECAST_CONFIG", "/nonexistent/rolecast.toml")
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_bot_and_model_server_resolve_one_registry(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        in_environment(m, service_env(compose, "bot"))
        bot_registry = BotSettings().adapters
        bot_home = BotSettings().home
    with monkeypatch.context() as m:
        in_environment(m, service_env(compose, "vllm"))
        server_registry = registry_for(None).root  # what `rolecast serve --engine vllm` loads
    assert bot_registry == server_registry == Path("/srv/rolecast/adapters")
    # ... and both see it there: the same named volume, mounted at that path in each
    assert mounts(compose, "bot")[str(bot_registry)] == mounts(compose, "vllm")[str(bot_registry)]
    assert str(bot_home) in mounts(compose, "bot")  # the database outlives the container


def test_one_variable_per_thing(compose: dict) -> None:
    template = read_env_file(DEPLOY / "rolecast.env.example")
    assert "ROLECAST_ADAPTERS_DIR" in template
    for name in ("bot", "vllm"):
        assert not set(DEPRECATED) & set(service_env(compose, name)), name
    units = [p.read_text() for p in (DEPLOY / "systemd").glob("*.service")]
    assert units and all("EnvironmentFile=/etc/rolecast/rolecast.env" in u for u in units)
    assert all(template["ROLECAST_ADAPTERS_DIR"] in u for u in units if "ReadWritePaths" in u)


def test_the_trainer_reaches_a_gpu_and_shares_the_registry_with_vllm(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"vllm", "trainer", "bot"}
    assert gpus(compose, "vllm") == ["0"] and gpus(compose, "trainer") == ["0"]
    assert gpus(compose, "bot") == []  # the bot is an HTTP client
    for name in services:
        assert services[name]["env_file"] == "rolecast.env"
    registry = Path(service_env(compose, "trainer")["ROLECAST_ADAPTERS_DIR"])
    volume = {mounts(compose, name)[str(registry)] for name in services}
    assert volume == {"adapters"}  # one volume, at one path, in all three
    cache = service_env(compose, "vllm")["ROLECAST_CACHE_DIR"]
    assert mounts(compose, "vllm")[cache] == mounts(compose, "trainer")[cache] == "cache"
    assert service_env(compose, "vllm")["HF_HOME"].startswith(cache + "/")
    # one user writes the shared volumes, and every image makes their folders that user's
    users = {services[name].get("user") for name in ("vllm", "trainer")}
    assert users == {"1000:1000"}
    assert "USER 1000:1000" in (DEPLOY / "Dockerfile").read_text()
    for dockerfile in ("Dockerfile", "Dockerfile.vllm", "Dockerfile.trainer"):
        assert "chown -R 1000:1000 /srv/rolecast" in (DEPLOY / dockerfile).read_text()
    # vLLM and training share the GPU: vLLM leaves room (it takes 0.9 by default)
    with pytest.MonkeyPatch.context() as m:
        in_environment(m, service_env(compose, "vllm"))
        serve = ServeSettings()
    assert serve.gpu_memory_utilization is not None and serve.gpu_memory_utilization < 0.9
    assert serve.max_lora_rank >= 256  # the README's recipe can be published


def test_the_bots_retrain_steps_run_on_the_trainer(compose: dict) -> None:
    services = compose["services"]
    with pytest.MonkeyPatch.context() as m:
        in_environment(m, service_env(compose, "bot"))
        bot = BotSettings()
    with pytest.MonkeyPatch.context() as m:
        in_environment(m, service_env(compose, "vllm"))
        served = ServeSettings().model
    # the loop's `python -m rolecast ...` steps go through rolecast-remote to the runner
    assert bot.retrain.python == "rolecast-remote"
    scripts = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rolecast-remote"] == "rolecast.remote:main"
    assert "{python}" in bot.retrain.launch
    runner = urlsplit(service_env(compose, "bot")["ROLECAST_RUNNER_URL"])
    command = services["trainer"]["command"]
    assert runner.hostname == "trainer" and command[0] == "runner"
    assert (
        runner.port == int(command[command.index("--port") + 1]) == health_port(compose, "trainer")
    )
    assert command[command.index("--host") + 1] == "0.0.0.0" and "ports" not in services["trainer"]
    assert "ROLECAST_RUNNER_TOKEN" in read_env_file(DEPLOY / "rolecast.env.example")
    # it trains on the model vLLM serves, and the step's paths mean the same in both
    assert same_base(bot.retrain.base, served)
    workdir = str(bot.retrain_dir)
    assert mounts(compose, "bot")[workdir] == mounts(compose, "trainer")[workdir] == "retrain"
    with pytest.MonkeyPatch.context() as m:
        in_environment(m, service_env(compose, "trainer"))
        assert RolecastPaths().adapters == bot.adapters
    # the bot waits for both; the bot's image has no torch, the trainer's the train extra
    for name in ("vllm", "trainer"):
        assert services["bot"]["depends_on"][name]["condition"] == "service_healthy"
    assert health_port(compose, "vllm") == int(service_env(compose, "vllm")["ROLECAST_SERVE_PORT"])
    install = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if "pip install" in ln]
    assert install == ["RUN pip install --no-cache-dir ."]
    trainer = (DEPLOY / "Dockerfile.trainer").read_text()
    assert '".[train]"' in trainer and "-c /tmp/keep-torch.txt" in trainer
    entry = re.findall(r"^(ENTRYPOINT|CMD) (.+)$", trainer, re.M)
    assert [shlex.split(v.strip("[]").replace(",", " ")) for _, v in entry] == [
        ["rolecast"], ["runner", "--host", "0.0.0.0", "--port", "8200"],
    ]  # fmt: skip
