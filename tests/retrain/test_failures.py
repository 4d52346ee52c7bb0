"""A retrain job whose surroundings fail: a work directory that cannot be written or a full disk,
a Python that is not there, a registry whose pointer is broken, an evaluation that wrote no
usable scores, and a publish that took effect although its command failed. Each ends with a
reason that says what broke (never "unexpected error" and an exception's repr), and nothing
that serves changes unless the job published. Fast: no training, stand-ins for the commands."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.errors import RolecastError
from bot.retrain.children import Failed, RolecastCommands
from bot.retrain.gate import GateAndPublish
from bot.retrain.jobs import Job, JobStore
from bot.retrain.progress import Progress, TrainLog, describe
from bot.retrain.runner import RetrainService
from bot.retrain.workdir import Paths
from bot.settings import BotSettings
from formats import basemodel
from formats.registry import AdapterRegistry
from serving.publish import Publisher
from tests.adapters import fake_lora
from tests.retrain.conftest import approve, shared_dialogues

Step = Callable[[str, list[str]], Awaitable[str]]


class StandInCommands(RolecastCommands):
    """`rolecast ...` steps answered by the test: `step(what, args) -> output`."""

    def __init__(self, step: Step) -> None:
        super().__init__("python")
        self.step = step

    async def check(self, what: str, args: list[str], log_path: Path) -> str:
        return await self.step(what, args)


def settings_for(tmp_path: Path, **retrain: object) -> BotSettings:
    return BotSettings(
        home=tmp_path,
        adapters_dir=tmp_path / "adapters",
        retrain={"min_approved": 2, **retrain},  # type: ignore[arg-type]
    )


def service_for(memory: Memory, settings: BotSettings) -> RetrainService:
    return RetrainService(
        memory, PersonaRegistry(settings.user_personas).load(), settings, server_url=None
    )


def unexplained(reason: str | None) -> bool:
    text = reason or ""
    return "unexpected error" in text or "Error(" in text or "Traceback" in text


@pytest.mark.parametrize("given", [1, 0, -3])
async def test_fewer_than_two_dialogues_cannot_be_asked_for(
    given: int, memory: Memory, tmp_path: Path
) -> None:
    service = service_for(memory, settings_for(tmp_path))
    with pytest.raises(RolecastError, match="at least 2"):
        await service.start("haruhi", requested_by="t", min_approved=given)
    assert await service.store.recent() == []


async def test_a_persona_with_one_approved_dialogue_is_rejected_saying_so(
    memory: Memory, data_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 1))
    service = service_for(memory, settings_for(tmp_path))
    job = await service.wait((await service.start("haruhi", requested_by="t")).id)
    assert job.state == "rejected"
    assert job.reason == "凉宫春日 has 1 approved dialogues; a retrain needs 2: approve 1 more."


@pytest.mark.parametrize("trouble", ["a file", "a full disk"])
async def test_a_work_directory_that_cannot_be_written_fails_the_job_saying_where(
    trouble: str, memory: Memory, data_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 4))
    workdir = tmp_path / "jobs"
    service = service_for(memory, settings_for(tmp_path, workdir=workdir))
    if trouble == "a file":  # after the settings were read (they refuse a file at start)
        workdir.write_text("not a folder")
        where = str(workdir)
        with pytest.raises(ValueError, match="is a file, not a folder"):
            settings_for(tmp_path, workdir=workdir)
    else:  # the first job's export lands on a device that is always full
        export = workdir / "haruhi-1" / "export" / "haruhi.jsonl"
        export.parent.mkdir(parents=True)
        export.symlink_to("/dev/full")
        where = f"No space left on device (in {workdir / 'haruhi-1'})"
    job = await service.wait((await service.start("haruhi", requested_by="t")).id)
    assert job.state == "failed" and not unexplained(job.reason), job.reason
    assert job.reason is not None and job.reason.startswith("exporting stopped: ")
    assert where in job.reason


async def test_a_python_that_is_not_there_fails_the_job_saying_which(
    memory: Memory, data_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 4))
    service = service_for(memory, settings_for(tmp_path, python="/no/such/python"))
    job = await service.wait((await service.start("haruhi", requested_by="t")).id)
    assert job.state == "failed" and not unexplained(job.reason), job.reason
    assert "could not start '/no/such/python'" in (job.reason or "")


def broken_pointer(settings: BotSettings) -> AdapterRegistry:
    registry = AdapterRegistry(settings.adapters)
    (registry.root / "haruhi").mkdir(parents=True)
    (registry.root / "haruhi" / "current.json").write_text("{half a pointer")
    return registry


def test_a_broken_pointer_is_gated_against_what_users_get_instead(tmp_path: Path) -> None:
    # the bot reads a pointer it cannot read as no version: the base model, or for a shipped
    # persona on the default model the shipped adapter; the gate holds the new adapter to that
    settings = settings_for(tmp_path)
    broken_pointer(settings)
    gate = GateAndPublish(None, settings, None, None)  # type: ignore[arg-type]
    assert gate.live("haruhi", shipped=False) is None
    assert gate.live("haruhi", shipped=True) == (basemodel.SHIPPED_DIR, basemodel.SHIPPED_NAME)


async def job_at(store: JobStore, state: str) -> Job:
    job = await store.create("haruhi", min_approved=2, requested_by="t")
    for step in ("exporting", "training", "evaluating", "publishing"):
        job = await store.move(job, step)  # type: ignore[arg-type]
        if step == state:
            return job
    raise AssertionError(state)


def trained(paths: Paths, job: Job) -> None:
    """What training and the gate leave in the work directory."""
    fake_lora(paths.adapter, manifest={"retrain_job": job.id, "created": "2025-01-01T00:00:00"})
    paths.validation.parent.mkdir(parents=True, exist_ok=True)
    paths.validation.write_text("")


async def trained_job_at(
    memory: Memory, tmp_path: Path, state: str
) -> tuple[BotSettings, JobStore, Job, Paths]:
    """A job at `state` whose training left its adapter in the work directory."""
    settings = settings_for(tmp_path)
    store = JobStore(memory.db)
    job = await job_at(store, state)
    paths = Paths(tmp_path / "w", "haruhi")
    trained(paths, job)
    return settings, store, job, paths


SCORES = {"bleu-4": 1.0, "rouge-l": 2.0, "own_probability": 50.0}


@pytest.mark.parametrize(
    "metrics",
    [
        None,  # no metrics.json at all
        "{half",
        "[]",
        json.dumps({"dialogues": 3}),
        json.dumps({"scores": {"adapter": SCORES}}),  # no figure for what users get
        json.dumps({"scores": {"adapter": {"bleu-4": 1.0}, "base": SCORES}}),
        json.dumps({"scores": {"adapter": {**SCORES, "rouge-l": "high"}, "base": SCORES}}),
        json.dumps({"scores": {"adapter": SCORES, "base": SCORES}, "consistency": [1]}),
    ],
)
async def test_an_evaluation_without_usable_scores_fails_the_job_saying_so(
    metrics: str | None, memory: Memory, tmp_path: Path
) -> None:
    settings, store, job, paths = await trained_job_at(memory, tmp_path, "evaluating")

    async def evaluation(what: str, args: list[str]) -> str:
        paths.eval_dir.mkdir(parents=True, exist_ok=True)
        if metrics is not None:
            (paths.eval_dir / "metrics.json").write_text(metrics)
        return ""

    gate = GateAndPublish(store, settings, StandInCommands(evaluation), None)
    with pytest.raises(Failed, match=r"the evaluation's .*metrics\.json"):
        await gate.evaluate(job, paths)
    assert (await store.get(job.id)).state == "evaluating"


async def test_a_publish_that_took_effect_before_its_command_failed_is_done(
    memory: Memory, tmp_path: Path
) -> None:
    settings, store, job, paths = await trained_job_at(memory, tmp_path, "publishing")
    registry = AdapterRegistry(settings.adapters)

    async def switched_then_died(what: str, args: list[str]) -> str:
        Publisher(registry, max_rank=64).publish("haruhi", paths.adapter)
        raise Failed("publishing failed (exit code -9):\n")  # killed before it printed

    gate = GateAndPublish(store, settings, StandInCommands(switched_then_died), None)
    job = await gate.publish(job, paths)
    assert job.state == "done" and job.new_version == "haruhi@v1"
    assert registry.current_served_name("haruhi") == "haruhi@v1"


async def test_a_publish_that_failed_before_switching_fails_and_changes_nothing(
    memory: Memory, tmp_path: Path
) -> None:
    settings, store, job, paths = await trained_job_at(memory, tmp_path, "publishing")
    registry = broken_pointer(settings)

    async def refused(what: str, args: list[str]) -> str:
        raise Failed("publishing failed (exit code 1):\nerror: the server refused to load")

    gate = GateAndPublish(store, settings, StandInCommands(refused), None)
    with pytest.raises(Failed, match="refused to load"):
        await gate.publish(job, paths)
    assert (registry.root / "haruhi" / "current.json").read_text() == "{half a pointer"


def test_training_lines_of_the_wrong_shape_are_not_taken_for_progress(tmp_path: Path) -> None:
    # a launch wrapper or a library may print JSON objects with a "type" of its own
    log = tmp_path / "train.log"
    garbage = [
        {"type": "start", "total_steps": "many"},
        {"type": "progress"},
        {"type": "progress", "step": "three"},
        {"type": "progress", "step": None},
        {"type": "progress", "step": 1e400},
        {"type": "progress", "step": True},
        {"type": "progress", "step": -1},
        {"type": "checkpoint", "step": "x"},
        {"type": "checkpoint"},
        {"type": "result", "adapter": "x", "nested": 1},  # a result is an object: taken below
    ]
    good = {"type": "progress", "step": 2, "total_steps": 8, "loss": "low", "eta_s": 1e400}
    text = "".join(json.dumps(e) + "\n" for e in garbage[:-1])
    text += '{"type": "progress", "step": ' + "[" * 100_000 + "\n"  # nests too deep
    log.write_text(text + json.dumps(good) + "\n")
    reader = TrainLog(log)
    progress = reader.poll()
    assert progress == Progress(step=2, total_steps=8, loss=None, tokens_per_s=None, eta_s=None)
    assert reader.total_steps is None and reader.checkpoint_step is None
    assert describe(replace_job(progress)) == "job #1 haruhi: training, step 2/8"


def replace_job(progress: Progress) -> Job:
    values = dict.fromkeys(Job.__dataclass_fields__)
    values.update(
        id=1, persona="haruhi", state="training", min_approved=2, attempts=1, created_at=0.0,
        updated_at=0.0, step=progress.step, total_steps=progress.total_steps,
        loss=progress.loss, tokens_per_s=progress.tokens_per_s, eta_s=progress.eta_s,
    )  # fmt: skip
    return Job(**values)  # type: ignore[arg-type]


async def test_a_job_that_fails_while_training_runs_stops_its_training(
    memory: Memory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the run would go on for minutes; following it breaks (the database cannot be written)
    slow = (
        "{python} -c 'import json, time; "
        'print(json.dumps({{"type": "progress", "step": 1}}), flush=True); time.sleep(120)\' '
        "{output}"
    )
    settings = settings_for(tmp_path, launch=slow, poll_s=0.05)
    service = service_for(memory, settings)
    job = await job_at(service.store, "training")

    async def disk_io_error(*args: object, **kwargs: object) -> Job:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(service.store, "set_progress", disk_io_error)
    with pytest.raises(sqlite3.OperationalError):
        await service.training.run(job, Paths(tmp_path / "w", "haruhi"))
    pid = (await service.store.get(job.id)).pid
    assert pid is not None
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the training process still runs"
        await asyncio.sleep(0.05)


async def test_a_refused_rollback_says_every_reason(memory: Memory, tmp_path: Path) -> None:
    service = service_for(memory, settings_for(tmp_path))
    registry = AdapterRegistry(service.registry.root)
    for n in (1, 2):
        publisher = Publisher(registry, max_rank=64)
        publisher.publish("haruhi", fake_lora(tmp_path / f"a{n}"))
    (registry.root / "haruhi" / "v1" / "adapter_config.json").unlink()
    service.commands = RolecastCommands(sys.executable)  # the real `rolecast adapters rollback`
    with pytest.raises(RolecastError) as refused:
        await service.rollback("haruhi")
    said = str(refused.value)
    assert said.startswith("cannot roll haruhi back to haruhi@v1; it stays on haruhi@v2:")
    assert "adapter_config.json" in said.splitlines()[-1]
    assert registry.current_served_name("haruhi") == "haruhi@v2"
