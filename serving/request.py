"""One generation request as the engine carries it, and what it sends back.

A request is created on the event loop (`Engine.submit`), waits in the engine's queue, holds a
row of the running batch while it generates (`serving.batch`), and hands its outputs back to
the event loop through its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from serving.sampling import SamplingParams


@dataclass
class RequestOutput:
    """New text of one request since its last output, and how it ended if it did."""

    text: str
    finished: bool = False
    reasoning: str = ""  # a harmony model's analysis channel (`serving.harmony`), never the reply
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False

    def emit(self, item: RequestOutput | BaseException) -> None:
        """Hand an output (or the error that ends it) to the request's event loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
