"""Prompt assembly against a server that counts with SmolLM2's real chat template."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.core import lorebook
from bot.core import prompt as prompt_module
from bot.core.cards import CharacterBook, LoreEntry
from bot.core.chat import ChatService, Speaker
from bot.core.client import Completion, ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.core.prompt import (
    ESTIMATE_RESERVE,
    RECHECK_EVERY,
    BoundedCache,
    Prompt,
    PromptBuilder,
    cut_short,
    lore_block,
    render_system,
    substitute,
    turn_message,
)
from bot.errors import InputTooLongError, RolecastError
from bot.settings import SamplingSettings
from tests.instant_server import InstantServer, ServerState

CONTEXT = 1600
MAX_TOKENS = 100


@pytest.fixture(scope="module")
def server(smollm2_tokenizer_dir: Path) -> Iterator[InstantServer]:
    """An instant server that counts tokens with SmolLM2's real chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)

    def count(messages: list[dict[str, Any]], add_generation_prompt: bool) -> int:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return len(ids if isinstance(ids, list) else ids["input_ids"])

    def completion_tokens(text: str) -> int:  # the reply's tokens and the end of turn, as vLLM
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1

    state = ServerState(max_model_len=CONTEXT, counter=count, completion_counter=completion_tokens)
    with InstantServer(state) as instant:
        yield instant


@pytest.fixture
async def builder(tmp_path: Path, server: InstantServer) -> AsyncIterator[PromptBuilder]:
    async with Memory.open(tmp_path / "p.db") as memory, ModelClient(server.base_url) as client:
        yield PromptBuilder(memory, client)


def test_card_macros_and_sections() -> None:
    card = PersonaRegistry(None).load().get("haruhi").card
    text = render_system(card, user="阿虚")
    assert text == card.data.system_prompt  # the shipped cards are their dataset's system prompt
    assert substitute("{{char}} teases {{ user }}; <USER> sighs at <BOT>", char="H", user="K") == (
        "H teases K; K sighs at H"
    )
    richer = card.model_copy(deep=True)
    richer.data.scenario = "{{user}} walks into the club room."
    richer.data.mes_example = "<START>\n{{user}}: hi\n{{char}}: 哼"
    text = render_system(richer, user="阿虚")
    assert "Scenario: 阿虚 walks into the club room." in text
    assert "Example dialogue:\n阿虚: hi\n凉宫春日: 哼" in text


async def test_newest_turns_fill_the_budget_and_the_card_always_stays(
    builder: PromptBuilder, server: InstantServer
) -> None:
    persona = PersonaRegistry(None).load().get("haruhi")
    for i in range(200):
        role = "user" if i % 2 == 0 else "assistant"
        await builder.memory.add_turn(
            "c", persona="haruhi", role=role, content=f"第{i}句话，说点什么。"
        )
    prompt = await builder.build(
        "c", persona.card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS
    )

    assert prompt.messages[0] == {"role": "system", "content": persona.card.data.system_prompt}
    assert prompt.history_truncated
    kept = [m["content"] for m in prompt.messages[1:]]
    assert kept[-1] == "第199句话，说点什么。"  # the newest turn is there
    assert kept == [
        f"第{i}句话，说点什么。" for i in range(200 - len(kept), 200)
    ]  # contiguous, in order
    # The whole prompt, counted by the real template, fits the context with room for the reply
    # and the reserve; one more turn would not have.
    exact = server.state.counter(prompt.messages, True)
    assert exact == prompt.prompt_tokens
    assert exact + MAX_TOKENS + ESTIMATE_RESERVE <= CONTEXT
    one_more = [
        prompt.messages[0],
        {"role": "user", "content": f"第{199 - len(kept)}句话，说点什么。"},
    ]
    one_more_count = server.state.counter(one_more + prompt.messages[1:], True)
    assert one_more_count + MAX_TOKENS + ESTIMATE_RESERVE > CONTEXT
    # Older turns are dropped from the prompt, never from the database.
    assert await builder.memory.count_turns("c") == 200


async def test_turn_counts_are_cached_in_the_database(
    builder: PromptBuilder, server: InstantServer
) -> None:
    persona = PersonaRegistry(None).load().get("haruhi")
    for i in range(10):
        await builder.memory.add_turn("c", persona="haruhi", role="user", content=f"话{i}")
    prompt = await builder.build(
        "c", persona.card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS
    )
    newest, *older = await builder.memory.recent_turns("c", "haruhi", limit=20)
    assert all(t.token_count for t in older)
    # The newest user turn is only bounded, not tokenized: the reply's usage settles it.
    assert newest.token_count is None and prompt.estimated is not None
    assert prompt.estimated[0] == newest.id
    served = server.state.counter(prompt.messages, True)  # what usage reports
    assert served <= prompt.prompt_tokens
    await builder.memory.set_token_counts(builder.settled(prompt, served))
    exact = await builder.message_cost("instant-base", {"role": "user", "content": "话9"})
    assert (await builder.memory.turn(newest.id)).token_count == exact  # type: ignore[union-attr]

    calls = server.state.tokenize_calls
    again = await builder.build(
        "c", persona.card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS
    )
    assert server.state.tokenize_calls == calls  # nothing counted twice
    assert again.estimated is None and again.prompt_tokens == served


async def test_other_personas_turns_stay_out(builder: PromptBuilder) -> None:
    persona = PersonaRegistry(None).load().get("atri")
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="春日的话")
    await builder.memory.add_turn("c", persona="atri", role="user", content="亚托莉的话")
    prompt = await builder.build(
        "c", persona.card, "atri", model="instant-base", max_tokens=MAX_TOKENS
    )
    assert [m["content"] for m in prompt.messages[1:]] == ["亚托莉的话"]


async def test_a_turn_that_can_never_fit_is_refused(builder: PromptBuilder) -> None:
    persona = PersonaRegistry(None).load().get("haruhi")
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="短的")
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="长" * 3000)
    with pytest.raises(InputTooLongError, match="shorten it"):
        await builder.build(
            "c", persona.card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS
        )


def test_a_cut_text_keeps_whole_characters_and_shows_the_cut() -> None:
    assert cut_short("ab👍🏽cd", 3) == "ab…"  # never an emoji without its skin tone
    assert cut_short("ab👍🏽cd", 4) == "ab👍🏽…"
    assert cut_short("cafe\u0301 noir", 4) == "caf…"  # nor a letter without its accent
    assert cut_short("hello wonderful world", 18) == "hello wonderful…"  # at a space near the end
    assert cut_short("今天我们去找外星人", 4) == "今天我们…"


async def test_the_personas_own_reply_too_long_for_the_room_is_cut_not_refused(
    builder: PromptBuilder, server: InstantServer
) -> None:
    """The newest turn can be the persona's own reply: a reply written again (`before_id`)
    after one before it, a retry after a failure, a card grown since. A reply may take up to
    max_tokens, more than the room beside a large card: it is cut to fit, never blamed on the
    member, and the member's message before it stays."""
    persona = PersonaRegistry(None).load().get("haruhi")
    card = persona.card.model_copy(deep=True)
    card.data.scenario = "SOS团的活动室。" * 30  # the card grew since the reply was written
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="今天做什么？")
    text = "今天我们去找外星人！然后去找未来人，再去找超能力者。" * 40
    long = await builder.memory.add_turn("c", persona="haruhi", role="assistant", content=text)
    expected = [{"role": "user", "content": "今天做什么？"}]

    def check(prompt: Prompt) -> None:
        *before, cut = prompt.messages[1:]
        assert before == expected and cut["role"] == "assistant"
        assert cut["content"].startswith("今天我们去找外星人！") and cut["content"].endswith("…")
        assert len(cut["content"]) < len(text)
        assert prompt.newest_id == long.id and prompt.turns_included == 2
        # the cut text is counted again: the size is the template's own, within the budget
        assert prompt.exact and prompt.prompt_tokens == server.state.counter(prompt.messages, True)
        assert prompt.prompt_tokens + MAX_TOKENS + ESTIMATE_RESERVE <= CONTEXT

    check(await builder.build("c", card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS))
    # the reply after it written again: the prompt is the channel as it stood before it
    later = await builder.memory.add_turn("c", persona="haruhi", role="assistant", content="哼。")
    check(
        await builder.build(
            "c", card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS, before_id=later.id
        )
    )
    # the reply keeps its whole text and the count of its whole text
    stored = await builder.memory.turn(long.id)
    assert stored is not None and stored.content == text
    whole = await builder.message_cost("instant-base", {"role": "assistant", "content": text})
    assert stored.token_count == whole


async def test_a_reply_with_no_room_at_all_is_left_out(
    builder: PromptBuilder, server: InstantServer
) -> None:
    """When the card leaves less room than a message's wrapping, not even the start of a reply
    fits: the prompt is the card alone, and the persona still answers."""
    persona = PersonaRegistry(None).load().get("haruhi")
    system = {"role": "system", "content": render_system(persona.card, user="User")}
    card_tokens = (await builder.client.tokenize("instant-base", [system])).count
    model = "tight@v1"
    # three tokens beside the card: less than any message's wrapping
    server.state.max_model_lens[model] = card_tokens + MAX_TOKENS + 3 + ESTIMATE_RESERVE + 3
    try:
        await builder.memory.add_turn("c", persona="haruhi", role="user", content="今天做什么？")
        await builder.memory.add_turn("c", persona="haruhi", role="assistant", content="哼，无聊。")
        prompt = await builder.build(
            "c", persona.card, "haruhi", model=model, max_tokens=MAX_TOKENS
        )
    finally:
        del server.state.max_model_lens[model]
    assert prompt.messages == [system]
    assert prompt.turns_included == 0 and prompt.history_truncated and prompt.newest_id is None


async def test_speaker_names_prefix_user_turns(builder: PromptBuilder) -> None:
    persona = PersonaRegistry(None).load().get("haruhi")
    builder.speaker_names = True
    await builder.memory.add_turn(
        "c", persona="haruhi", role="user", content="「会议？」", author_name="阿虚"
    )
    prompt = await builder.build(
        "c", persona.card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS
    )
    assert prompt.messages[-1] == {"role": "user", "content": "阿虚: 「会议？」"}


def _completion(text: str, tokens: int, finish: str = "stop") -> Completion:
    return Completion(text, "instant-base", finish, None, tokens, None, 0.0)


async def test_reply_cost_from_usage_once_two_exact_counts_agree(
    builder: PromptBuilder, server: InstantServer
) -> None:
    model = "instant-base"
    tokens = server.state.completion_counter
    assert tokens is not None

    async def exact_count(text: str, completion: Completion) -> int:
        turn = await builder.memory.add_turn("c", persona="haruhi", role="assistant", content=text)
        builder.count_soon(model, turn, completion)
        await builder.aclose()
        counted = (await builder.memory.turn(turn.id)).token_count  # type: ignore[union-attr]
        assert counted == await builder.message_cost(model, turn_message(turn, speaker_names=False))
        return counted

    first, second, third = "哼，无聊。", "SOS团今天去找外星人！", "阿虚，你迟到了，罚你请客。"
    await exact_count(first, _completion(first, tokens(first)))
    assert builder.reply_cost(model, _completion(second, tokens(second)), second) is None
    await exact_count(second, _completion(second, tokens(second)))
    # Two exact counts agreed: the next reply is costed from its completion tokens, exactly.
    assert builder.reply_cost(model, _completion(third, tokens(third)), third) == (
        await builder.message_cost(model, {"role": "assistant", "content": third})
    )
    # Not for a reply cut by the length limit (learnt on its own), nor for a trimmed one.
    assert builder.reply_cost(model, _completion(third, tokens(third), "length"), third) is None
    assert builder.reply_cost(model, _completion(f" {third}\n", tokens(third) + 2), third) is None

    # Now and then a reply is counted all the same; one that disagrees unlearns the offset.
    for _ in range(RECHECK_EVERY):
        if builder.reply_cost(model, _completion(third, tokens(third)), third) is None:
            break
    else:
        raise AssertionError("no reply was checked")
    await exact_count(third, _completion(third, tokens(third) + 2))
    assert builder.reply_cost(model, _completion(third, tokens(third)), third) is None
    await exact_count(first, _completion(first, tokens(first) + 2))
    assert builder.reply_cost(model, _completion(third, tokens(third)), third) is not None

    # A prompt size that does not add up unlearns it: replies are counted again.
    persona = PersonaRegistry(None).load().get("haruhi")
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="今天做什么？")
    prompt = await builder.build("c", persona.card, "haruhi", model=model, max_tokens=MAX_TOKENS)
    assert prompt.estimated is not None
    assert builder.settled(prompt, prompt.prompt_tokens + 10_000) == []
    assert builder.reply_cost(model, _completion(third, tokens(third)), third) is None


async def test_replies_of_a_template_that_rewrites_them_are_always_counted(
    builder: PromptBuilder,
) -> None:
    model = "instant-base"
    for text in ("<think>很长的思考……</think>哼。", "<think>又一段思考</think>好吧。"):
        turn = await builder.memory.add_turn("c", persona="haruhi", role="assistant", content=text)
        # what the model generated, reasoning included, is far more than what the prompt keeps
        builder.count_soon(model, turn, _completion(text, 500))
        await builder.aclose()
    assert builder.reply_cost(model, _completion("哼。", 500), "哼。") is None


async def test_a_long_chat_stays_in_the_context_without_a_tokenize_call_per_message(
    tmp_path: Path, server: InstantServer
) -> None:
    """Replies costed from usage and user turns settled from it, against the real template:
    every prompt leaves room for the reply, and the cached counts are the exact ones."""
    state = server.state
    personas = PersonaRegistry(None).load()
    sampling = SamplingSettings(max_tokens=MAX_TOKENS)
    async with Memory.open(tmp_path / "c.db") as memory, ModelClient(server.base_url) as client:
        builder = PromptBuilder(memory, client)
        chat = ChatService(memory, personas, client, prompts=builder)
        await memory.set_persona("c", "haruhi")
        first_request = len(state.requests)
        calls = []
        for i in range(40):
            before = state.tokenize_calls
            text = f"第{i}个问题：今天社团活动做什么？" + "嗯" * (i % 7)
            async for _ in chat.send("c", text, Speaker("u1", "阿虚"), sampling):
                pass
            calls.append(state.tokenize_calls - before)
        await chat.aclose()

        prompts = [r["messages"] for r in state.requests[first_request:]]
        assert len(prompts) == 40
        assert prompts[-1][1]["content"] != "第0个问题：今天社团活动做什么？"  # the window is full
        for messages in prompts:
            assert state.counter(messages, True) + MAX_TOKENS <= CONTEXT
        # After the first replies taught the builder: one check in RECHECK_EVERY replies.
        assert RECHECK_EVERY >= 30 and sum(calls[-30:]) <= 1
        for turn in await memory.recent_turns("c", "haruhi", limit=100):
            message = turn_message(turn, speaker_names=False)
            assert turn.token_count == await builder.message_cost("instant-base", message)


async def test_the_summary_and_the_lore_give_way_to_the_newest_message(
    builder: PromptBuilder, server: InstantServer
) -> None:
    """What stands in for older turns (the summary, lorebook entries) takes only the room that
    the member's newest message leaves: a message that fits with the card is answered."""
    persona = PersonaRegistry(None).load().get("haruhi")
    card = persona.card.model_copy(deep=True)
    card.data.character_book = CharacterBook(
        token_budget=10_000, entries=[LoreEntry(keys=["x"], content="传说" * 50, constant=True)]
    )
    builder.lore_budget = 10_000
    old = await builder.memory.add_turn("c", persona="haruhi", role="user", content="很久以前")
    await builder.memory.set_summary("c", "haruhi", "之前的事。" * 80, through_id=old.id)
    message = "今天" * 150
    await builder.memory.add_turn("c", persona="haruhi", role="user", content=message)

    prompt = await builder.build("c", card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS)
    assert prompt.messages[-1] == {"role": "user", "content": message}
    assert "传说" in prompt.messages[0]["content"]  # the lore fits beside it; the summary not
    assert "Summary of the conversation so far:" not in prompt.messages[0]["content"]
    assert server.state.counter(prompt.messages, True) + MAX_TOKENS <= CONTEXT
    # the lore is costed with its heading: the prompt's size is a bound, never less
    assert prompt.prompt_tokens >= server.state.counter(prompt.messages, True)
    # with a short message, the room is theirs
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="好")
    prompt = await builder.build("c", card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS)
    assert "Summary of the conversation so far:" in prompt.messages[0]["content"]
    assert server.state.counter(prompt.messages, True) + MAX_TOKENS <= CONTEXT


def test_a_bounded_cache_keeps_the_most_recently_used() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    for n in range(1000):
        cache[f"k{n}"] = n
        assert len(cache) <= 3
    assert "k0" not in cache and cache.get("k999") == 999
    cache.get("k997")  # read: the most recently used now
    cache["new"] = -1
    assert "k997" in cache and "k998" not in cache and cache.get("gone") is None


async def test_lore_costs_are_shared_between_members_asked_together_and_bounded(
    builder: PromptBuilder, server: InstantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lorebook entry costs one /tokenize call the first time it fires. A card's entries
    are counted together, not one awaited call after another; an entry (a card) whose text
    does not name the member is counted once for every member; and the counts kept stay
    within a cap, however many cards, entries and members a long-running bot meets."""
    model = "instant-base"
    persona = PersonaRegistry(None).load().get("haruhi")
    card = persona.card.model_copy(deep=True)
    contents = [
        f"第{i}条：{{{{user}}}}知道SOS团的秘密{i}。" if i % 4 == 0 else f"第{i}条：SOS团的秘密{i}。"
        for i in range(12)
    ]
    card.data.character_book = CharacterBook(
        token_budget=10_000,
        entries=[LoreEntry(keys=[], content=c, constant=True) for c in contents],
    )
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="今天做什么？")
    builder.lore_budget = 10_000
    in_flight = peak = 0
    tokenize = builder.client.tokenize

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await tokenize(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(builder.client, "tokenize", counted)
    first = await builder.build("c", card, "haruhi", model=model, max_tokens=MAX_TOKENS)
    assert len(first.lore) == 12
    assert peak > 1  # the entries were counted together

    calls = server.state.tokenize_calls
    prompt = await builder.build(
        "c", card, "haruhi", model=model, max_tokens=MAX_TOKENS, user_name="Kyon"
    )
    # another member: only the entries that name the member are counted again (not the
    # card, which does not name them, nor the other entries)
    assert server.state.tokenize_calls - calls == 3
    texts = [substitute(c, char=persona.name, user="Kyon") for c in contents]
    assert prompt.lore == texts
    # the same counts as each entry counted alone, with the block's heading
    costs = [
        await builder.message_cost(model, {"role": "system", "content": lore_block([t])})
        for t in texts
    ]
    system = {"role": "system", "content": render_system(card, user="Kyon")}
    card_tokens = (await builder.client.tokenize(model, [system])).count
    generation = (
        await builder.client.tokenize(model, [system], add_generation_prompt=True)
    ).count - card_tokens
    assert prompt.estimated is not None
    assert prompt.prompt_tokens == card_tokens + sum(costs) + prompt.estimated[1] + generation

    # A cap smaller than the card's hits: the counts kept stay within it, the prompt is the same.
    monkeypatch.setattr(prompt_module, "LORE_COSTS_KEPT", 8)
    capped = PromptBuilder(builder.memory, builder.client, lore_budget=10_000)
    again = await capped.build(
        "c", card, "haruhi", model=model, max_tokens=MAX_TOKENS, user_name="Kyon"
    )
    assert again.lore == prompt.lore and again.prompt_tokens == prompt.prompt_tokens
    assert 0 < len(capped._lore_costs) <= 8


async def test_the_lorebooks_fold_table_is_built_off_the_event_loop(
    builder: PromptBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lorebook's key prefilter folds case through a table of every code point, about
    0.3 s of CPU to build: the first scan has it built in a worker thread, not on the event
    loop that every reply of the bot shares; the scan finds what it found before."""
    built_on: list[int] = []
    build = lorebook._build_fold_table

    def recorded() -> dict[int, str]:
        built_on.append(threading.get_ident())
        return build()

    monkeypatch.setattr(lorebook, "_folds", None)  # as in a process that never scanned
    monkeypatch.setattr(lorebook, "_build_fold_table", recorded)
    persona = PersonaRegistry(None).load().get("haruhi")
    card = persona.card.model_copy(deep=True)
    card.data.character_book = CharacterBook(
        entries=[
            LoreEntry(keys=["İstanbul"], content="伊斯坦布尔横跨欧亚。"),
            LoreEntry(keys=["外星人"], content="外星人就在我们身边。"),
        ]
    )
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="去 ISTANBUL 吧！")
    prompt = await builder.build("c", card, "haruhi", model="instant-base", max_tokens=100)
    assert prompt.lore == ["伊斯坦布尔横跨欧亚。"]  # the dotted capital I: a plain i
    assert len(built_on) == 1 and built_on[0] != threading.get_ident()  # not the loop's
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="外星人！")
    prompt = await builder.build("c", card, "haruhi", model="instant-base", max_tokens=100)
    assert prompt.lore == ["伊斯坦布尔横跨欧亚。", "外星人就在我们身边。"]
    assert len(built_on) == 1  # built once


@pytest.mark.parametrize("max_tokens", [CONTEXT - 50, CONTEXT, CONTEXT * 4])
async def test_max_tokens_that_leave_no_room_say_so_and_keep_the_message(
    builder: PromptBuilder, max_tokens: int
) -> None:
    """Not the member's message is too long but the reply's limit: the member is told to lower
    it, and the message is not treated as one that can never be answered (which deletes it)."""
    persona = PersonaRegistry(None).load().get("haruhi")
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="你好")
    with pytest.raises(RolecastError, match="max_tokens") as raised:
        await builder.build(
            "c", persona.card, "haruhi", model="instant-base", max_tokens=max_tokens
        )
    assert not isinstance(raised.value, InputTooLongError)
    assert "shorten the card" not in str(raised.value)


async def test_a_card_larger_than_the_context_is_not_the_members_fault(
    builder: PromptBuilder,
) -> None:
    persona = PersonaRegistry(None).load().get("haruhi")
    card = persona.card.model_copy(deep=True)
    card.data.mes_example = "<START>\n{{char}}: 哼。" * 2000
    await builder.memory.add_turn("c", persona="haruhi", role="user", content="你好")
    with pytest.raises(RolecastError, match="Shorten the card") as raised:
        await builder.build("c", card, "haruhi", model="instant-base", max_tokens=MAX_TOKENS)
    assert not isinstance(raised.value, InputTooLongError)
