"""The generation engine: admission and scheduling. One background thread runs a step loop over
a batch of requests, each with its own LoRA adapter (or none), admitting new requests as others
finish.

What transformers ships was the first choice: `transformers serve` loads one model per name and
has no LoRA adapters at all (no PEFT, no load/unload routes), so it cannot serve personas.

Why a scheduler of our own: transformers' continuous-batching manager (`generate_batch`,
`init_continuous_batching`) packs every request of a step into one row of one sequence for its
paged-attention kernels, so a forward pass sees a batch of 1. PEFT's mixed-adapter inference
(`adapter_names=[...]`) picks the adapter per row of dimension 0, so it cannot tell the requests
in such a packed row apart, and the manager takes no per-request adapter either. Here each
request keeps its own row.

Three modules, as vLLM keeps its scheduler, LoRA manager and model runner apart: this one admits
requests (a bounded queue; HTTP 429 beyond it) and schedules each step (commands, admission,
prefill, decode, retiring drained adapters); `serving.adapters` loads and retires adapters;
`serving.batch` holds the running batch and its KV cache.

The event loop never runs model code: requests go in through a lock-guarded queue and their
outputs come back through `loop.call_soon_threadsafe` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from concurrent.futures import Future
from contextlib import aclosing

import torch

from serving.adapters import Adapters
from serving.batch import RunningBatch
from serving.errors import ModelNotFoundError, ServerBusyError
from serving.metrics import EngineMetrics
from serving.models import LoadedModel
from serving.request import Request, RequestOutput
from serving.sampling import SamplingParams

log = logging.getLogger(__name__)


class Engine:
    """Generates for many requests at once on one model, with per-request LoRA adapters."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_num_seqs: int = 16,
        max_waiting: int = 64,
        max_lora_rank: int = 64,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.loaded = loaded
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.max_lora_rank = max_lora_rank
        self.metrics = metrics
        self._threads = torch.get_num_threads()  # as sized by the caller; re-applied in _run

        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: deque[Callable[[], None]] = deque()
        self._adapters = Adapters(loaded.model, self._lock, max_lora_rank=max_lora_rank)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Touched only by the engine thread.
        self._batch = RunningBatch(loaded, self._adapters.model, metrics)

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rolecast-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # --- requests ---------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request now (a full queue or an unknown adapter raises here, before any
        response has started); read its outputs with `outputs`."""
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            adapter=adapter,
            params=params,
            loop=asyncio.get_running_loop(),
        )
        self._submit(request)
        return request

    async def outputs(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        """Yield a submitted request's outputs as they are generated. Closing the iterator early
        (a client that went away) cancels the request at the next step."""
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not request.done:
                self._abort(request)

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """`submit` and `outputs` in one."""
        request = self.submit(prompt_ids, params, adapter=adapter, request_id=request_id)
        async with aclosing(self.outputs(request)) as outputs:
            async for out in outputs:
                yield out

    def _submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping:
                raise ServerBusyError("The server is shutting down.")
            name = request.adapter
            if name is not None and not self._adapters.admits(name):
                raise ModelNotFoundError(name)
            free_slots = max(0, self.max_num_seqs - len(self._batch))
            if len(self._waiting) >= self.max_waiting + free_slots:
                raise ServerBusyError(
                    f"The server is busy: {len(self._waiting)} requests are already waiting "
                    f"for one of {self.max_num_seqs} batch slots. Retry later."
                )
            self._waiting.append(request)
            if name is not None:
                self._adapters.inflight[name] += 1
            self._set_queue_gauges()
            self._lock.notify_all()

    def _abort(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._release_locked(request)
            self._lock.notify_all()

    def _release(self, requests: Iterable[Request]) -> None:
        """Mark requests as done (they left the batch or never entered it)."""
        with self._lock:
            for request in requests:
                self._release_locked(request)
            self._set_queue_gauges()

    def _release_locked(self, request: Request) -> None:
        """Mark a request as done; the caller holds the lock."""
        if request.done:
            return
        request.done = True
        if request.adapter is not None:
            self._adapters.inflight[request.adapter] -= 1
        self._set_queue_gauges()

    def _set_queue_gauges(self) -> None:
        if self.metrics is not None:
            running = self._batch.requests()
            self.metrics.waiting.set(len(self._waiting))
            self.metrics.running.set(len(running))
            self.metrics.set_lora_requests(
                len(self._adapters.loaded),
                {r.adapter for r in self._waiting if r.adapter},
                {r.adapter for r in running if r.adapter},
            )

    # --- adapters ---------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """Adapters that new requests may use: name -> path."""
        with self._lock:
            return self._adapters.servable()

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter under `name`, between two steps of the running batch."""
        with self._lock:
            self._adapters.reserve(name)
        done: Future[None] = Future()

        def command() -> None:
            try:
                self._adapters.load(name, path)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        try:
            self._command(command)
            await asyncio.wrap_future(done)
        finally:
            with self._lock:
                self._adapters.pending.discard(name)

    async def unload_adapter(self, name: str) -> None:
        """Stop admitting requests for `name`, let its running and waiting requests finish,
        then remove its weights. Returns once it is gone."""
        with self._lock:
            done = self._adapters.retire(name)
            self._lock.notify_all()
        await asyncio.wrap_future(done)

    def _command(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
            self._lock.notify_all()

    # --- the step loop ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(
            self._stopping
            or self._waiting
            or len(self._batch)
            or self._commands
            or self._adapters.drained()
        )

    def _run(self) -> None:
        torch.set_num_threads(self._threads)  # OpenMP sizes its pool per calling thread
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._has_work():
                        self._lock.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                    admitted: list[Request] = []
                    free = self.max_num_seqs - len(self._batch)
                    while self._waiting and len(admitted) < free:
                        admitted.append(self._waiting.popleft())
                    self._set_queue_gauges()
                for command in commands:
                    command()
                try:
                    self._release(self._batch.drop_cancelled())
                    if admitted:
                        self._prefill(admitted)
                    if len(self._batch):
                        self._release(self._batch.decode())
                except Exception as exc:
                    log.exception("generation step failed; failing the requests in the batch")
                    self._fail_all(self._batch.requests() + admitted, exc)
                self._adapters.finish_drained()
            self._shutdown()

    def _prefill(self, admitted: list[Request]) -> None:
        self._release(r for r in admitted if r.cancelled)
        finished = self._batch.prefill([r for r in admitted if not r.cancelled])
        self._release(finished)  # also brings the gauges up to date with the merged rows

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._waiting) + self._batch.requests()
            self._waiting.clear()
        self._fail_all(pending, ServerBusyError("The server is shutting down."))
        with self._lock:
            self._adapters.release_retiring()

    def _fail_all(self, requests: list[Request], exc: BaseException) -> None:
        self._batch.reset()
        with self._lock:
            for request in requests:
                if not request.done:
                    self._release_locked(request)
                    request.emit(exc)
