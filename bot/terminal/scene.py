"""Scenes in `rolecast chat`: several `--persona` flags make the session a scene.

Each line is heard as on Discord (`ChatService.hear`): the personas it names answer, each
once, in the order it names them; a line that names nobody gets one answer, from the persona
handed the turn (`/next NAME`) or the next in turn (`/turns keywords` picks by the card's
keywords instead). A reply that names another persona hands it the turn, up to the session's
chain limit (`/turns ... N`, default 2). Replies are shown one after another under each
persona's name; scripted, each is one line `Name: reply`.

`TerminalScene` holds what the session's chat (`bot.terminal.chat`) needs for this: its own
commands, and the `Stage` the director (`bot.core.director`) shows replies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.markup import escape

from bot.core.chat import Reply
from bot.core.director import Director
from bot.core.memory import Turn
from bot.core.personas import Persona
from bot.core.scene import MAX_CHAIN_LIMIT, POLICIES, Scene
from bot.core.text import for_terminal
from bot.errors import InputTooLongError, RolecastError
from bot.settings import sampling_with

if TYPE_CHECKING:
    from bot.terminal.chat import TerminalChat

SCENE_HELP = """Scene (several --persona flags):
  /cast             the personas of this session and how they take turns
  /next NAME        NAME answers the next line that names nobody
  /turns [round-robin|keywords] [N]
                    who answers a line that names nobody; N bot turns in a row at most
  /sampling NAME KEY=VALUE   sampling of one persona (as /set)"""
# /retry replaces a reply only once the new one is stored: a retry that fails says this.
RETRY_KEPT = "the previous reply is kept"


class _Performance:
    """One persona's reply in the terminal: streamed after its name, or one scripted line."""

    def __init__(self, session: TerminalChat, persona: Persona) -> None:
        self.session = session
        self.persona = persona
        self.shown = ""

    def _name(self) -> str:
        return for_terminal(" ".join(self.persona.name.split()))

    async def feed(self, delta: str) -> None:
        if not self.session.interactive:
            return  # scripted: the whole reply goes on one line at the end
        if not self.shown:
            self.session.out.print(f"[bold magenta]{escape(self._name())}>[/] ", end="")
        self.shown += delta
        self.session._write(delta)

    async def finish(self, text: str, note: str | None) -> Sequence[str]:
        if not self.session.interactive:
            self.session._write(f"{self._name()}: {text.replace(chr(10), ' ')}\n")
            if note:
                self.session.err.print(f"[dim]\\[{note}][/]", highlight=False)
            return ()
        if not self.shown:
            self.session.out.print(f"[bold magenta]{escape(self._name())}>[/] ", end="")
            self.session._write(text)
        self.session._write("\n")
        if note:
            self.session.out.print(f"[dim]\\[{note}][/]")
        return ()

    async def cut(self, note: str) -> Sequence[str]:
        return ()  # a terminal scene is never interrupted: the next line waits for it


class _Stage:
    def __init__(self, session: TerminalChat, turn: Turn, *, redo: Turn | None = None) -> None:
        self.session = session
        self.turn = turn  # the line being answered
        self.redo = redo  # the reply written again (/retry), kept until a new one is stored

    def perform(self, persona: Persona) -> _Performance:
        return _Performance(self.session, persona)

    async def replied(self, persona: Persona, reply: Reply) -> None:
        if self.session.interactive:
            self.session._figures(reply)

    async def failed(self, persona: Persona, error: Exception) -> None:
        if not isinstance(error, RolecastError):
            raise error
        if isinstance(error, InputTooLongError):
            # the line can never be answered; keeping it would only block the history
            await self.session.chat.memory.delete_turn(self.turn.id)
        self.session.failures += 1
        retry = f"retry failed, {RETRY_KEPT}: " if self.redo is not None else ""
        self.session._error(f"{retry}{persona.name}: {error}")


class TerminalScene:
    """The scene side of a terminal chat session."""

    def __init__(self, session: TerminalChat) -> None:
        self.session = session

    @property
    def channel(self) -> str:
        return self.session.channel

    def commands(self) -> dict[str, Callable[[str], object]]:
        return {
            "/cast": self._cmd_cast,
            "/next": self._cmd_next,
            "/turns": self._cmd_turns,
            "/sampling": self._cmd_sampling,
        }

    async def current(self) -> Scene | None:
        """The session's scene, or None when it has one persona."""
        scene = await self.session.chat.scene(self.channel)
        return scene if scene.is_scene else None

    async def start(self, keys: Sequence[str] = ()) -> None:
        """Gather the cast, in this order (or go on with the session's); show who answers
        through what."""
        chat = self.session.chat
        greetings = (
            await chat.set_cast(self.channel, keys, user_name=self.session.options.user_name)
            if keys
            else []
        )
        scene = await chat.scene(self.channel)
        for persona in scene.members:
            await self.session._say_served_by(persona)
        if self.session.interactive:
            count = await chat.memory.count_turns(self.channel)
            names = ", ".join(escape(for_terminal(p.name)) for p in scene.members)
            self.session.out.print(
                f"[dim]A scene with [bold]{names}[/] in session "
                f"{self.session.options.session!r}; {count} turn{'s' * (count != 1)} "
                "remembered. Name a persona to talk to it; /help for commands.[/]"
            )
            for greeting in greetings:
                self.session._show_turn(greeting)

    def _director(self, scene: Scene, turn: Turn, *, redo: Turn | None = None) -> Director:
        base = self.session.options.sampling
        return Director(
            self.session.chat,
            self.channel,
            scene,
            _Stage(self.session, turn, redo=redo),
            sampling=lambda persona: scene.sampling_for(persona, base),
            user_name=self.session.options.user_name,
        )

    async def say(self, scene: Scene, text: str) -> None:
        """One line of the member's: stored, then answered by whom it addresses."""
        heard = await self.session.chat.hear(
            self.channel, text, self.session._speaker(), scene, answer=True
        )
        if heard is None:
            raise RolecastError("Empty message: nothing to send.")
        await self._director(scene, heard.turn).play(heard.turn, heard.answering)

    async def retry(self, scene: Scene) -> None:
        """Ask again for the newest reply (or for one to the newest line), from the persona
        that gave it (or was asked); one reply, no chain after it."""
        memory = self.session.chat.memory
        last = await self.session.chat.last_turn(self.channel)
        if last is None:
            raise RolecastError("nothing to retry yet")
        persona = scene.member(last.persona)
        if persona is None:
            raise RolecastError(f"{last.persona} is not in this scene any more")
        asked, redo = last, None
        if last.role == "assistant":
            redo = last  # deleted when the new reply is stored, not before
            if last.prompted_by is not None:
                asked = await memory.turn(last.prompted_by) or last
        director = self._director(replace(scene, chain_limit=0), asked, redo=redo)
        await director.play(asked, [persona], redo=redo)

    # -- commands ----------------------------------------------------------------------------

    async def _scene(self) -> Scene | None:
        scene = await self.current()
        if scene is None:
            self.session._error("this session has one persona: start it with several --persona")
        return scene

    async def _cmd_cast(self, _: str) -> None:
        scene = await self._scene()
        if scene is None:
            return
        out = self.session.out
        for persona in scene.members:
            own = scene.sampling.get(persona.key)
            extra = f"  ({', '.join(f'{k}={v}' for k, v in sorted(own.items()))})" if own else ""
            out.print(f"{persona.key:<12} {escape(for_terminal(persona.name))}{escape(extra)}")
        handed = scene.member(scene.next_persona)
        out.print(
            f"[dim]lines that name nobody: {scene.policy}"
            + (f" (next: {escape(for_terminal(handed.name))})" if handed else "")
            + f"; at most {scene.chain_limit} bot turns in a row[/]"
        )

    async def _cmd_next(self, arg: str) -> None:
        scene = await self._scene()
        if scene is None:
            return
        persona = scene.named(arg) if arg else None
        if persona is None:
            known = ", ".join(p.key for p in scene.members)
            self.session._error(f"usage: /next NAME, one of: {known}")
            return
        await self.session.chat.memory.set_next_persona(self.channel, persona.key)
        self.session.err.print(
            f"[dim]{escape(for_terminal(persona.name))} answers the next line that names nobody.[/]"
        )

    async def _cmd_turns(self, arg: str) -> None:
        scene = await self._scene()
        if scene is None:
            return
        policy, limit = scene.policy, scene.chain_limit
        for word in arg.split():
            if word in POLICIES:
                policy = word  # type: ignore[assignment]
            elif word.isascii() and word.isdigit() and int(word) <= MAX_CHAIN_LIMIT:
                limit = int(word)
            else:
                self.session._error(f"usage: /turns [{'|'.join(POLICIES)}] [0-{MAX_CHAIN_LIMIT}]")
                return
        await self.session.chat.memory.set_turn_policy(self.channel, policy, limit)
        await self._cmd_cast("")

    async def _cmd_sampling(self, arg: str) -> None:
        scene = await self._scene()
        if scene is None:
            return
        name, _, setting = arg.partition(" ")
        persona = scene.named(name) if name else None
        key, sep, value = setting.partition("=")
        if persona is None or not sep:
            self.session._error("usage: /sampling NAME KEY=VALUE")
            return
        own = dict(scene.sampling.get(persona.key, {}))
        own[key.strip()] = None if value.strip().lower() == "none" else value.strip()
        try:
            checked = sampling_with(self.session.options.sampling, own)
        except ValueError as exc:
            self.session._error(str(exc))
            return
        kept = {k: getattr(checked, k) for k in own}
        await self.session.chat.memory.set_cast_sampling(self.channel, persona.key, kept)
        self.session.err.print(
            f"[dim]{escape(for_terminal(persona.name))}: {key.strip()} = "
            f"{getattr(checked, key.strip())}[/]"
        )
