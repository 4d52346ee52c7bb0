"""Prompt assembly: the persona's card, then the newest turns that fit the token budget.

The budget is the model's context (`max_model_len`, as the server reports it) minus the reply's
`max_tokens`. Tokens are counted by the server's `/tokenize` with its chat template, so counts
are those of the model that answers. Each stored turn is counted once and the count is cached
in its row: assembling a prompt for a channel with 100,000 turns reads only the newest pages
through an index and makes no HTTP call for turns it has seen before.

A turn's cost is measured as the growth of a rendered conversation when the turn is added to
it, which includes the template's per-message wrapping; the card's cost and the generation
prompt's are measured the same way and cached per model in this process.

No /tokenize call is made per message in the steady state: the newest user turn is costed by
an upper bound and settled exactly from the prompt size the server reports (`settled`), and a
reply is costed from the tokens the server reports it generated (`reply_cost`), once exact counts
of two earlier replies of the same model agreed on how the two relate.

In a scene (several personas in one channel, `cast`), the prompt of one persona carries the
turns of the whole cast: its own replies as its own (assistant) turns, the other personas'
replies as named turns of the conversation (`Name:` and a new line, then the reply, as a user
turn), and a note that says so after its card. A named turn costs what the reply costs as an
assistant turn plus a fixed amount per model and name, measured once (`_named_delta`): the name
stands on a line of its own, so a byte-level BPE tokenizer splits the reply's text as it does at
the start of a message. Each persona keeps its own card, summary and token budget.

The newest turn is placed first, before the summary and the lore. Only a member's message
(a user turn) that does not fit beside the card is refused (`InputTooLongError`: the member
can shorten it). The newest turn can also be a persona's reply: another persona's in a scene's
chain, or the persona's own when a reply is written again after one before it, when a reply is
retried after a failure, or when the card grew since. Such a reply is the persona's to answer,
not the member's to shorten: when it does not fit, its start is kept (`_shortened`).

The counts kept in this process (cards, lorebook entries, persona names, channels' windows)
are kept in `BoundedCache`s: a bot that runs for months meets cards, members and channels
without end. Cards and entries are keyed by a digest of the text counted, so a card or an
entry that does not name the member is counted once for all members. What has to be counted
at once (a card's lorebook hits, the names of a scene's cast) is asked for together
(`_message_costs`): the server's /tokenize counts one conversation per call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import regex

from bot.core.cards import Card
from bot.core.client import Completion, Message, ModelClient
from bot.core.lorebook import in_insertion_order, matching_entries, prepare_scan
from bot.core.memory import Memory, Turn
from bot.core.text import clean_text, defuse_control_tokens
from bot.errors import InputTooLongError, PromptBudgetError, RolecastError

log = logging.getLogger(__name__)

_MACROS = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(BOT|USER)>", re.IGNORECASE)
_EMPTY_SYSTEM: Message = {"role": "system", "content": ""}


def substitute(text: str, *, char: str, user: str) -> str:
    """Replace the card macros `{{char}}`/`{{user}}` (and the old `<BOT>`/`<USER>`)."""

    def repl(match: re.Match[str]) -> str:
        which = (match.group(1) or match.group(2)).lower()
        return char if which in ("char", "bot") else user

    return _MACROS.sub(repl, text)


def render_system(card: Card, *, user: str) -> str:
    """The system message for a card, in the order SillyTavern builds its story string."""
    data = card.data
    parts = [
        data.system_prompt,
        data.description,
        f"{{{{char}}}}'s personality: {data.personality}" if data.personality.strip() else "",
        f"Scenario: {data.scenario}" if data.scenario.strip() else "",
        _examples(data.mes_example),
        data.post_history_instructions,
    ]
    text = "\n\n".join(p.strip() for p in parts if p and p.strip())
    if not text:
        text = f"You are {data.name}. Stay in character."
    return defuse_control_tokens(clean_text(substitute(text, char=data.name, user=user)))


def _examples(mes_example: str) -> str:
    """`mes_example` blocks (each starting with `<START>`) as one labelled section."""
    blocks = [b.strip() for b in re.split(r"<START>", mes_example, flags=re.IGNORECASE)]
    blocks = [b for b in blocks if b]
    if not blocks:
        return ""
    return "Example dialogue:\n" + "\n\n".join(blocks)


def scene_note(char: str) -> str:
    """What a scene adds after a persona's card (the training export adds it too)."""
    return defuse_control_tokens(
        clean_text(
            "This is a group role-play: the other characters' lines come as their name, a "
            f"colon and a new line, then what they say. Write only {char}'s next reply."
        )
    )


def named_turn(name: str, content: str) -> str:
    """Another persona's reply as the prompt of a persona in a scene shows it."""
    return f"{' '.join(name.split())}:\n{content}"


def turn_message(turn: Turn, *, speaker_names: bool) -> Message:
    """A stored turn as a prompt message. Its text is the member's or the model's, so
    control-token look-alikes in it are defused (the client does so for every request too;
    doing it here as well makes the token counts of the prompt those of what is sent)."""
    content = turn.content
    if speaker_names and turn.role == "user" and turn.author_name:
        content = f"{turn.author_name}: {content}"
    return {"role": turn.role, "content": defuse_control_tokens(content)}


def scene_message(
    turn: Turn, persona: str, names: Mapping[str, str], *, speaker_names: bool
) -> Message:
    """A stored turn as a prompt message for `persona` in a scene: its own replies are its
    own turns, another persona's replies are named turns of the conversation."""
    if turn.role == "user" or turn.persona == persona:
        return turn_message(turn, speaker_names=speaker_names)
    name = names.get(turn.persona, turn.persona)
    return {"role": "user", "content": defuse_control_tokens(named_turn(name, turn.content))}


# A grapheme cluster: a cut text never splits an emoji or a letter from its accents.
_GRAPHEME = regex.compile(r"\X")
ELLIPSIS = "…"


def cut_short(text: str, chars: int) -> str:
    """The start of `text`, at most `chars` characters of it, then an ellipsis that shows it
    was cut. Whole grapheme clusters only, and at a space when there is one near the end (a
    cut word reads as a typo)."""
    end = 0
    for cluster in _GRAPHEME.finditer(text):
        if cluster.end() > chars:
            break
        end = cluster.end()
    head = text[:end]
    space = max(head.rfind(" "), head.rfind("\n"))
    if space > len(head) * 3 // 4:
        head = head[:space]
    return head.rstrip() + ELLIPSIS


@dataclass
class Prompt:
    messages: list[Message]
    model: str
    prompt_tokens: int
    budget: int
    turns_included: int
    history_truncated: bool
    # memory beyond the window: the rolling summary covers turns up to `summary_through`;
    # `oldest_included_id` is the oldest turn in the prompt (what a new summary stops before)
    summary_through: int | None = None
    oldest_included_id: int | None = None
    lore: list[str] = field(default_factory=list)
    # The newest turn, when it had no cached count, is costed by an upper bound instead of a
    # /tokenize call: (turn id, bound). `PromptBuilder.settled` replaces the bound by the exact
    # count once the server reports the prompt's real size.
    estimated: tuple[int, int] | None = None
    exact: bool = True  # every other part of `prompt_tokens` is an exact count
    newest_id: int | None = None  # the newest turn in the prompt


def summary_block(content: str) -> str:
    return defuse_control_tokens(f"Summary of the conversation so far:\n{content.strip()}")


def lore_block(entries: list[str]) -> str:
    lines = "\n".join(f"- {e.strip()}" for e in entries)
    return defuse_control_tokens(f"Background knowledge:\n{lines}")


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A mapping that keeps at most `size` items, the least recently used going first.

    The builder lives as long as the bot, and its caches are keyed by what the bot meets
    without end (cards, lorebook entries, member and persona names, channels): unbounded, they
    would only grow. A small OrderedDict: no cache library is a dependency, and
    `functools.lru_cache` cannot hold results that are awaited."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a cache of {size} items")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __getitem__(self, key: K) -> V:
        value = self._items[key]
        self._items.move_to_end(key)
        return value

    def get(self, key: K) -> V | None:
        """The value for `key` (now the most recently used), or None."""
        return self[key] if key in self._items else None

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


def text_key(text: str) -> bytes:
    """What a count of `text` is cached by: a digest, not the text (a card can be long)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class _ModelCounts:
    """Per-model constants measured once through /tokenize."""

    max_model_len: int
    baseline: int  # tokens of a conversation holding only an empty system message
    generation_prompt: int  # what add_generation_prompt adds
    wrap: dict[str, int] = field(default_factory=dict)  # per role: a message with no content
    # Per finish reason: a reply's exact cost minus (the assistant wrapping + the completion
    # tokens the server reported), once two exact counts agreed on it; None where they showed
    # that replies of this model must be counted (a template that rewrites replies).
    reply_offsets: dict[str | None, int | None] = field(default_factory=dict)
    reply_samples: dict[str | None, int] = field(default_factory=dict)  # one exact count seen
    replies_costed: int = 0  # from completion tokens, since this process started
    # the costs of `_NAMED_PROBES` as assistant turns, once measured (`_measure_names`)
    probes: list[int] | None = None


# A byte-level BPE token covers at least one UTF-8 byte; SentencePiece adds at most a word
# marker; the margin also covers merges across the template's wrapping.
_BOUND_MARGIN = 4
# Completion tokens and a reply's cost differ by the end-of-turn token (counted in both or
# not) and the template's line break: a few tokens. More, and the template rewrites replies
# (drops reasoning, say): those replies are counted through /tokenize.
_MAX_REPLY_OFFSET = 4
# A reply costed from its completion tokens is exact when the model's tokens are the ones the
# tokenizer would choose for its text, which is nearly always so; when they are not, the count
# is off by a token or two, and the user turn settled after it takes the opposite error (the
# pair stays exact). The budget keeps this many tokens free for such errors where the prompt's
# window splits a pair.
ESTIMATE_RESERVE = 16
# One reply in this many is counted through /tokenize all the same, to check the offset.
RECHECK_EVERY = 32
# The most recent turns a card's lorebook may scan for its keys.
MAX_LORE_SCAN_DEPTH = 50
# Turns read beyond the size of a channel's last prompt window before paging on.
_PAGE_SLACK = 32
# Two texts of different scripts: a name's cost is fixed where both give the same.
_NAMED_PROBES = ("Well, I never said that.", "「你好」我们走吧。")
# Named turns counted one by one (a tokenizer that splits text after a name otherwise),
# kept per model and turn up to this many.
_NAMED_COSTS_KEPT = 50_000
# The most counts kept of card texts (per model, card, member named in it, scene or not), of
# lorebook entries (per model and entry text), of persona names' costs (per model and name),
# and the most channels whose last window is remembered.
CARD_COUNTS_KEPT = 1_000
LORE_COSTS_KEPT = 10_000
NAMED_DELTAS_KEPT = 1_000
WINDOWS_KEPT = 10_000
# /tokenize calls one prompt has in flight at most (a card's lorebook hits counted together).
TOKENIZE_CONCURRENCY = 8
# Counts of a cut reply's text before one fits (each try cuts in proportion to the last
# count, so one or two are the rule): a reply that still does not fit is left out.
_CUT_TRIES = 4


class PromptBuilder:
    def __init__(
        self,
        memory: Memory,
        client: ModelClient,
        *,
        speaker_names: bool = False,
        summaries: bool = True,
        lore_budget: int = 256,
        lore_scan_depth: int = 4,
    ) -> None:
        self.memory = memory
        self.client = client
        self.speaker_names = speaker_names
        self.summaries = summaries
        self.lore_budget = lore_budget
        self.lore_scan_depth = lore_scan_depth
        self._counts: dict[str, _ModelCounts] = {}
        self._counting: set[asyncio.Task[None]] = set()
        # counts per (model, text_key of what was counted)
        self._card_counts: BoundedCache[tuple[str, bytes], int] = BoundedCache(CARD_COUNTS_KEPT)
        self._lore_costs: BoundedCache[tuple[str, bytes], int] = BoundedCache(LORE_COSTS_KEPT)
        # per (model, persona name): what a reply costs more as that persona's named turn
        # than as an assistant turn; None where two probes disagreed (`_measure_names`)
        self._named_deltas: BoundedCache[tuple[str, str], int | None] = BoundedCache(
            NAMED_DELTAS_KEPT
        )
        self._named_costs: BoundedCache[tuple[str, int, str], int] = BoundedCache(_NAMED_COSTS_KEPT)
        # turns in the last prompt, per channel and persona
        self._windows: BoundedCache[tuple[str, str], int] = BoundedCache(WINDOWS_KEPT)

    async def _model_counts(self, model: str) -> _ModelCounts:
        counts = self._counts.get(model)
        if counts is None:
            base, with_gen = await asyncio.gather(
                self.client.tokenize(model, [_EMPTY_SYSTEM]),
                self.client.tokenize(model, [_EMPTY_SYSTEM], add_generation_prompt=True),
            )
            counts = _ModelCounts(base.max_model_len, base.count, with_gen.count - base.count)
            self._counts[model] = counts
        return counts

    async def message_cost(self, model: str, message: Message) -> int:
        """Tokens that `message` adds to a conversation, template wrapping included."""
        counts = await self._model_counts(model)
        total = await self.client.tokenize(model, [_EMPTY_SYSTEM, message])
        return max(total.count - counts.baseline, 1)

    async def _message_costs(self, model: str, messages: Sequence[Message]) -> list[int]:
        """`message_cost` of each of `messages`, the /tokenize calls made together (at most
        `TOKENIZE_CONCURRENCY` at a time) rather than one awaited after another: the server
        counts one conversation per call (vLLM's /tokenize takes no batch), so what a prompt
        needs counted at once takes one round trip's time, not one per message. A failure
        cancels the calls still running and is raised as it is."""
        if not messages:
            return []
        await self._model_counts(model)  # once, before the calls that all need it
        limit = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

        async def cost(message: Message) -> int:
            async with limit:
                return await self.message_cost(model, message)

        tasks = [asyncio.ensure_future(cost(m)) for m in messages]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def count_soon(self, model: str, turn: Turn, completion: Completion | None = None) -> None:
        """Count a just-stored turn in the background, so the reply's last edit does not wait
        for it; `build` waits for it only if it is still running then. A failure leaves the
        turn uncounted, and `build` counts it when it needs it. With the `completion` that
        wrote a reply, the exact count also teaches `reply_cost` how to cost the next ones."""
        task = asyncio.create_task(self._count(model, turn, completion))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _count(self, model: str, turn: Turn, completion: Completion | None) -> None:
        try:
            cost = await self.message_cost(
                model, turn_message(turn, speaker_names=self.speaker_names)
            )
            if completion is not None and completion.completion_tokens:
                wrap = await self._wrap(model, "assistant")
                self._learn_reply_offset(
                    model, completion, cost - wrap - completion.completion_tokens
                )
        except RolecastError as exc:
            log.debug("turn %d left uncounted: %s", turn.id, exc)
            return
        await self.memory.set_token_counts([(turn.id, cost)])

    def _learn_reply_offset(self, model: str, completion: Completion, offset: int) -> None:
        counts = self._counts[model]
        reason = completion.finish_reason
        if reason in counts.reply_offsets:
            learnt = counts.reply_offsets[reason]
            if learnt is None or learnt == offset:
                return  # found not to work, or confirmed by a check
            log.info("model %s: a reply's offset was %d, not %d; relearning", model, offset, learnt)
            del counts.reply_offsets[reason]
        if abs(offset) > _MAX_REPLY_OFFSET:
            counts.reply_offsets[reason] = None
            log.info("model %s: replies are counted through /tokenize (offset %d)", model, offset)
        elif counts.reply_samples.get(reason) == offset:
            counts.reply_offsets[reason] = offset
        else:
            counts.reply_samples[reason] = offset

    def reply_cost(self, model: str, completion: Completion, text: str) -> int | None:
        """The prompt cost of a reply stored as `text`, from the completion tokens the server
        reported, without a /tokenize call; None until exact counts of this model's replies
        agreed on how the two relate (then `count_soon(model, turn, completion)` counts it),
        when the stored text is not what the model generated (it was trimmed), and for one
        reply in `RECHECK_EVERY`, whose exact count checks that the relation still holds."""
        counts = self._counts.get(model)
        tokens = completion.completion_tokens
        if counts is None or not tokens or text != completion.text:
            return None
        offset = counts.reply_offsets.get(completion.finish_reason)
        wrap = counts.wrap.get("assistant")
        if offset is None or wrap is None:
            return None
        counts.replies_costed += 1
        if counts.replies_costed % RECHECK_EVERY == 0:
            return None
        return max(wrap + tokens + offset, 1)

    async def aclose(self) -> None:
        """Let background counts finish (before the client and database close)."""
        if self._counting:
            await asyncio.gather(*self._counting, return_exceptions=True)

    async def _wrap(self, model: str, role: str) -> int:
        """What a message of `role` with no content costs."""
        counts = await self._model_counts(model)
        if role not in counts.wrap:
            counts.wrap[role] = await self.message_cost(model, {"role": role, "content": ""})
        return counts.wrap[role]

    async def _named_delta(self, model: str, name: str) -> int | None:
        """What a reply costs more as a named turn of `name` than as an assistant turn, for
        `model`; None when that is not one fixed amount (measured once, on two probes)."""
        key = (model, name)
        if key in self._named_deltas:
            return self._named_deltas[key]
        return (await self._measure_names(model, [name]))[name]

    async def _measure_names(self, model: str, names: Iterable[str]) -> dict[str, int | None]:
        """Measure `_named_delta` for those of `names` not measured yet for `model`, all
        together: each name's probes as named turns, less the probes' cost as assistant
        turns (measured once per model, the same for every name). Returns what it measured."""
        wanted = [n for n in dict.fromkeys(names) if (model, n) not in self._named_deltas]
        if not wanted:
            return {}
        counts = await self._model_counts(model)
        own: list[Message] = []
        if counts.probes is None:
            own = [{"role": "assistant", "content": probe} for probe in _NAMED_PROBES]
        named: list[Message] = [
            {"role": "user", "content": defuse_control_tokens(named_turn(name, probe))}
            for name in wanted
            for probe in _NAMED_PROBES
        ]
        costs = await self._message_costs(model, own + named)
        if counts.probes is None:
            counts.probes = costs[: len(own)]
        probes = counts.probes
        measured: dict[str, int | None] = {}
        for i, name in enumerate(wanted):
            start = len(own) + i * len(_NAMED_PROBES)
            mine = costs[start : start + len(_NAMED_PROBES)]
            deltas = {cost - alone for cost, alone in zip(mine, probes, strict=True)}
            delta = deltas.pop() if len(deltas) == 1 else None
            measured[name] = self._named_deltas[(model, name)] = delta
            if delta is None:
                log.info("model %s: named turns of %r are counted one by one", model, name)
        return measured

    async def _named_cost(
        self,
        model: str,
        turn: Turn,
        persona: str,
        names: Mapping[str, str],
        new_counts: list[tuple[int, int]],
    ) -> int:
        """The cost of another persona's reply as a named turn in `persona`'s prompt."""
        own = turn.token_count
        if own is None:
            own = await self.message_cost(model, turn_message(turn, speaker_names=False))
            new_counts.append((turn.id, own))
        name = names.get(turn.persona, turn.persona)
        delta = await self._named_delta(model, name)
        if delta is not None:
            return max(own + delta, 1)
        key = (model, turn.id, name)
        cost = self._named_costs.get(key)
        if cost is None:
            message = scene_message(turn, persona, names, speaker_names=self.speaker_names)
            cost = self._named_costs[key] = await self.message_cost(model, message)
        return cost

    async def _shortened(
        self,
        model: str,
        turn: Turn,
        render: Callable[[Turn], Message],
        cost: int,
        room: int,
    ) -> tuple[Turn, int] | None:
        """`turn`, a reply too long for the `room` left beside the card, cut to its start
        (`cut_short`) so that it costs at most half of that room; with the cut text's exact
        cost, counted again through /tokenize (the prompt's size stays a bound). None when not
        even a start of it fits: the reply is then left out.

        Why its start, and why half: the persona is asked to go on from this reply, which is
        the one piece of context the prompt is built around; its start says what it is about,
        and often to whom. The other half
        is left for the turns before it, which say what it answers (the member's message),
        and for the summary and the lore. Leaving the reply out instead would make the
        persona answer as if it had never been written. Only the prompt's copy is cut: the
        stored turn keeps its text and its count."""
        target = room // 2
        kept = len(turn.content)
        for _ in range(_CUT_TRIES):
            # in proportion to the last count, a little short of it (the wrapping and the
            # ellipsis do not shrink with the text)
            kept = kept * target * 9 // (cost * 10)
            if kept < 1:
                return None
            cut = replace(turn, content=cut_short(turn.content, kept), token_count=None)
            cost = await self.message_cost(model, render(cut))
            if cost <= target:
                return cut, cost
            kept = len(cut.content)
        return None

    async def upper_bound(self, model: str, message: Message) -> int:
        """A cost no smaller than `message_cost`, without tokenizing its text."""
        wrap = await self._wrap(model, message["role"])
        return wrap + len(message["content"].encode()) + _BOUND_MARGIN

    def settled(self, prompt: Prompt, prompt_tokens: int | None) -> list[tuple[int, int]]:
        """The exact count of the turn `build` only bounded, from the prompt size the server
        reported: everything else in the prompt was counted (a reply costed from its
        completion tokens is exact in the normal case), so the difference is that turn's
        cost. Saves a /tokenize call per message. Returns `(turn id, count)` pairs to cache
        (none when there is nothing to settle or the sizes do not add up)."""
        if prompt.estimated is None or not prompt.exact or not prompt_tokens:
            return []
        turn_id, bound = prompt.estimated
        cost = prompt_tokens - (prompt.prompt_tokens - bound)
        if 1 <= cost <= bound:
            return [(turn_id, cost)]
        # The server counts differently (another template?): the turn stays uncounted and is
        # counted next time, and replies of this model are counted exactly until two exact
        # counts agree again on how they relate to the completion tokens.
        log.warning(
            "prompt size %d does not add up; turn %d stays uncounted", prompt_tokens, turn_id
        )
        counts = self._counts.get(prompt.model)
        if counts is not None:
            counts.reply_offsets.clear()
            counts.reply_samples.clear()
        return []

    async def build(
        self,
        channel_id: str,
        card: Card,
        persona: str,
        *,
        model: str,
        max_tokens: int,
        user_name: str = "User",
        cast: Mapping[str, str] | None = None,
        before_id: int | None = None,
    ) -> Prompt:
        """The prompt for the next reply of `persona` in `channel_id`. In a scene, `cast`
        names every member (the persona too) by key: the prompt then carries the turns of
        the whole cast, the others' replies as named turns. With `before_id`, the prompt for
        that turn written again: from the turns before it.

        Raises InputTooLongError when the newest turn is a member's message that does not fit
        beside the card (a persona's reply there is cut to fit instead: `_shortened`),
        PromptBudgetError when the card alone does not fit (or max_tokens leaves no room).
        """
        if self._counting:
            # shielded: a reply cancelled while waiting (a scene's chain, interrupted) leaves
            # the counts running for the next prompt
            await asyncio.shield(asyncio.gather(*self._counting, return_exceptions=True))
        scene = cast is not None and len(cast) > 1
        names: Mapping[str, str] = cast if cast is not None and scene else {}
        history: str | tuple[str, ...] = tuple(names) if scene else persona
        counts = await self._model_counts(model)
        budget = counts.max_model_len - max_tokens - counts.generation_prompt - ESTIMATE_RESERVE
        content = render_system(card, user=user_name)
        if scene:
            content = f"{content}\n\n{scene_note(card.data.name)}"
        system: Message = {"role": "system", "content": content}
        # by the text counted: a card that does not name the member is counted once for all
        card_key = (model, text_key(content))
        card_tokens = self._card_counts.get(card_key)
        if card_tokens is None:
            card_tokens = (await self.client.tokenize(model, [system])).count
            self._card_counts[card_key] = card_tokens
        used = card_tokens
        if used >= budget:
            # Not the member's message: no message fits until the card or max_tokens changes.
            room = counts.max_model_len - counts.generation_prompt - ESTIMATE_RESERVE
            if used < room:
                raise PromptBudgetError(
                    f"This channel's max_tokens ({max_tokens}) leaves no room for a prompt in "
                    f"this model's context of {counts.max_model_len} tokens (the persona card "
                    f"alone takes {used}). Lower max_tokens well below {room - used}."
                )
            raise PromptBudgetError(
                f"The persona card alone takes {used} tokens, more than this model's context "
                f"of {counts.max_model_len}. Shorten the card."
            )

        if scene:
            # the other members' names, measured together the first time (one round trip)
            await self._measure_names(model, [n for k, n in names.items() if k != persona])

        chosen: list[Turn] = []
        new_counts: list[tuple[int, int]] = []
        estimated: tuple[int, int] | None = None
        truncated = False

        def message_of(turn: Turn) -> Message:
            if scene:
                return scene_message(turn, persona, names, speaker_names=self.speaker_names)
            return turn_message(turn, speaker_names=self.speaker_names)

        async def cost_of(turn: Turn, room: int) -> int:
            nonlocal estimated
            if scene and turn.role == "assistant" and turn.persona != persona:
                # another persona's reply: its own cost and its name's, both known in the
                # steady state (no await); measured or counted here otherwise
                name = names.get(turn.persona, turn.persona)
                delta = self._named_deltas.get((model, name))
                if turn.token_count is not None and delta is not None:
                    return max(turn.token_count + delta, 1)
                return await self._named_cost(model, turn, persona, names, new_counts)
            if turn.token_count is not None:
                return turn.token_count
            message = turn_message(turn, speaker_names=self.speaker_names)
            if not chosen and turn.role == "user":
                # A loose bound (bytes) would crowd out the summary and the lore: only a
                # message small beside the room left is bounded instead of counted.
                bound = await self.upper_bound(model, message)
                if bound <= room // 2:
                    estimated = (turn.id, bound)
                    return bound
            cost = await self.message_cost(model, message)
            new_counts.append((turn.id, cost))
            return cost

        # Memory beyond the window: the rolling summary stands in for the turns it covers, and
        # lorebook entries whose keys occur in the recent turns get their own small budget. Both
        # take only the room that the newest turn (the member's message, most often) leaves: it
        # is placed first, and refused only when it is a member's message that does not fit
        # beside the card alone; a persona's reply that does not fit is cut (`_shortened`).
        summary = await self.memory.summary(channel_id, persona) if self.summaries else None
        after_id = summary.through_id if summary is not None else 0
        # A prompt holds about as many turns as the last one did: read that many and a few.
        window = self._windows.get((channel_id, persona))
        first_page = window + _PAGE_SLACK if window is not None else None
        # (pages are read whole: nothing is held open between turns)
        turns = aiter(
            self.memory.iter_turns_backwards(
                channel_id, history, first_page=first_page, before_id=before_id
            )
        )
        newest = await anext(turns, None)
        beyond_summary = newest is not None and newest.id > after_id
        if newest is not None and beyond_summary:
            cost = await cost_of(newest, budget - used)
            if used + cost > budget and newest.role == "user":
                await self._save(new_counts)
                raise InputTooLongError(
                    f"That message is about {cost} tokens; with the persona card only "
                    f"{budget - used} fit this model's context. Please shorten it."
                )
            if used + cost > budget:
                shortened = await self._shortened(model, newest, message_of, cost, budget - used)
                if shortened is None:
                    # not even its start fits: the turns before it are tried as usual
                    log.debug("channel %s: turn %d left out, too long", channel_id, newest.id)
                    truncated = True
                else:
                    newest, cost = shortened
            if not truncated:
                used += cost
                chosen.append(newest)

        extra: list[str] = []
        if summary is not None:
            block = summary_block(summary.content)
            summary_cost = summary.token_count
            if summary_cost is None:
                summary_cost = await self.message_cost(model, {"role": "system", "content": block})
                await self.memory.set_summary_token_count(
                    channel_id, persona, summary.through_id, summary_cost
                )
            if used + summary_cost < budget:
                extra.append(block)
                used += summary_cost
        lore, lore_cost = await self._lore(
            channel_id,
            card,
            history,
            model=model,
            user_name=user_name,
            room=budget - used,
            before_id=before_id,
        )
        if lore:
            extra.append(lore_block(lore))
            used += lore_cost
        if extra:
            system = {"role": "system", "content": "\n\n".join([system["content"], *extra])}

        if beyond_summary:
            async for turn in turns:
                if turn.id <= after_id:
                    break  # the summary covers this turn and every older one
                cost = await cost_of(turn, budget - used)
                if used + cost > budget:
                    truncated = True
                    break
                used += cost
                chosen.append(turn)
        await self._save(new_counts)
        self._windows[(channel_id, persona)] = len(chosen)
        oldest_id = chosen[-1].id if chosen else None
        newest_id = chosen[0].id if chosen else None
        chosen.reverse()
        messages = [system] + [message_of(t) for t in chosen]
        if truncated:
            log.debug("channel %s: %d turns fit the budget of %d", channel_id, len(chosen), budget)
        return Prompt(
            messages,
            model,
            used + counts.generation_prompt,
            budget,
            len(chosen),
            truncated,
            summary_through=summary.through_id if summary is not None else None,
            oldest_included_id=oldest_id,
            lore=lore,
            estimated=estimated,
            # summary and lore blocks are costed as messages of their own, a little more
            # than they add inside the system message: the total is then only a bound
            exact=not extra,
            newest_id=newest_id,
        )

    async def _lore(
        self,
        channel_id: str,
        card: Card,
        persona: str | tuple[str, ...],
        *,
        model: str,
        user_name: str,
        room: int,
        before_id: int | None = None,
    ) -> tuple[list[str], int]:
        """Lorebook entries triggered by the recent turns, within the book's token budget
        (and the room left in the prompt); returns their texts and their cost."""
        book = card.data.character_book
        if book is None or not book.entries:
            return [], 0
        # A card's own scan depth, within sane bounds (it comes from whoever wrote the card).
        depth = min(max(book.scan_depth or self.lore_scan_depth, 1), MAX_LORE_SCAN_DEPTH)
        recent = await self.memory.recent_turns(
            channel_id, persona, limit=depth, before_id=before_id
        )
        await prepare_scan()  # the scan's case-fold table, built off the event loop
        hits = matching_entries(book, [t.content for t in recent])
        if not hits:
            return [], 0
        allowance = min(book.token_budget or self.lore_budget, self.lore_budget, room // 2)
        texts = [substitute(h.entry.content, char=card.data.name, user=user_name) for h in hits]
        # Each entry is costed as a block of its own, with the block's heading and bullet:
        # more than an entry adds beside others, never less than one alone adds. Keyed by
        # that block's text, so an entry that does not name the member is counted once for
        # all; the uncached ones are counted together.
        blocks = [lore_block([text]) for text in texts]
        keys = [(model, text_key(block)) for block in blocks]
        costs = {key: cost for key in keys if (cost := self._lore_costs.get(key)) is not None}
        missing = {key: block for key, block in zip(keys, blocks, strict=True) if key not in costs}
        counted = await self._message_costs(
            model, [{"role": "system", "content": block} for block in missing.values()]
        )
        for key, cost in zip(missing, counted, strict=True):
            costs[key] = self._lore_costs[key] = cost
        chosen, spent = [], 0
        for hit, text, key in zip(hits, texts, keys, strict=True):
            cost = costs[key]
            if spent + cost > allowance:
                continue
            chosen.append((hit, text))
            spent += cost
        order = {h.index: i for i, h in enumerate(in_insertion_order(h for h, _ in chosen))}
        chosen.sort(key=lambda pair: order[pair[0].index])
        return [text for _, text in chosen], spent

    async def _save(self, new_counts: list[tuple[int, int]]) -> None:
        if new_counts:
            await self.memory.set_token_counts(new_counts)
