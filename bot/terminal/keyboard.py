"""The interactive prompt of `rolecast chat`: lines typed at the keyboard, and Ctrl-C.

Lines are read on a daemon thread, one per prompt, so the event loop goes on (a streamed reply,
background token counts) while the user types, and leaving never waits on an `input()` that
blocks. Ctrl-C is handled on the event loop (`loop.add_signal_handler`): during a reply it stops
that reply and the chat goes on; at the prompt, the first one says how to leave and a second in
a row leaves, as Ctrl-D does (a Ctrl-C that stopped a reply counts as the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

from rich.console import Console

from bot.core.text import first_surrogate

_EOF = object()  # Ctrl-D, or stdin closed
_INTERRUPT = object()  # Ctrl-C at the prompt


class _Undecodable:
    """A typed line that is not valid UTF-8: where the first bad character is."""

    def __init__(self, at: int) -> None:
        self.at = at


class Keyboard:
    """The prompt's lines and Ctrl-C, for one interactive chat (`async with`)."""

    def __init__(
        self,
        console: Console,
        prompt: str,
        hint: Callable[[], None],
        bad_line: Callable[[int, int], None] = lambda number, at: None,
    ) -> None:
        self.console = console
        self.prompt = prompt
        self.hint = hint  # says how to leave, after a first Ctrl-C at the prompt
        self.bad_line = bad_line  # reports line `number`, not UTF-8 from character `at` on
        self.armed = False  # the last thing the user did was a Ctrl-C: another one leaves
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._asked = False  # a prompt is out, its line not read yet
        self._waiting: asyncio.Future[Any] | None = None
        self._unread: deque[Any] = deque()
        self._reply: asyncio.Future[None] | None = None
        self._stopping = False
        self._handled = False

    async def __aenter__(self) -> Keyboard:
        self._loop = asyncio.get_running_loop()
        try:
            self._loop.add_signal_handler(signal.SIGINT, self._interrupt)
            self._handled = True
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here: default
            self._handled = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handled and self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGINT)

    async def lines(self) -> AsyncIterator[str | None]:
        """Each line typed, until Ctrl-D or a second Ctrl-C in a row; None for a line that was
        not valid UTF-8 (reported through `bad_line`, never stored)."""
        number = 0
        while True:
            event = await self._read()
            if event is _EOF:
                return
            if event is _INTERRUPT:
                if self.armed:
                    return
                self.armed = True
                self.hint()
                self.console.print(self.prompt, end="")
                continue
            self.armed = False
            number += 1
            # a terminal in a non-UTF-8 locale hands undecodable bytes over as surrogates
            at = event.at if isinstance(event, _Undecodable) else first_surrogate(str(event))
            if at is not None:
                self.bad_line(number, at)
                yield None
                continue
            yield str(event)

    async def reply(self, work: Awaitable[None]) -> bool:
        """Run one reply; True when Ctrl-C stopped it (the chat goes on)."""
        task = asyncio.ensure_future(work)
        self._reply = task
        try:
            await task
            return False
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stopping and (current is None or current.cancelling() == 0):
                self.armed = True
                return True
            raise
        finally:
            self._reply = None
            self._stopping = False

    def _interrupt(self) -> None:
        if self._reply is not None and not self._reply.done():
            self._stopping = True
            self._reply.cancel()
        elif self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(_INTERRUPT)
        else:  # between two reads (a command running): the next read sees it
            self._unread.append(_INTERRUPT)

    async def _read(self) -> Any:
        if self._unread:
            return self._unread.popleft()
        assert self._loop is not None
        self._waiting = self._loop.create_future()
        if not self._asked:
            self._asked = True
            self._requests.put(self.prompt)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._read_lines, name="chat-keyboard", daemon=True
                )
                self._thread.start()
        try:
            return await self._waiting
        finally:
            self._waiting = None

    def _read_lines(self) -> None:
        """The thread: one line per prompt asked for."""
        assert self._loop is not None
        while True:
            prompt = self._requests.get()
            try:
                value: Any = self.console.input(prompt)
            except UnicodeDecodeError as exc:
                value = _Undecodable(exc.start)
            except (EOFError, OSError, ValueError):
                value = _EOF
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                self._loop.call_soon_threadsafe(self._deliver, value)
            if value is _EOF:
                return

    def _deliver(self, value: Any) -> None:
        self._asked = False
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(value)
        else:
            self._unread.append(value)
