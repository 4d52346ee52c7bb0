"""The job store, progress from the trainer's log, rejection for too few dialogues, and the
client following the registry's pointer. Fast: no training process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.instant_server import InstantServer, ServerState
from bot.retrain.jobs import JobActive, JobStore
from bot.retrain.progress import LossLogReader, planned_steps
from bot.retrain.runner import RetrainService, gate
from bot.settings import BotSettings
from tests.retrain.conftest import approve, shared_dialogues


async def test_one_active_job_per_persona(memory: Memory) -> None:
    store = JobStore(memory.db)
    job = await store.create("haruhi", min_approved=5, requested_by="1")
    assert job.state == "queued" and job.created_at <= time.time()
    other = await store.create("atri", min_approved=5, requested_by="1")  # another persona: fine
    job = await store.move(job, "exporting")
    job = await store.move(job, "training")
    with pytest.raises(JobActive, match=rf"job #{job.id} for haruhi is training since 20"):
        await store.create("haruhi", min_approved=5, requested_by="2")
    assert job.exporting_at and job.training_at and job.exporting_at <= job.training_at
    assert {j.id for j in await store.unfinished()} == {job.id, other.id}
    job = await store.move(job, "failed", "training failed (exit code 1)")
    assert job.finished_at and job.reason == "training failed (exit code 1)"
    again = await store.create("haruhi", min_approved=5, requested_by="2")  # ended: a new one
    assert again.id != job.id
    with pytest.raises(Exception, match="failed already"):
        await store.move(job, "training")


async def test_too_few_dialogues_are_rejected_saying_how_many_more(
    memory: Memory, data_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 3))
    await approve(memory, shared_dialogues(data_dir, 4), guild="other", channel="c9")
    settings = BotSettings(home=tmp_path, retrain={"min_approved": 5})  # type: ignore[arg-type]
    personas = PersonaRegistry(settings.user_personas).load()
    service = RetrainService(memory, personas, settings, server_url=None)
    job = await service.wait((await service.start("haruhi", requested_by="1", guild_id="g1")).id)
    assert job.state == "rejected"
    assert (
        job.reason
        == "凉宫春日 has 3 approved dialogues in this server; a retrain needs 5: approve 2 more."
    )
    # without a guild (the terminal job), every guild's dialogues count
    job = await service.wait((await service.start("haruhi", requested_by="1", min_approved=10)).id)
    assert job.reason == "凉宫春日 has 7 approved dialogues; a retrain needs 10: approve 3 more."


def test_progress_from_the_loss_log(tmp_path: Path) -> None:
    log = tmp_path / "loss.jsonl"
    reader = LossLogReader(log, epochs=2.0)
    assert reader.poll() is None  # not written yet
    lines = [{"step": s, "epoch": s / 4, "loss": 3.0 - s / 10, "tokens": 1000 * s} for s in (1, 2)]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "ep')
    progress = reader.poll()
    assert progress is not None and progress.step == 2 and progress.total_steps == 8
    time.sleep(0.05)
    with log.open("a") as f:  # the half-written line is completed, then a validation line
        f.write('och": 0.75, "loss": 2.7, "tokens": 3000}\n{"step": 3, "validation_loss": 2.9}\n')
    progress = reader.poll()
    assert progress is not None and progress.step == 3 and progress.loss == 2.7
    assert progress.tokens_per_s and progress.tokens_per_s > 0
    assert progress.eta_s is not None and progress.eta_s > 0
    assert reader.poll() is None  # nothing new
    assert planned_steps(["--max_steps", "12", "--epochs=2"]) == (12, 2.0)
    assert planned_steps([]) == (None, 3.0)


def test_gate_allows_a_drop_within_the_tolerance_only() -> None:
    scores = {
        "baseline": {"bleu-4": 10.0, "rouge-l": 20.0},
        "adapter": {"bleu-4": 9.5, "rouge-l": 21.0},
    }
    assert gate(scores, "baseline", 1.0)[0] is True
    ok, lines = gate(scores, "baseline", 0.4)
    assert ok is False and lines[0].startswith("bleu-4: 9.50 vs 10.00 (-0.50) worse")
    assert gate(scores, "baseline", -0.5)[0] is False  # negative: it must win on both


async def test_client_follows_the_registry_pointer(tmp_path: Path) -> None:
    state = ServerState(adapters=["haruhi@v1", "haruhi@v2", "haruhi@v3"])
    root = tmp_path / "adapters"
    (root / "haruhi").mkdir(parents=True)

    def point(version: int) -> None:
        pointer = {"version": version, "served_name": f"haruhi@v{version}"}
        (root / "haruhi" / "current.json").write_text(json.dumps(pointer))

    with InstantServer(state) as server:
        async with ModelClient(server.base_url, adapters_dir=root) as client:
            assert await client.model_for("haruhi") == "haruhi@v3"  # no pointer: the newest
            point(1)  # rolled back while v2 and v3 are still loaded
            assert await client.model_for("haruhi") == "haruhi@v1"
            point(7)  # not loaded (yet): the newest loaded one still answers
            assert await client.model_for("haruhi") == "haruhi@v3"
            state.adapters.append("haruhi@v7")  # loaded a moment later: found on a refresh
            await asyncio.sleep(1.05)
            assert await client.model_for("haruhi") == "haruhi@v7"
            assert await client.model_for("atri") == "instant-base"


async def test_training_is_told_the_length_cleaning_kept(memory: Memory, tmp_path: Path) -> None:
    """Cleaning keeps dialogues up to `retrain.max_length`; the trainer refuses any longer than
    its own --max_length (2048 unless given), so it gets the same limit; train_args still win."""
    from finetune.config import parse_train_args

    personas = PersonaRegistry(tmp_path / "personas").load()
    for train_args, expected in (([], 4096), (["--max_length", "1024"], 1024)):
        retrain = {"max_length": 4096, "train_args": train_args}
        settings = BotSettings(home=tmp_path, retrain=retrain)  # type: ignore[arg-type]
        service = RetrainService(memory, personas, settings, server_url=None)
        job = await service.store.create("haruhi", min_approved=5, requested_by="1")
        argv = service.train_command(job, resume=False)
        assert argv[1:4] == ["-m", "rolecast", "train"]
        assert parse_train_args(argv[4:]).max_length == expected
        await service.store.move(job, "failed", "only the command was built")
