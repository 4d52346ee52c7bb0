"""Fair use of the model: one generation at a time per channel, in arrival order, and a
per-person cooldown.

`ChannelQueue.slot(key)` is an async context manager; waiters get the slot in the order they
asked (asyncio locks are FIFO). `depth()` is what `/status` shows: jobs waiting or running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class ChannelQueue:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._jobs: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._jobs[key] = self._jobs.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._jobs[key] -= 1
            if not self._jobs[key]:
                # Nobody holds or waits for this lock any more: forget it.
                del self._jobs[key]
                self._locks.pop(key, None)

    def depth(self, key: str | None = None) -> int:
        """Jobs waiting or running, for one channel or in total."""
        if key is not None:
            return self._jobs.get(key, 0)
        return sum(self._jobs.values())

    def busy_channels(self) -> int:
        return len(self._jobs)


class Cooldown:
    """At most one trigger per `seconds` per key (a person); `hit` says how long to wait."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: dict[str, float] = {}

    def hit(self, key: str) -> float:
        """0.0 and record the trigger if allowed; otherwise the seconds left to wait."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.seconds:
            return self.seconds - (now - last)
        self._last[key] = now
        if len(self._last) > 10_000:  # keep memory bounded on a busy bot
            cutoff = now - self.seconds
            self._last = {k: t for k, t in self._last.items() if t > cutoff}
        return 0.0
