"""The export step of a retrain job: the other personas' approved dialogues of the same scope are
replayed into the training file only, capped, and said; a dialogue file can stand in for the
approved dialogues. Real SQLite and the real `rolecast data clean|split` on the tiny model's
tokenizer; no training."""

from __future__ import annotations

import json
from pathlib import Path

from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.retrain.jobs import Job
from bot.retrain.progress import replay_note
from bot.retrain.runner import RetrainService
from bot.retrain.workdir import Paths
from bot.settings import BotSettings
from tests.finetune.ft_helpers import write_jsonl
from tests.retrain.conftest import approve, shared_dialogues


def service_for(memory: Memory, tmp_path: Path, base: Path, **retrain: object) -> RetrainService:
    settings = BotSettings(
        home=tmp_path,
        retrain={  # type: ignore[arg-type]
            "base": str(base), "min_approved": 8, "max_length": 2048, "validation": 0.25,
            **retrain,
        },
    )  # fmt: skip
    return RetrainService(
        memory, PersonaRegistry(settings.user_personas).load(), settings, server_url=None
    )


async def build(service: RetrainService, job: Job) -> tuple[Paths, dict]:
    paths = service.paths(job)
    _, replay = await service.datasets.build(job, paths)
    return paths, replay


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def systems(path: Path) -> set[str]:
    return {
        json.loads(line)["conversations"][0]["value"]
        for line in path.read_text(encoding="utf-8").splitlines()
    }


async def test_other_personas_of_the_same_guild_are_replayed_into_training_only(
    memory: Memory, data_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 12))
    await approve(memory, shared_dialogues(data_dir, 3, "atri"), channel="c2", persona="atri")
    await approve(memory, shared_dialogues(data_dir, 20, "xin"), channel="c3", persona="xin")
    # another guild's dialogues are not this job's to use
    await approve(
        memory, shared_dialogues(data_dir, 6, "atri"), guild="g2", channel="c9", persona="atri"
    )
    service = service_for(memory, tmp_path, tiny_model_dir)
    job = await service.store.create("haruhi", min_approved=8, requested_by="1", guild_id="g1")
    paths, replay = await build(service, job)

    own, held = ids(paths.own_train), ids(paths.validation)
    training = ids(paths.train)
    assert training[: len(own)] == own  # the own split first, unchanged
    replayed = training[len(own) :]
    assert len(replayed) == len(own) == replay["cap"]  # capped at as many as its own
    assert all(i.startswith("haruhi_") for i in own + held)  # the gate's split: own only
    assert not set(replayed) & set(held)
    g1_atri = {f"atri_{d.id}" for d in await memory.dialogues("atri", guild_id="g1")}
    g2_atri = {f"atri_{d.id}" for d in await memory.dialogues("atri", guild_id="g2")}
    assert not set(replayed) & g2_atri
    by = replay["replayed"]
    assert replay["available"] == {"atri": 3, "xin": 20}
    assert sum(by.values()) == len(replayed) and set(by) <= {"atri", "xin"}
    assert {i for i in replayed if i.startswith("atri_")} <= g1_atri
    # each replayed dialogue keeps its own persona's system prompt, in its own file for the gate
    cards = PersonaRegistry(None).load()
    for name in by:
        assert ids(paths.replayed(name)) == [i for i in replayed if i.startswith(f"{name}_")]
        assert all(s.startswith(cards.get(name).card.data.system_prompt) for s in systems(
            paths.replayed(name)
        ))  # fmt: skip
    note = replay_note(replay)
    assert note is not None and note.startswith(f"replayed {len(replayed)} dialogues of other")
    assert note in paths.steps_log.read_text(encoding="utf-8")  # the job's log says it
    # the same pool and seed draw the same dialogues
    _, again = await build(service, job)
    assert again == replay and ids(paths.train) == training


async def test_no_other_persona_means_no_replay_said_plainly(
    memory: Memory, data_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    await approve(memory, shared_dialogues(data_dir, 10))
    await approve(
        memory, shared_dialogues(data_dir, 6, "atri"), guild="g2", channel="c9", persona="atri"
    )
    service = service_for(memory, tmp_path, tiny_model_dir)
    job = await service.store.create("haruhi", min_approved=8, requested_by="1", guild_id="g1")
    paths, replay = await build(service, job)
    assert ids(paths.train) == ids(paths.own_train)
    assert replay["replayed"] == {} and replay["available"] == {}
    assert replay_note(replay) == (
        "no replay: no other persona has usable approved dialogues in this server"
    )
    off = service_for(memory, tmp_path / "off", tiny_model_dir, replay=0)
    job = await off.store.create("xin", min_approved=2, requested_by="1")
    await approve(memory, shared_dialogues(data_dir, 4, "xin"), channel="c3", persona="xin")
    _, replay = await build(off, job)
    assert replay_note(replay) == "no replay: retrain.replay is 0"


async def test_a_dialogue_file_stands_in_for_the_approved_dialogues(
    memory: Memory, data_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # OpenAI rows without a system prompt, as another tool would write them
    rows = [
        {"id": f"mine_{i}", "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": reply},
        ]}
        for i, (user, reply) in enumerate(shared_dialogues(data_dir, 10))
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "mine.jsonl", [*rows, {"not": "a dialogue"}])
    stop = "{python} -c 'import sys; sys.exit(3)' {output}"  # the export is what is looked at
    service = service_for(memory, tmp_path, tiny_model_dir, launch=stop)
    job = await service.start("haruhi", requested_by="terminal:me", data=data)
    assert job.source == str(data.resolve())
    job = await service.wait(job.id)
    assert job.state == "failed" and "exit code 3" in (job.reason or "")
    paths = service.paths(job)
    assert sorted(ids(paths.own_train) + ids(paths.validation)) == sorted(r["id"] for r in rows)
    haruhi = PersonaRegistry(None).load().get("haruhi").card.data.system_prompt
    assert all(s.startswith(haruhi) for s in systems(paths.train))  # the card's system prompt


async def test_a_servers_persona_replays_only_its_servers_dialogues_whoever_runs_the_job(
    memory: Memory, data_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The operator retrains a persona server 1 owns from the terminal (no guild on the job):
    # replay still stays inside server 1, and never takes a persona server 2 owns.
    from bot.core.cards import load_card
    from bot.core.personas import builtin_dir

    one, two = "111111111111111111", "222222222222222222"
    registry = PersonaRegistry(tmp_path / "personas").load()
    card = load_card(builtin_dir() / "atri.json")
    cat = registry.add("cat", card, guild_id=one).key
    dog = registry.add("dog", card, guild_id=two).key
    await approve(memory, shared_dialogues(data_dir, 12), guild=one, persona=cat)
    await approve(
        memory, shared_dialogues(data_dir, 4, "atri"), guild=one, channel="c2", persona="atri"
    )
    await approve(
        memory, shared_dialogues(data_dir, 6, "atri"), guild=two, channel="c3", persona="atri"
    )
    await approve(
        memory, shared_dialogues(data_dir, 6, "xin"), guild=two, channel="c4", persona=dog
    )
    service = service_for(memory, tmp_path, tiny_model_dir)
    job = await service.store.create(cat, min_approved=8, requested_by="terminal:op")
    paths, replay = await build(service, job)
    replayed = set(ids(paths.train)) - set(ids(paths.own_train))
    server_one_atri = {f"atri_{d.id}" for d in await memory.dialogues("atri", guild_id=one)}
    assert replay["available"] == {"atri": 4}
    assert replayed and replayed <= server_one_atri


def test_the_gate_holds_a_shipped_persona_to_the_shipped_adapter(tmp_path: Path) -> None:
    # with no published version, a shipped persona on the default model speaks through the
    # shipped adapter: that is what a new adapter must not be worse than
    from bot.retrain.gate import GateAndPublish
    from formats import basemodel

    def gate(**retrain: object) -> GateAndPublish:
        settings = BotSettings(home=tmp_path, retrain=retrain)  # type: ignore[arg-type]
        return GateAndPublish(None, settings, None, None)  # type: ignore[arg-type]

    shipped = (basemodel.SHIPPED_DIR, basemodel.SHIPPED_NAME)
    assert gate().live("haruhi", shipped=True) == shipped  # retrain.base: the default model
    assert gate().live("haruhi", shipped=False) is None  # an operator's card under the key
    assert gate().live("mycat", shipped=True) is None
    assert gate(base="/m/llama").live("haruhi", shipped=True) is None  # another base
