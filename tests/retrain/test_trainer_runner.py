"""The retrain loop of a bot with no training side of its own, as deployed: every step that
needs torch (clean, split, train, eval) and the publish run on the trainer's `rolecast runner`,
reached through `rolecast-remote` in place of the loop's Python (`retrain.python`); the job
still ends published and the next reply comes from the new version."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.core.sidecar import EmbeddedServer
from bot.retrain.runner import RetrainService
from formats.registry import AdapterRegistry
from tests.retrain.conftest import approve, retrain_settings, shared_dialogues
from tests.retrain.test_loop import reply_model
from tests.test_runner import running_runner


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The trainer's runner, as the compose file starts it (with a token)."""
    with running_runner(tmp_path_factory.mktemp("trainer"), "t0ken") as url:
        yield url


async def test_the_loop_runs_its_steps_on_the_trainer(
    memory: Memory,
    server: EmbeddedServer,
    adapters_root: Path,
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    trainer: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the bot's side: rolecast-remote stands in for its Python (the image has no torch)
    remote = tmp_path / "rolecast-remote"
    remote.write_text(f'#!/bin/sh\nexec {sys.executable} -m rolecast.remote "$@"\n')
    remote.chmod(0o755)
    monkeypatch.setenv("ROLECAST_RUNNER_URL", trainer)
    monkeypatch.setenv("ROLECAST_RUNNER_TOKEN", "t0ken")
    await approve(memory, shared_dialogues(data_dir, 10))
    settings = retrain_settings(
        tmp_path, adapters_root, server.url, tiny_model_dir, python=str(remote)
    )
    personas = PersonaRegistry(settings.user_personas).load()
    before = AdapterRegistry(adapters_root).current("haruhi")

    service = RetrainService(memory, personas, settings, server_url=server.url)
    job = await service.start("haruhi", requested_by="admin", guild_id="g1")
    job = await service.wait(job.id)
    await service.aclose()

    assert job.state == "done", job.reason
    workdir = service.paths(job).workdir
    launch = next(ln for ln in (workdir / "train.log").read_text().splitlines() if ln[:2] == "$ ")
    assert launch.split()[1:4] == [str(remote), "-m", "rolecast"]  # through the trainer
    steps = (workdir / "steps.log").read_text()
    for step in ("data clean", "data split", "eval", "adapters publish"):
        assert f"$ {remote} -m rolecast {step}" in steps
    live = AdapterRegistry(adapters_root).current("haruhi")
    assert live is not None and live.served_name == job.new_version
    assert live.version == (before.version if before else 0) + 1
    async with ModelClient.from_settings(settings, server.base_url) as client:
        assert await reply_model(memory, personas, client) == job.new_version
