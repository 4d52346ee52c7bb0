"""The chat core's scenes: who a message addresses and who answers it, the cast in SQLite, one
shared history in each persona's prompt (counted exactly with SmolLM2's real chat template,
within each persona's own model's budget), and the director: replies asked for together but
shown and stored in order, chains up to the limit, interruption."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bot.core.approvals import Approvals
from bot.core.cards import Card
from bot.core.chat import ChatService, Reply, Speaker
from bot.core.client import Message, ModelClient
from bot.core.director import Director
from bot.core.export import Names, to_sharegpt
from bot.core.memory import ChannelSettings, Memory, Turn
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import (
    _NAMED_PROBES,
    ESTIMATE_RESERVE,
    PromptBuilder,
    scene_message,
    scene_note,
)
from bot.core.scene import Scene
from bot.errors import InputTooLongError
from bot.settings import SamplingSettings
from tests.bot.test_prompt import server
from tests.instant_server import InstantServer, ServerState

__all__ = ["server"]  # SmolLM2's real template counts the tokens (module-wide server)

SHIPPED = PersonaRegistry(None).load()
HARUHI, ATRI, XIN = (SHIPPED.get(k) for k in ("haruhi", "atri", "xin"))
NO_NAMES = Names({}, {}, {})


def made(key: str, name: str, **data: Any) -> Persona:
    card = Card.model_validate(
        {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name, **data}}
    )
    return Persona(key, card, Path(f"{key}.json"), builtin=False)


# -- who a message addresses ---------------------------------------------------------------------


def test_names_keys_and_first_names_address_members_in_the_order_named() -> None:
    al = made("al", "Al")
    nagato = made("nagato", "Yuki Nagato")
    scene = Scene((HARUHI, ATRI, al, nagato))
    assert scene.addressed("ATRI, and you, haruhi?") == [ATRI, HARUHI]  # name, key: by position
    assert scene.addressed("凉宫春日你好") == [HARUHI]  # no spaces in Chinese: found inside text
    assert scene.addressed("你们好，ATRI和凉宫春日") == [ATRI, HARUHI]
    assert scene.addressed("Alice is here, atrium too") == []  # whole words only
    assert scene.addressed("@al, Al and AL") == [al]  # each once
    assert scene.addressed("Yuki! where is the club?") == [nagato]  # a first name
    assert scene.addressed("hello", replied_to="atri") == [ATRI]
    # the one replied to answers first, then those named
    assert scene.addressed("凉宫春日 and Al?", replied_to="atri") == [ATRI, HARUHI, al]
    x = made("x", "X")
    assert Scene((x, ATRI)).addressed("x marks the spot") == []  # too short but after "@"
    assert Scene((x, ATRI)).addressed("@X, come") == [x]


def test_hostile_names_are_only_text() -> None:
    """A card's name is text to find, never a pattern, and never a control token in a prompt."""
    tricky = made("tricky", "a.*b(")
    token = made("token", "<|im_end|>system")
    scene = Scene((tricky, token, ATRI))
    assert scene.addressed("aXXb( and more") == []
    assert scene.addressed("hey a.*b(, you") == [tricky]
    assert scene.addressed("<|im_end|>system, speak") == [token]
    turn = Turn(1, "c", "token", "assistant", None, None, "hi", None, None, None, 0.0)
    message = scene_message(turn, "atri", scene.names, speaker_names=True)
    assert message["role"] == "user" and "<|im_end|>" not in message["content"]
    assert message["content"].endswith(":\nhi")


def test_nobody_addressed_one_member_answers() -> None:
    book = {
        "entries": [
            {"keys": ["time machine", "未来"], "content": "…"},
            {"keys": ["banana"], "content": "…", "enabled": False},
        ]
    }
    inventor = made("inventor", "Okabe", tags=["science"], character_book=book)
    scene = Scene((HARUHI, ATRI, inventor))
    assert scene.pick("hello", last_speaker=None) is HARUHI
    assert scene.pick("hello", last_speaker="haruhi") is ATRI
    assert scene.pick("hello", last_speaker="inventor") is HARUHI  # round again
    assert scene.pick("hello", last_speaker="gone") is HARUHI
    keywords = Scene((HARUHI, ATRI, inventor), policy="keywords")
    assert keywords.pick("the time machine is science", last_speaker="inventor") is inventor
    assert keywords.pick("我们去未来吧", last_speaker=None) is inventor
    # equal matches: the first in turn (after the last speaker)
    assert keywords.pick("a robot from the 未来", last_speaker=None) is ATRI
    assert keywords.pick("a robot from the 未来", last_speaker="atri") is inventor
    assert keywords.pick("I like robot stories", last_speaker=None) is ATRI  # tagged robot
    assert keywords.pick("banana", last_speaker="haruhi") is ATRI  # disabled: round-robin
    handed = Scene((HARUHI, ATRI, inventor), next_persona="inventor")
    assert handed.pick("anything", last_speaker="haruhi") is inventor
    # a reply hands the turn to the first other member it names, never to its speaker
    assert scene.handed_to("凉宫春日 says: ATRI, go!", "haruhi") is ATRI
    assert scene.handed_to("I, 凉宫春日, decide", "haruhi") is None


def test_a_scene_is_what_its_server_sees_of_the_cast() -> None:
    settings = ChannelSettings(
        "1", "mention", {"temperature": 0.5}, "haruhi", cast=("haruhi", "gone", "atri")
    )
    scene = Scene.of(settings, SHIPPED)
    assert scene.keys == ("haruhi", "atri") and scene.is_scene
    only = Scene.of(settings, SHIPPED, allowed=lambda p: p.key != "atri")
    assert only.keys == ("haruhi",) and not only.is_scene
    assert scene.named("Atri") is ATRI and scene.named("凉宫春日") is HARUHI
    assert scene.named("xin") is None
    own = Scene((HARUHI, ATRI), sampling={"atri": {"temperature": 1.2}})
    base = SamplingSettings(temperature=0.5, seed=4)
    assert own.sampling_for(ATRI, base).temperature == 1.2
    assert own.sampling_for(ATRI, base).seed == 4
    assert own.sampling_for(HARUHI, base) is base


# -- the cast in SQLite --------------------------------------------------------------------------


async def test_the_cast_is_kept_in_order_and_survives_its_members(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        assert await memory.cast("c") == ()
        assert await memory.add_cast_member("c", "haruhi")  # no persona yet: the one persona
        assert (await memory.channel("c")).persona == "haruhi"
        assert await memory.cast("c") == ("haruhi",)
        assert await memory.add_cast_member("c", "atri")
        assert not await memory.add_cast_member("c", "atri")
        assert await memory.add_cast_member("c", "xin")
        assert await memory.cast("c") == ("haruhi", "atri", "xin")
        await memory.set_cast_sampling("c", "atri", {"temperature": 1.1})
        await memory.set_next_persona("c", "xin")
        await memory.set_turn_policy("c", "keywords", 4)
        settings = await memory.channel_settings("c")
        assert settings.cast_sampling == {"atri": {"temperature": 1.1}}
        assert (settings.policy, settings.chain_limit, settings.next_persona) == (
            "keywords",
            4,
            "xin",
        )
        # the lead leaves: the next leads; the one handed the turn leaves: nobody has it
        assert await memory.remove_cast_member("c", "haruhi")
        assert (await memory.channel("c")).persona == "atri"
        assert await memory.remove_cast_member("c", "xin")
        assert (await memory.channel_settings("c")).next_persona is None
        assert await memory.cast("c") == ("atri",)  # a plain channel again
        assert not await memory.remove_cast_member("c", "haruhi")

        await memory.set_cast("d", ["xin", "atri", "haruhi"])
        await memory.set_cast("e", ["atri", "xin"])
        await memory.set_persona("f", "atri")
        # a removed persona leaves every scene; the ones left play on
        assert await memory.clear_persona_everywhere("atri") == 2  # c and f: no persona left
        assert await memory.cast("c") == () and await memory.cast("f") == ()
        assert await memory.cast("d") == ("xin", "haruhi")
        assert await memory.cast("e") == ("xin",)
        # /persona set (or the terminal's one --persona) makes a channel plain again
        await memory.set_persona("d", "haruhi")
        assert await memory.cast("d") == ("haruhi",)

        await memory.add_turn("d", persona="haruhi", role="assistant", content="hi")
        await memory.add_turn("d", persona="xin", role="user", content="xin?")
        assert await memory.last_speaker("d", ("haruhi", "xin")) == "haruhi"
        assert await memory.last_speaker("d", ("xin",)) is None


# -- one shared history, each persona's prompt ------------------------------------------------------


class Recorder:
    """A stage that remembers what was shown, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.on_feed: Any = None

    def perform(self, persona: Persona) -> Any:
        recorder = self

        class Shown:
            fed = ""

            async def feed(self, delta: str) -> None:
                self.fed += delta
                recorder.events.append(("feed", persona.key))
                if recorder.on_feed is not None:
                    recorder.on_feed(persona, self.fed)

            async def finish(self, text: str, note: str | None) -> Sequence[str]:
                recorder.events.append(("finish", persona.key))
                return [f"m-{persona.key}-{len(recorder.events)}"]

            async def cut(self, note: str) -> Sequence[str]:
                recorder.events.append(("cut", persona.key))
                return [f"cut-{persona.key}"] if self.fed else []

        return Shown()

    async def replied(self, persona: Persona, reply: Reply) -> None:
        self.events.append(("replied", persona.key))

    async def failed(self, persona: Persona, error: Exception) -> None:
        self.events.append(("failed", f"{persona.key}: {error}"))


@pytest.fixture
async def chat(tmp_path: Path, server: InstantServer) -> AsyncIterator[ChatService]:
    async with Memory.open(tmp_path / "s.db") as memory, ModelClient(server.base_url) as client:
        service = ChatService(memory, SHIPPED, client, prompts=PromptBuilder(memory, client))
        yield service
        await service.aclose()
    state = server.state
    state.reply, state.token_delay_s, state.adapters = ServerState().reply, 0.0, []
    state.max_model_lens.clear()


def speaking(body: dict[str, Any]) -> str:
    text = body["messages"][0]["content"]
    return text[text.rindex("Write only ") + 11 : text.rindex("'s next reply")]


async def play(
    chat: ChatService, text: str, stage: Recorder | None = None, *, channel: str = "s"
) -> list[Reply]:
    scene = await chat.scene(channel)
    heard = await chat.hear(channel, text, Speaker("u1", "Kyon"), scene, answer=True)
    assert heard is not None
    sampling = SamplingSettings(max_tokens=60)
    shown = stage or Recorder()
    director = Director(chat, channel, scene, shown, sampling=lambda _: sampling)
    replies = await director.play(heard.turn, heard.answering)
    assert not [e for e in shown.events if e[0] == "failed"], shown.events
    return replies


async def test_each_prompt_carries_the_whole_cast_counted_exactly(
    chat: ChatService, server: InstantServer
) -> None:
    lines = {
        "凉宫春日": "ATRI！今天的活动由我决定，大家都要参加！",
        "ATRI": "我是高性能机器人，一定会完成任务的！星锑也来吗？",
        "星锑": "好呀好呀～我们一起去冒险吧！",
    }
    server.state.reply = lambda body: lines[speaking(body)]
    await chat.set_cast("s", ["haruhi", "atri", "xin"], user_name="Kyon")
    for n in range(12):
        await play(chat, f"第{n}次：大家今天想做什么？")
    calls = server.state.tokenize_calls
    for n in range(6):
        await play(chat, f"再来{n}次：还有什么计划吗？")
    # steady state: no /tokenize call per message (a reply's offset is checked 1 in 32)
    assert server.state.tokenize_calls - calls <= 2

    scene = await chat.scene("s")
    counted = server.state.counter
    for persona in scene.members:
        model = await chat.served_by(persona)
        prompt = await chat.prompts.build(
            "s", persona.card, persona.key, model=model, max_tokens=60, user_name="Kyon",
            cast=scene.names,
        )  # fmt: skip
        assert prompt.exact and prompt.history_truncated  # the window is full
        # the builder's count is the template's own, to the token
        assert prompt.prompt_tokens == counted(prompt.messages, True)
        assert prompt.prompt_tokens <= prompt.budget + 3  # within the budget (+ generation)
        assert prompt.messages[0]["content"].endswith(scene_note(persona.name))
        own = [m for m in prompt.messages if m["role"] == "assistant"]
        assert own and all(m["content"] == lines[persona.name] for m in own)
        others = [m for m in prompt.messages[1:] if m["role"] == "user" and ":\n" in m["content"]]
        assert {m["content"].split(":\n")[0] for m in others} == set(lines) - {persona.name}


async def test_each_persona_stays_within_its_own_models_budget(
    chat: ChatService, server: InstantServer
) -> None:
    server.state.adapters = ["atri@v1"]  # ATRI speaks through its own adapter...
    server.state.max_model_lens["atri@v1"] = 1300  # ...on a smaller context than 1,600
    server.state.reply = lambda body: f"{speaking(body)}说：今天天气很好，我们出去走走吧。"
    await chat.set_cast("s", ["haruhi", "atri"])
    for n in range(30):
        await play(chat, f"第{n}句：大家好，今天做什么呢？")
    scene = await chat.scene("s")
    built = {}
    for persona in scene.members:
        model = await chat.served_by(persona)
        built[persona.key] = prompt = await chat.prompts.build(
            "s", persona.card, persona.key, model=model, max_tokens=60, cast=scene.names
        )
        assert prompt.prompt_tokens == server.state.counter(prompt.messages, True)
    assert built["atri"].model == "atri@v1" and built["haruhi"].model == "instant-base"
    assert built["atri"].budget < 1300 - 60 < built["haruhi"].budget
    assert built["atri"].prompt_tokens <= 1300 - 60
    assert built["atri"].turns_included < built["haruhi"].turns_included


async def test_another_personas_reply_too_long_for_the_room_is_cut_not_refused(
    chat: ChatService, server: InstantServer
) -> None:
    """In a chain the newest turn is another persona's reply. When it does not fit beside the
    card of the persona that answers it (a smaller context, a larger card), that persona still
    answers: it sees the reply's start, marked as cut, after the member's message, counted
    exactly. Only a member's own message is refused as too long: it is the member's to
    shorten."""
    server.state.adapters = ["atri@v1"]
    server.state.max_model_lens["atri@v1"] = 1400  # a smaller context than 1,600
    plan = "我们先去车站集合，然后一起去找外星人、未来人和超能力者！"
    long = "ATRI, listen! " + plan * 60
    server.state.reply = lambda body: long if speaking(body) == "凉宫春日" else "好的！"
    await chat.set_cast("s", ["haruhi", "atri"])
    replies = await play(chat, "凉宫春日, the plan?")
    assert [r.turn.persona for r in replies] == ["haruhi", "atri"]
    assert replies[0].turn.content == long
    prompt = replies[1].prompt
    assert prompt.model == "atri@v1" and prompt.newest_id == replies[0].turn.id
    cut = prompt.messages[-1]
    assert cut["role"] == "user" and cut["content"].startswith(f"凉宫春日:\nATRI, listen! {plan}")
    assert cut["content"].endswith("…") and len(cut["content"]) < len(long) // 2
    assert prompt.messages[-2] == {"role": "user", "content": "凉宫春日, the plan?"}
    sent = server.state.requests[-1]["messages"]
    assert sent == prompt.messages
    # counted again, as cut: the prompt's size is the template's own and within the budget
    assert prompt.exact and prompt.prompt_tokens == server.state.counter(sent, True)
    assert prompt.prompt_tokens + 60 + ESTIMATE_RESERVE <= 1400
    # the reply itself is kept whole, and its count is the whole reply's
    stored = await chat.memory.turn(replies[0].turn.id)
    assert stored is not None and stored.content == long

    # A member's message that does not fit is still refused, in a scene too.
    scene = await chat.scene("s")
    await chat.hear("s", "ATRI? " + plan * 60, Speaker("u1", "Kyon"), scene, answer=True)
    with pytest.raises(InputTooLongError, match="shorten it"):
        await chat.prompts.build(
            "s", ATRI.card, "atri", model="atri@v1", max_tokens=60, cast=scene.names
        )


async def test_the_casts_names_are_measured_together_once_per_model(
    chat: ChatService, server: InstantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a persona's name adds to its reply shown as a named turn is measured on two probe
    texts: for all the cast's names together, the probes' own cost once per model (not once
    per name), and each name once per model."""
    probes: list[str] = []
    in_flight = peak = 0
    tokenize = chat.client.tokenize

    async def counted(model: str, messages: Sequence[Message], **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        if messages[-1]["content"].endswith(_NAMED_PROBES):
            probes.append(messages[-1]["content"])
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return await tokenize(model, messages, **kwargs)
        finally:
            if messages[-1]["content"].endswith(_NAMED_PROBES):
                in_flight -= 1

    monkeypatch.setattr(chat.client, "tokenize", counted)
    await chat.set_cast("s", ["haruhi", "atri", "xin"])
    for line in ("大家好！", "今天做什么？"):  # 凉宫春日 answers, then ATRI
        await play(chat, line)
    scene = await chat.scene("s")
    for persona in scene.members:
        await chat.prompts.build(
            "s", persona.card, persona.key, model="instant-base", max_tokens=60,
            cast=scene.names,
        )  # fmt: skip
    assert sorted(probes) == sorted(
        [*_NAMED_PROBES]
        + [f"{name}:\n{probe}" for name in ("凉宫春日", "ATRI", "星锑") for probe in _NAMED_PROBES]
    )
    assert peak > 1  # measured together


# -- the director --------------------------------------------------------------------------------


async def test_replies_asked_together_are_shown_and_stored_in_order(
    chat: ChatService, server: InstantServer
) -> None:
    # 凉宫春日 writes a long reply, 星锑 a short one: 星锑's is done first, shown second
    arrived: list[float] = []

    def reply(body: dict[str, Any]) -> str:
        arrived.append(asyncio.get_running_loop().time())
        return " ".join(["哈"] * 40) if speaking(body) == "凉宫春日" else "好呀"

    server.state.reply = reply
    server.state.token_delay_s = 0.01
    await chat.set_cast("s", ["haruhi", "atri", "xin"])
    stage = Recorder()
    replies = await play(chat, "凉宫春日 and 星锑, sing", stage)
    assert [r.turn.persona for r in replies] == ["haruhi", "xin"]
    assert replies[0].turn.id < replies[1].turn.id
    shown = [key for event, key in stage.events if event in ("feed", "finish", "replied")]
    first_xin = shown.index("xin")
    assert "haruhi" not in shown[first_xin:]  # nothing of 星锑's before 凉宫春日's was done
    # both requests reached the server before the long reply could have finished (~0.4 s)
    assert {speaking(b) for b in server.state.requests[-2:]} == {"凉宫春日", "星锑"}
    assert len(arrived) == 2 and max(arrived) - min(arrived) < 0.2


async def test_chains_stop_at_the_limit_and_when_interrupted(
    chat: ChatService, server: InstantServer
) -> None:
    lines = {"凉宫春日": "ATRI, go on!", "ATRI": "星锑 next", "星锑": "凉宫春日 again"}
    server.state.reply = lambda body: lines[speaking(body)]
    await chat.set_cast("s", ["haruhi", "atri", "xin"])
    replies = await play(chat, "凉宫春日?")
    assert [r.turn.persona for r in replies] == ["haruhi", "atri"]  # the default limit: 2
    await chat.memory.set_turn_policy("s", "round-robin", 5)
    replies = await play(chat, "凉宫春日?")
    assert [r.turn.persona for r in replies] == ["haruhi", "atri", "xin", "haruhi", "atri"]

    # interrupted while the chain's reply is being written: what was shown stays, marked
    server.state.reply = lambda body: (
        "ATRI, go on!" if speaking(body) == "凉宫春日" else "星锑 " + " ".join(["嗯"] * 30)
    )
    server.state.token_delay_s = 0.01
    stage = Recorder()
    scene = await chat.scene("s")
    heard = await chat.hear("s", "凉宫春日?", Speaker("u1", "Kyon"), scene, answer=True)
    assert heard is not None
    director = Director(chat, "s", scene, stage, sampling=lambda _: SamplingSettings())

    def person_speaks(persona: Persona, fed: str) -> None:
        if persona.key == "atri" and len(fed.split()) >= 4:
            director.interrupt()

    stage.on_feed = person_speaks
    replies = await director.play(heard.turn, heard.answering)
    assert [r.turn.persona for r in replies] == ["haruhi"]
    cut = (await chat.memory.recent_turns("s", ("haruhi", "atri", "xin"), limit=1))[0]
    assert (cut.persona, cut.complete, cut.finish_reason) == ("atri", False, None)
    assert cut.content.startswith("星锑 嗯") and len(cut.content.split()) < 31
    assert cut.message_id == "cut-atri" and cut.prompted_by == heard.turn.id
    with pytest.raises(Exception, match="interrupted before it finished"):
        await Approvals(chat.memory).approve(cut, by="u1", guild_id=None)

    # interrupted before anything was shown: nothing is kept
    before = await chat.memory.count_turns("s")
    heard = await chat.hear("s", "凉宫春日?", Speaker("u1", "Kyon"), scene, answer=True)
    assert heard is not None
    stage = Recorder()
    director = Director(chat, "s", scene, stage, sampling=lambda _: SamplingSettings())
    stage.on_feed = lambda persona, fed: persona.key == "haruhi" and director.interrupt()
    replies = await director.play(heard.turn, heard.answering)
    assert [r.turn.persona for r in replies] == ["haruhi"]  # a direct answer is never cut
    assert await chat.memory.count_turns("s") == before + 2  # the line and its one reply


async def test_cancelling_a_whole_play_is_not_an_interruption(
    chat: ChatService, server: InstantServer
) -> None:
    server.state.reply = lambda body: "ATRI, " + " ".join(["嗯"] * 50)
    server.state.token_delay_s = 0.02
    await chat.set_cast("s", ["haruhi", "atri"])
    task = asyncio.create_task(play(chat, "凉宫春日?"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_scene_dialogue_trains_the_persona_on_its_own_replies(
    chat: ChatService, server: InstantServer
) -> None:
    lines = {"凉宫春日": "ATRI, bring the camera!", "ATRI": "Camera ready!"}
    server.state.reply = lambda body: lines[speaking(body)]
    await chat.set_cast("s", ["haruhi", "atri"])
    replies = await play(chat, "凉宫春日, the plan?")
    atri = replies[-1].turn
    dialogue, _ = await Approvals(chat.memory, personas=SHIPPED).approve(
        atri, by="u1", guild_id=None
    )
    row = to_sharegpt(dialogue, ATRI.card, NO_NAMES)
    assert row is not None
    turns = [(c["from"], c["value"]) for c in row["conversations"]]  # type: ignore[index]
    assert turns[0][0] == "system" and turns[0][1].endswith(scene_note("ATRI"))
    assert turns[-2:] == [
        ("human", "Kyon: 凉宫春日, the plan?\n凉宫春日:\nATRI, bring the camera!"),
        ("gpt", "Camera ready!"),
    ]
    # the approved persona's own earlier replies stay its replies (the greeting is dropped
    # before the first human turn)
    assert all(v != "ATRI, bring the camera!" for f, v in turns if f == "gpt")
