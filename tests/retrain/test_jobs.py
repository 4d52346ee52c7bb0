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
from bot.retrain.gate import gate
from bot.retrain.jobs import JobActive, JobStore
from bot.retrain.progress import TrainLog
from bot.retrain.runner import RetrainService
from bot.settings import BotSettings
from tests.instant_server import InstantServer, ServerState
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


def test_progress_from_the_training_runs_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    reader = TrainLog(log)
    assert reader.poll() is None  # not written yet
    start = {"type": "start", "step": 0, "total_steps": 8, "dialogues": 9, "tokens": 900}
    steps = [
        {"type": "progress", "step": s, "total_steps": 8, "loss": 3.0 - s / 10,
         "tokens_per_s": 100.0 * s, "eta_s": 8.0 - s}
        for s in (1, 2)
    ]  # fmt: skip
    log.write_text(
        "$ python -m rolecast train --json\n"
        + "".join(json.dumps(e) + "\n" for e in [start, *steps])
        + "some warning a library printed\n"
        + '{"type": "progress", "st'
    )
    progress = reader.poll()
    assert progress is not None and progress.step == 2 and progress.total_steps == 8
    assert progress.tokens_per_s == 200.0 and progress.eta_s == 6.0
    assert reader.checkpoint_step is None and reader.result is None
    with log.open("a") as f:  # the half-written line is completed, then a checkpoint
        f.write('ep": 3, "total_steps": 8, "loss": 2.7, "tokens_per_s": 300.0, "eta_s": 5.0}\n')
        f.write('{"type": "checkpoint", "step": 3, "path": "x/checkpoints/step-3"}\n')
        f.write("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    progress = reader.poll()
    assert progress is not None and progress.step == 3 and progress.loss == 2.7
    assert reader.checkpoint_step == 3
    assert reader.poll() is None  # nothing new
    # a failure is told by the lines that are not the run's JSON
    assert reader.tail(2) == "Traceback (most recent call last):\nRuntimeError: CUDA out of memory"
    with log.open("a") as f:
        f.write('{"type": "error", "message": "data.jsonl: 2 of 9 rows cannot be trained on"}\n')
    reader.poll()
    assert reader.tail() == "data.jsonl: 2 of 9 rows cannot be trained on"
    with log.open("a") as f:
        f.write('{"type": "result", "adapter": "x", "manifest": {"persona": "haruhi"}}\n')
    reader.poll()
    assert reader.result is not None and reader.result["adapter"] == "x"


def test_gate_allows_a_drop_within_the_tolerance_only() -> None:
    scores = {
        "baseline": {"bleu-4": 10.0, "rouge-l": 20.0},
        "adapter": {"bleu-4": 9.5, "rouge-l": 21.0},
    }
    assert gate(scores, "baseline", 1.0)[0] is True
    ok, lines = gate(scores, "baseline", 0.4)
    assert ok is False and lines[0] == "bleu-4: 9.50 vs 10.00 (-0.50, may lose 0.4) worse"
    assert gate(scores, "baseline", -0.5)[0] is False  # negative: it must win on both
    # persona consistency: a new adapter that sounds less like the persona is held back
    scores["baseline"]["own_probability"], scores["adapter"]["own_probability"] = 60.0, 52.0
    assert gate(scores, "baseline", 1.0, ("own_probability", 10.0))[0] is True
    ok, lines = gate(scores, "baseline", 1.0, ("own_probability", 5.0))
    assert ok is False
    assert lines[-1] == "own_probability: 52.00 vs 60.00 (-8.00, may lose 5) worse"


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
            # rolled back past its first version: the registry knows haruhi but points nowhere,
            # so it speaks through the base model, though its versions are still loaded
            (root / "haruhi" / "v1").mkdir()
            (root / "haruhi" / "current.json").unlink()
            assert await client.model_for("haruhi") == "instant-base"


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
        assert argv[1:4] == ["-m", "rolecast", "train"] and "--json" in argv
        trained = parse_train_args(argv[4:])
        assert trained.max_length == expected
        # the recipe's settings, as `rolecast train` defaults to them; the rank by base size
        assert (trained.lora_r, trained.lora_alpha, trained.use_rslora) == (None, 16, True)
        assert (trained.learning_rate, trained.epochs, trained.warmup_ratio) == (5e-4, 4, 0.05)
        assert trained.batch_tokens is None  # sized to the free memory
        assert trained.data.endswith("data/training.jsonl")  # the own split and the replayed
        await service.store.move(job, "failed", "only the command was built")
