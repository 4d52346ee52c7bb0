"""`rolecast chat`: the chat core driven from a terminal.

Interactive (stdin is a terminal): a prompt, replies streamed token by token under the
persona's name, a dim line of latency figures, and slash commands; Ctrl-C stops a reply, and at
the prompt a second Ctrl-C in a row leaves, as Ctrl-D does (`bot.terminal.keyboard`). Scripted
(stdin is a pipe or file): one user turn per input line, one reply per output line (newlines in
a reply become spaces), errors on stderr; the exit status is 1 if any turn failed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape

from bot.core.approvals import Approvals
from bot.core.chat import ChatService, Reply, Speaker, describe_model
from bot.core.client import ModelClient, ending_note
from bot.core.memory import Memory, Turn
from bot.core.personas import Persona, PersonaRegistry
from bot.core.sidecar import embedded_server
from bot.core.text import for_terminal
from bot.errors import ModelServerError, RolecastError
from bot.settings import BotSettings, SamplingSettings, sampling_with
from bot.terminal.keyboard import Keyboard
from bot.terminal.scene import RETRY_KEPT, SCENE_HELP, TerminalScene

log = logging.getLogger(__name__)

HELP = """Commands:
  /persona NAME     switch to another persona (its own conversation in this session)
  /personas         list the personas
  /history [N]      show the last N turns (default 20)
  /retry            ask for the last reply again
  /approve          approve the last reply for training (`rolecast retrain` trains on them)
  /set KEY=VALUE    change sampling: temperature, top_p, max_tokens, repetition_penalty, seed
  /reset            delete this session's conversation (asks first)
  /help             this text
  /quit             leave (Ctrl-D works too)"""


@dataclass
class ChatOptions:
    persona: str | None
    session: str = "default"
    user_name: str = "User"
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    cast: tuple[str, ...] = ()  # several personas: the session is a scene of them

    @property
    def channel_id(self) -> str:
        return f"terminal:{self.session}"


PROMPT = "[bold cyan]you>[/] "


async def read_lines(console: Console) -> AsyncIterator[str | None]:
    """User lines from a piped stdin; None stands for a line that was not valid UTF-8 (it is
    reported and skipped, never stored). At a terminal, `Keyboard.lines` reads them."""
    number = 0
    while True:
        number += 1
        raw = await asyncio.to_thread(sys.stdin.buffer.readline)
        if not raw:
            return
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            not_utf8(console, number, exc.start)
            yield None


def not_utf8(console: Console, number: int, at: int) -> None:
    """Report an input line that is not valid UTF-8 (it is skipped)."""
    console.print(
        f"[red]error:[/] input line {number} is not valid UTF-8 (at {at}); skipped",
        highlight=False,
    )


class TerminalChat:
    def __init__(
        self,
        chat: ChatService,
        options: ChatOptions,
        *,
        interactive: bool,
        out: Console,
        err: Console,
        approvals: Approvals | None = None,
        keyboard: Keyboard | None = None,
    ) -> None:
        self.chat = chat
        self.approvals = approvals or Approvals(chat.memory)
        self.keyboard = keyboard  # the interactive prompt; None: lines come from a pipe
        self.options = options
        self.interactive = interactive
        self.out = out
        self.err = err
        self.failures = 0
        self._commands: dict[str, Callable[[str], object]] = {
            "/persona": self._cmd_persona,
            "/personas": self._cmd_personas,
            "/history": self._cmd_history,
            "/retry": self._cmd_retry,
            "/approve": self._cmd_approve,
            "/set": self._cmd_set,
            "/reset": self._cmd_reset,
            "/help": self._cmd_help,
        }
        self._lines: AsyncIterator[str | None] | None = None
        self.scene = TerminalScene(self)
        self._commands.update(self.scene.commands())

    @property
    def channel(self) -> str:
        return self.options.channel_id

    async def run(self) -> int:
        await self._start()
        self._lines = self.keyboard.lines() if self.keyboard else read_lines(self.err)
        async for line in self._lines:
            if line is None:
                self.failures += 1
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text.startswith("/"):
                name, _, arg = text.partition(" ")
                handler = self._commands.get(name)
                if handler is None:
                    self._error(f"unknown command {name}; type /help for the list")
                    continue
                result = handler(arg.strip())
                if asyncio.iscoroutine(result):
                    await result
                continue
            if (scene := await self.scene.current()) is not None:
                await self._interruptible(self._guard(self.scene.say(scene, text)))
                continue
            await self._reply(
                self.chat.send(self.channel, text, self._speaker(), self.options.sampling)
            )
        return 1 if self.failures else 0

    async def _reply(self, events: AsyncIterator[str | Reply], *, failed: str = "") -> None:
        """Stream one reply; at the keyboard, Ctrl-C stops it and the chat goes on, with the
        user's turn kept and nothing of the stopped reply stored (as when the server stops
        mid-reply: /retry asks again). `failed` goes before the error when it fails."""
        await self._interruptible(self._guard(self._stream(events), failed=failed))

    async def _interruptible(self, work: Awaitable[None]) -> None:
        """Run `work` (one reply, or a scene's replies); at the keyboard Ctrl-C stops it."""
        if self.keyboard is None:
            await work
            return
        if await self.keyboard.reply(work):
            self._write("\n")
            self.err.print(
                "[dim]Reply stopped; your message is kept: /retry asks again. "
                "Ctrl-C again or Ctrl-D leaves.[/]"
            )

    async def _start(self) -> None:
        cast = tuple(dict.fromkeys(self.options.cast))
        if len(cast) > 1 or (not self.options.persona and await self.scene.current() is not None):
            await self.scene.start(cast if len(cast) > 1 else ())
            return
        if self.options.persona:
            greeting = await self.chat.set_persona(
                self.channel, self.options.persona, user_name=self.options.user_name
            )
        else:
            greeting = None
        persona = await self.chat.require_persona(self.channel)
        await self._say_served_by(persona)
        if self.interactive:
            count = await self.chat.memory.count_turns(self.channel)
            self.out.print(
                f"[dim]Chatting with [bold]{escape(for_terminal(persona.name))}[/] ({persona.key}) "
                "in session "
                f"{self.options.session!r}; {count} turn{'s' * (count != 1)} remembered. "
                "/help for commands.[/]"
            )
            if greeting is not None:
                self._show_turn(greeting)

    async def _say_served_by(self, persona: Persona) -> None:
        """One dim line: which adapter answers for `persona` (nothing if the server is down:
        the first message says so)."""
        try:
            served = await self.chat.served_by(persona)
        except RolecastError:
            return
        self.err.print(
            f"[dim]{escape(for_terminal(persona.name))} answers through "
            f"{escape(describe_model(served))}.[/]"
        )

    def _speaker(self) -> Speaker:
        return Speaker(id=f"terminal:{self.options.user_name}", name=self.options.user_name)

    async def _guard(self, work: object, *, failed: str = "") -> None:
        """Run one reply; turn user-facing errors into an error line (after `failed`), keep
        going."""
        try:
            await work  # type: ignore[misc]
        except RolecastError as exc:
            if self.interactive:
                self.out.print()
            self.failures += 1
            self._error(f"{failed}{exc}")

    async def _stream(self, events: AsyncIterator[str | Reply]) -> None:
        persona = await self.chat.require_persona(self.channel)
        started = False
        async for event in events:
            if isinstance(event, Reply):
                self._finish(event, started)
                return
            if not started:
                started = True
                if self.interactive:
                    name = escape(for_terminal(persona.name))
                    self.out.print(f"[bold magenta]{name}>[/] ", end="")
            self._write(event if self.interactive else event.replace("\n", " "))

    def _write(self, text: str) -> None:
        # The model's text goes to the terminal as it is, but for control characters: an
        # escape sequence in a reply must not drive the terminal.
        self.out.file.write(for_terminal(text))
        self.out.file.flush()

    def _finish(self, reply: Reply, started: bool) -> None:
        self._write("\n")
        turn = reply.turn
        note = ending_note(turn.finish_reason, turn.complete)
        if not self.interactive:
            if note:  # stdout keeps one reply per line; the mark goes to stderr
                self.err.print(f"[dim]\\[{note}][/]", highlight=False)
            return
        if note:
            self.out.print(f"[dim]\\[{note}][/]")
        self._figures(reply)

    def _figures(self, reply: Reply) -> None:
        """The dim line of figures after a reply."""
        c = reply.completion
        figures = []
        if c.ttft_s is not None:
            figures.append(f"first token {c.ttft_s:.2f} s")
        if c.completion_tokens is not None:
            figures.append(f"{c.completion_tokens} tokens in {c.total_s:.1f} s")
        if c.tokens_per_s is not None:
            figures.append(f"{c.tokens_per_s:.1f} tok/s")
        figures.append(
            f"prompt {reply.prompt.prompt_tokens}/{reply.prompt.budget} tokens, "
            f"{reply.prompt.turns_included} turns"
            + (" (older ones left out)" if reply.prompt.history_truncated else "")
        )
        figures.append(c.model)
        self.out.print(f"[dim]{escape(' · '.join(figures))}[/]")

    def _error(self, message: str) -> None:
        self.err.print(f"[red]error:[/] {escape(for_terminal(message))}", highlight=False)

    def _show_turn(self, turn: Turn) -> None:
        if turn.role == "user":
            who, style = turn.author_name or self.options.user_name, "bold cyan"
        else:
            known = turn.persona in self.chat.personas
            who, style = (
                self.chat.personas.get(turn.persona).name if known else turn.persona,
                "bold magenta",
            )
        note = ending_note(turn.finish_reason, turn.complete)
        mark = f" [dim]\\[{note}][/]" if note else ""
        self.out.print(
            f"[{style}]{escape(for_terminal(who))}>[/] {escape(for_terminal(turn.content))}{mark}"
        )

    # -- commands ---------------------------------------------------------------------------

    async def _cmd_persona(self, arg: str) -> None:
        if not arg:
            persona = await self.chat.require_persona(self.channel)
            self.out.print(f"Current persona: {escape(for_terminal(persona.name))} ({persona.key})")
            return
        try:
            greeting = await self.chat.set_persona(
                self.channel, arg, user_name=self.options.user_name
            )
        except RolecastError as exc:
            self._error(str(exc))
            return
        persona = await self.chat.require_persona(self.channel)
        self.err.print(
            f"[dim]Now chatting with {escape(for_terminal(persona.name))} ({persona.key}).[/]"
        )
        await self._say_served_by(persona)
        if greeting is not None and self.interactive:
            self._show_turn(greeting)

    def _cmd_personas(self, _: str) -> None:
        for persona in self.chat.personas.all():
            self.out.print(f"{persona.key:<12} {escape(for_terminal(persona.name))}")

    async def _cmd_history(self, arg: str) -> None:
        try:
            limit = int(arg) if arg else 20
        except ValueError:
            self._error("usage: /history [N]")
            return
        turns = await self.chat.history(self.channel, limit=max(limit, 1))
        if not turns:
            self.out.print("[dim](no turns yet)[/]")
        for turn in turns:
            self._show_turn(turn)

    async def _cmd_retry(self, _: str) -> None:
        if (scene := await self.scene.current()) is not None:
            await self._guard(self.scene.retry(scene))
            return
        last = await self.chat.last_turn(self.channel)
        if last is None:
            self._error("nothing to retry yet")
            return
        # The last reply stays until its new version is stored: a retry the server fails
        # costs nothing.
        redo = last if last.role == "assistant" else None
        await self._reply(
            self.chat.respond(
                self.channel, self.options.sampling, user_name=self.options.user_name, redo=redo
            ),
            failed=f"retry failed, {RETRY_KEPT}: " if redo is not None else "",
        )

    async def _cmd_approve(self, _: str) -> None:
        """Approve the persona's last reply for training, as "Approve for training" does on
        Discord: the reply and the turns before it become a training dialogue."""
        persona = await self.chat.require_persona(self.channel)
        recent = await self.chat.memory.recent_turns(self.channel, persona.key, limit=50)
        reply = next((t for t in recent if t.role == "assistant"), None)
        if reply is None or not any(t.role == "user" and t.id < reply.id for t in recent):
            self._error("no reply to approve yet: approve a reply to something you said")
            return
        try:
            dialogue, new = await self.approvals.approve(
                reply, by=self._speaker().id, guild_id=None
            )
        except RolecastError as exc:
            self._error(str(exc))
            return
        total = await self.chat.memory.count_dialogues(persona.key)
        if new:
            self.err.print(
                f"Approved for training: this reply and the {len(dialogue.messages) - 1} turns "
                f"before it. {persona.key} now has {total} approved dialogues "
                f"(`rolecast retrain --persona {persona.key}` trains on them).",
                markup=False,
            )
        else:
            self.err.print(
                f"Already approved. {persona.key} has {total} approved dialogues.", markup=False
            )

    def _cmd_set(self, arg: str) -> None:
        key, sep, value = arg.partition("=")
        if not sep:
            self._error(f"usage: /set KEY=VALUE; now {self.options.sampling.model_dump()}")
            return
        given = {key.strip(): None if value.strip().lower() == "none" else value.strip()}
        try:
            self.options.sampling = sampling_with(self.options.sampling, given)
        except ValueError as exc:
            self._error(str(exc))
            return
        self.err.print(f"[dim]{key.strip()} = {getattr(self.options.sampling, key.strip())}[/]")

    async def _cmd_reset(self, _: str) -> None:
        count = await self.chat.memory.count_turns(self.channel)
        self.err.print(
            f"Delete all {count} turns of session {self.options.session!r}? [y/N] ",
            end="",
            markup=False,
        )
        assert self._lines is not None
        answer = await anext(self._lines, None)
        if (answer or "").strip().lower() not in ("y", "yes"):
            self.err.print("[dim]Kept.[/]")
            return
        deleted = await self.chat.reset(self.channel)
        self.err.print(f"[dim]Deleted {deleted} turns.[/]")
        if await self.scene.current() is not None:
            for hello in await self.chat.greetings(self.channel, user_name=self.options.user_name):
                if self.interactive:
                    self._show_turn(hello)
            return
        persona = await self.chat.require_persona(self.channel)
        greeting = await self.chat.set_persona(
            self.channel, persona.key, user_name=self.options.user_name
        )
        if greeting is not None and self.interactive:
            self._show_turn(greeting)

    def _cmd_help(self, _: str) -> None:
        self.out.print(HELP, highlight=False, markup=False)
        self.out.print(SCENE_HELP, highlight=False, markup=False)


async def run_chat(settings: BotSettings, options: ChatOptions) -> int:
    """Open every resource, chat until the input ends, close everything. Returns the exit code."""
    interactive = sys.stdin.isatty()
    # soft_wrap: long lines are the terminal's to wrap, so scripts read whole messages.
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    personas = PersonaRegistry(settings.user_personas).load()
    for problem in personas.problems:
        err.print(f"[yellow]warning:[/] {escape(for_terminal(str(problem)))}")
    for key in (options.persona, *options.cast):
        if key is not None:
            personas.get(key)  # an unknown name fails before the server starts

    async with AsyncExitStack() as stack:
        url = settings.server_url
        if url is None:
            server = embedded_server(settings)
            err.print(f"[dim]Starting the embedded model server on {server.url} …[/]")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await stack.enter_async_context(server)
            err.print(f"[dim]Model server ready in {loop.time() - started:.1f} s.[/]")
            url = server.base_url
        memory = await stack.enter_async_context(Memory.open(settings.database))
        client = await stack.enter_async_context(ModelClient.from_settings(settings, url))
        chat = ChatService(memory, personas, client)
        stack.push_async_callback(chat.aclose)
        approvals = Approvals(
            memory,
            context_turns=settings.discord.dialogue_turns,
            threshold=settings.discord.approval_threshold,
        )
        keyboard = None
        if interactive:
            keyboard = await stack.enter_async_context(
                Keyboard(
                    out,
                    PROMPT,
                    lambda: err.print("\n[dim]Ctrl-C again or Ctrl-D leaves.[/]"),
                    lambda number, at: not_utf8(out, number, at),
                )
            )
        session = TerminalChat(
            chat,
            options,
            interactive=interactive,
            out=out,
            err=err,
            approvals=approvals,
            keyboard=keyboard,
        )
        try:
            return await session.run()
        except ModelServerError as exc:
            err.print(f"[red]error:[/] {escape(for_terminal(str(exc)))}")
            return 1
