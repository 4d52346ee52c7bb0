"""The closed loop end to end on a CPU: approved dialogues -> `rolecast train` in its own
process -> gate with `rolecast eval` -> `rolecast adapters publish` on a real embedded server ->
the next reply goes through the new version. A runner killed mid-training is picked up by a new
one; a failing training process and a rejecting gate leave what users get as it was.

The tests share one server and registry and run in file order: the first publishes a version,
the others check that nothing moves from wherever it stands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bot.core.chat import ChatService
from bot.core.client import Completion, ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.core.sidecar import EmbeddedServer
from bot.retrain.jobs import Job, JobActive
from bot.retrain.runner import RetrainService
from bot.retrain.training import TrainingProcess
from bot.settings import SamplingSettings
from formats.registry import AdapterRegistry
from tests.retrain.conftest import (
    TRAIN_ARGS,
    approve,
    retrain_settings,
    shared_dialogues,
    wait_until,
)


def served(server: EmbeddedServer) -> set[str]:
    cards = httpx.get(f"{server.base_url}/models", timeout=10).json()["data"]
    return {c["id"] for c in cards}


async def reply_model(memory: Memory, personas: PersonaRegistry, client: ModelClient) -> str:
    """The served name the bot's next reply to haruhi's channel is requested with (the reply
    text of a random tiny model may be empty, which the chat service refuses to store)."""
    chat = ChatService(memory, personas, client)
    key = "discord:reply-check"
    await memory.set_persona(key, "haruhi")
    await memory.add_turn(key, persona="haruhi", role="user", content="团长，今天做什么？")
    model = await client.model_for("haruhi")
    card = personas.get("haruhi").card
    prompt = await chat.prompts.build(key, card, "haruhi", model=model, max_tokens=4)
    done = None
    async for event in client.stream_chat(model, prompt.messages, SamplingSettings(max_tokens=4)):
        if isinstance(event, Completion):
            done = event
    await chat.aclose()
    assert done is not None and done.completion_tokens
    return done.model


async def test_retrain_survives_a_restart_publishes_and_the_next_reply_uses_it(
    memory: Memory,
    server: EmbeddedServer,
    adapters_root: Path,
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    await approve(memory, shared_dialogues(data_dir, 10))
    # another persona's approved dialogues in the same guild: replayed into training
    await approve(memory, shared_dialogues(data_dir, 4, "xin"), channel="c2", persona="xin")
    settings = retrain_settings(tmp_path, adapters_root, server.url, tiny_model_dir)
    personas = PersonaRegistry(settings.user_personas).load()
    before = AdapterRegistry(adapters_root).current("haruhi")
    seen: list[Job] = []

    async def listener(job: Job) -> None:
        seen.append(job)

    first = RetrainService(memory, personas, settings, server_url=server.url, listener=listener)
    job = await first.start("haruhi", requested_by="admin", guild_id="g1")
    workdir = first.workdir_for(job)
    step2 = workdir / "adapter/checkpoints/step-2/state.json"
    step4 = workdir / "adapter/checkpoints/step-4/state.json"
    await wait_until(step2.is_file, 180, "the first checkpoint")
    running = await first.store.get(job.id)
    pid = running.pid
    assert pid is not None and running.pid_started is not None
    os.kill(pid, signal.SIGSTOP)  # hold training here while the runner "restarts"
    await first.aclose()  # the bot stops; the training process does not
    assert TrainingProcess(pid, running.pid_started).alive()
    assert not TrainingProcess(pid, running.pid_started - 60).alive()  # a recycled pid
    assert (await first.store.get(job.id)).state == "training"

    second = RetrainService(memory, personas, settings, server_url=server.url, listener=listener)
    with pytest.raises(JobActive, match=rf"job #{job.id} for haruhi is training since"):
        await second.start("haruhi", requested_by="admin")
    assert [j.id for j in await second.resume_jobs()] == [job.id]
    os.kill(pid, signal.SIGCONT)  # followed by the new runner ...
    await wait_until(step4.is_file, 120, "the second checkpoint")
    os.kill(pid, signal.SIGKILL)  # ... then it dies: the runner resumes from its checkpoint
    job = await second.wait(job.id)

    assert job.state == "done", job.reason
    assert job.attempts == 2 and job.pid is None and job.pid_started is None
    lines = (workdir / "train.log").read_text().splitlines()
    launches = [line for line in lines if line.startswith("$ ")]
    assert len(launches) == 2 and "--resume" not in launches[0] and "--resume" in launches[1]
    assert all("--json" in line for line in launches)
    events = [json.loads(line) for line in lines if line.startswith('{"type"')]
    assert {e["type"] for e in events} >= {"start", "progress", "checkpoint", "result"}
    starts = [e["step"] for e in events if e["type"] == "start"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 4  # resumed, from a checkpoint
    steps = [
        json.loads(line)["step"]
        for line in (workdir / "adapter/loss.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == list(range(1, 13))  # resumed, not restarted: every step once
    states = [j.state for j in seen]
    for state in ("queued", "exporting", "training", "evaluating", "publishing", "done"):
        assert state in states
    progress = [j for j in seen if j.state == "training" and j.step]
    assert progress and progress[-1].total_steps == 12 and progress[-1].loss is not None
    assert any(j.tokens_per_s and j.eta_s is not None for j in progress)

    # published: the registry points at the next version, the server serves it, the old is gone
    new_version = (before.version if before else 0) + 1
    assert job.new_version == f"haruhi@v{new_version}"
    assert job.old_version == (before.served_name if before else None)
    live = AdapterRegistry(adapters_root).current("haruhi")
    assert live is not None and live.served_name == job.new_version
    assert live.manifest.retrain_job == job.id and "bleu-4" in live.manifest.metrics
    assert live.manifest.eval is not None and live.manifest.eval.against == (
        before.served_name if before else "the base model"
    )
    assert job.metrics is not None and job.metrics["passed"] is True
    # replayed, said, and a class of the persona-consistency check the gate made
    assert job.metrics["replay"]["replayed"] == {"xin": 4}
    steps_log = (workdir / "steps.log").read_text(encoding="utf-8")
    assert "replayed 4 dialogues of other personas (xin 4)" in steps_log
    consistency = job.metrics["consistency"]
    assert consistency["classes"] == ["(other speakers)", "haruhi", "xin"]
    assert consistency["metric"] == "own_probability"
    assert all("own_probability" in s and "recognised" in s for s in job.metrics["scores"].values())
    assert any(c.startswith("own_probability: ") for c in job.metrics["checks"])
    assert "own_probability" in live.manifest.metrics
    assert job.new_version in served(server)
    assert (workdir / "adapter/loss.png").is_file() and (workdir / "eval/metrics.png").is_file()

    async with ModelClient.from_settings(settings, server.base_url) as client:
        assert await reply_model(memory, personas, client) == job.new_version


async def test_failing_training_leaves_the_served_version(
    memory: Memory,
    server: EmbeddedServer,
    adapters_root: Path,
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    await approve(memory, shared_dialogues(data_dir, 10))
    settings = retrain_settings(
        tmp_path,
        adapters_root,
        server.url,
        tiny_model_dir,
        launch="{python} -c 'import sys; print(\"CUDA out of memory\"); sys.exit(1)' {output}",
    )
    personas = PersonaRegistry(settings.user_personas).load()
    pointer, models = AdapterRegistry(adapters_root).pointer("haruhi"), served(server)
    service = RetrainService(memory, personas, settings, server_url=server.url)
    job = await service.wait((await service.start("haruhi", requested_by="admin")).id)

    assert job.state == "failed"
    assert job.reason is not None and "exit code 1" in job.reason
    assert "CUDA out of memory" in job.reason
    assert AdapterRegistry(adapters_root).pointer("haruhi") == pointer and served(server) == models
    # a new job may start once this one has ended
    again = await service.start("haruhi", requested_by="admin", min_approved=50)
    assert (await service.wait(again.id)).state == "rejected"


async def test_a_rejecting_gate_changes_nothing(
    memory: Memory,
    server: EmbeddedServer,
    adapters_root: Path,
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    await approve(memory, shared_dialogues(data_dir, 10))
    # BLEU-4 and ROUGE-L may drop as they like, but the persona consistency would have to win
    # by more than its scale allows
    settings = retrain_settings(
        tmp_path, adapters_root, server.url, tiny_model_dir, tolerance=100.0,
        consistency_tolerance=-100.0,
        train_args=["--max_steps", "2", "--max_length", "1024", "--batch_tokens", "1024"],
    )  # fmt: skip
    personas = PersonaRegistry(settings.user_personas).load()
    pointer, models = AdapterRegistry(adapters_root).pointer("haruhi"), served(server)
    versions = [v.version for v in AdapterRegistry(adapters_root).versions("haruhi")]
    service = RetrainService(memory, personas, settings, server_url=server.url)
    job = await service.wait((await service.start("haruhi", requested_by="admin")).id)

    assert job.state == "rejected", job.reason
    assert job.reason is not None and "worse than" in job.reason
    assert "\nown_probability: " in job.reason and "\nbleu-4: " not in job.reason  # what failed
    assert "own_probability" in job.reason.split("\n\n")[-1]  # the table shows it
    assert job.metrics is not None and job.metrics["passed"] is False
    live = AdapterRegistry(adapters_root).current("haruhi")
    expected_against = live.served_name if live else "the base model"
    assert job.metrics["against"] == expected_against and expected_against in job.metrics["scores"]
    assert AdapterRegistry(adapters_root).pointer("haruhi") == pointer and served(server) == models
    assert [v.version for v in AdapterRegistry(adapters_root).versions("haruhi")] == versions


def test_retrain_from_a_dialogue_file_in_the_terminal(
    server: EmbeddedServer,
    adapters_root: Path,
    tiny_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    """`rolecast retrain --data FILE`: the loop without Discord and without approvals, from an
    OpenAI JSONL file another tool wrote (no system prompts: the card's is used)."""
    rows = [
        {"id": f"file_{i}", "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": reply},
        ]}
        for i, (user, reply) in enumerate(shared_dialogues(data_dir, 10))
    ]  # fmt: skip
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    before = AdapterRegistry(adapters_root).current("haruhi")
    env = {
        **os.environ,
        "ROLECAST_HOME": str(tmp_path),
        "ROLECAST_RETRAIN__BASE": str(tiny_model_dir),
        "ROLECAST_RETRAIN__MIN_APPROVED": "8",
        "ROLECAST_RETRAIN__MAX_LENGTH": "1024",
        "ROLECAST_RETRAIN__VALIDATION": "0.25",
        "ROLECAST_RETRAIN__EVAL_MAX_NEW_TOKENS": "8",
        "ROLECAST_RETRAIN__POLL_S": "0.1",
        "ROLECAST_RETRAIN__TRAIN_ARGS": json.dumps(["--max_steps", "2", *TRAIN_ARGS[2:]]),
        # a random tiny model: what is tested is the loop, not whether it learnt
        "ROLECAST_RETRAIN__TOLERANCE": "100",
        "ROLECAST_RETRAIN__CONSISTENCY_TOLERANCE": "100",
    }
    result = subprocess.run(
        [sys.executable, "-m", "rolecast", "retrain", "--persona", "haruhi", "--data", str(data),
         "--server", server.url, "--adapters-dir", str(adapters_root)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    version = (before.version if before else 0) + 1
    assert f"haruhi now speaks through haruhi@v{version}" in result.stdout, result.stdout
    assert "no replay: no other persona has usable approved dialogues here" in result.stdout
    live = AdapterRegistry(adapters_root).current("haruhi")
    assert live is not None and live.served_name == f"haruhi@v{version}"
    assert f"haruhi@v{version}" in served(server)
