"""The generation engine: one background thread that runs a step loop over a batch of requests,
each with its own LoRA adapter (or none), admitting new requests as others finish.

What transformers ships was the first choice: `transformers serve` loads one model per name and
has no LoRA adapters at all (no PEFT, no load/unload routes), so it cannot serve personas.

Why a scheduler of our own: transformers' continuous-batching manager (`generate_batch`,
`init_continuous_batching`) packs every request of a step into one row of one sequence for its
paged-attention kernels, so a forward pass sees a batch of 1. PEFT's mixed-adapter inference
(`adapter_names=[...]`) picks the adapter per row of dimension 0, so it cannot tell the requests
in such a packed row apart, and the manager takes no per-request adapter either. Here each
request keeps its own row: left-padded prompts are prefilled together, their KV cache rows are
merged into the running batch, every decode step is one forward pass for all rows with
`adapter_names`, and finished or cancelled rows are dropped between steps.

The event loop never runs model code: requests go in through a lock-guarded queue and their
outputs come back through `loop.call_soon_threadsafe` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serving.detokenize import IncrementalText
from serving.errors import BadRequestError, ModelNotFoundError, NotFoundError, ServerBusyError
from serving.metrics import EngineMetrics
from serving.models import LoadedModel
from serving.sampling import RowState, SamplingParams, make_generator, sample

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class RequestOutput:
    """New text of one request since its last output, and how it ended if it did."""

    text: str
    finished: bool = False
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
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Seq:
    """A request while it holds a row of the running batch."""

    request: Request
    row: RowState
    text: IncrementalText
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None


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
        self._base: Any = loaded.model
        self._peft: Any = None  # a PeftModel around _base once an adapter is loaded
        self._device = torch.device(loaded.device)
        self._threads = torch.get_num_threads()  # as sized by the caller; re-applied in _run
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad_id = int(pad if pad is not None else 0)

        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: deque[Callable[[], None]] = deque()
        self._adapters: dict[str, str] = {}  # loaded adapter name -> path
        self._pending_loads: set[str] = set()
        self._retiring: dict[str, Future[None]] = {}  # unloading once their requests finish
        self._inflight: Counter[str] = Counter()  # adapter -> requests waiting or running
        self._stopping = False
        self._thread: threading.Thread | None = None

        # Batch state, touched only by the engine thread.
        self._running: list[_Seq] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cached tokens], 1 = real token
        self._next: torch.Tensor | None = None  # [batch], sampled but not yet fed

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
            if name is not None and (name not in self._adapters or name in self._retiring):
                raise ModelNotFoundError(name)
            free_slots = max(0, self.max_num_seqs - len(self._running))
            if len(self._waiting) >= self.max_waiting + free_slots:
                raise ServerBusyError(
                    f"The server is busy: {len(self._waiting)} requests are already waiting "
                    f"for one of {self.max_num_seqs} batch slots. Retry later."
                )
            self._waiting.append(request)
            if name is not None:
                self._inflight[name] += 1
            self._set_queue_gauges()
            self._lock.notify_all()

    def _abort(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self._release(request)
            self._lock.notify_all()

    def _release(self, request: Request) -> None:
        """Mark a request as done; the caller holds the lock."""
        if request.done:
            return
        request.done = True
        if request.adapter is not None:
            self._inflight[request.adapter] -= 1
        self._set_queue_gauges()

    def _set_queue_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.waiting.set(len(self._waiting))
            self.metrics.running.set(len(self._running))
            self.metrics.set_lora_requests(
                len(self._adapters),
                {r.adapter for r in self._waiting if r.adapter},
                {s.request.adapter for s in self._running if s.request.adapter},
            )

    # --- adapters ---------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """Adapters that new requests may use: name -> path."""
        with self._lock:
            return {n: p for n, p in self._adapters.items() if n not in self._retiring}

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter under `name`, between two steps of the running batch."""
        with self._lock:
            if name in self._adapters or name in self._pending_loads:
                raise BadRequestError(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True."
                )
            self._pending_loads.add(name)
        done: Future[None] = Future()

        def command() -> None:
            try:
                self._load_adapter(name, path)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        try:
            self._command(command)
            await asyncio.wrap_future(done)
        finally:
            with self._lock:
                self._pending_loads.discard(name)

    async def unload_adapter(self, name: str) -> None:
        """Stop admitting requests for `name`, let its running and waiting requests finish,
        then remove its weights. Returns once it is gone."""
        with self._lock:
            if name not in self._adapters or name in self._retiring:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
            done: Future[None] = Future()
            self._retiring[name] = done
            self._lock.notify_all()
        await asyncio.wrap_future(done)

    def _command(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
            self._lock.notify_all()

    def _load_adapter(self, name: str, path: str) -> None:
        """Engine thread: check and load an adapter. Raises BadRequestError for a bad one."""
        from peft import PeftConfig, PeftModel

        adapter_dir = Path(path)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise BadRequestError(
                f"Loading lora {name} failed: No adapter found for {path}", param="lora_path"
            )
        try:
            config = PeftConfig.from_pretrained(path)
        except Exception as exc:
            raise BadRequestError(f"Loading lora {name} failed: {exc}", param="lora_path") from exc
        problem = lora_config_problem(config, self.max_lora_rank)
        if problem:
            raise BadRequestError(f"Loading lora {name} failed: {problem}", param="lora_path")
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise BadRequestError(
                f"Loading lora {name} failed: no adapter_model.safetensors in {path}",
                param="lora_path",
            )
        try:
            # Read the header before PEFT touches the model: a first adapter that fails inside
            # PeftModel.from_pretrained would leave LoRA layers in the base without a handle.
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("it holds no tensors")
        except Exception as exc:
            raise BadRequestError(
                f"Loading lora {name} failed: {weights.name} is unreadable: {exc}",
                param="lora_path",
            ) from exc
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._base, path, adapter_name=name, is_trainable=False
                )
            else:
                self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self._peft.eval()
        except Exception as exc:
            log.warning("loading adapter %s from %s failed: %s", name, path, exc)
            if self._peft is not None and name in self._peft.peft_config:
                self._delete_adapter(name)
            raise BadRequestError(f"Loading lora {name} failed: {exc}", param="lora_path") from exc
        with self._lock:
            self._adapters[name] = path
        log.info("loaded LoRA adapter %s from %s", name, path)

    def _delete_adapter(self, name: str) -> None:
        if self._peft is None:
            return
        if list(self._peft.peft_config) == [name]:
            # The last adapter: take the LoRA layers out again so the base runs as it did.
            self._base = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)

    def _finish_drained(self) -> None:
        """Engine thread: remove retiring adapters that have no request left."""
        with self._lock:
            ready = [n for n in self._retiring if self._inflight[n] <= 0]
        for name in ready:
            try:
                self._delete_adapter(name)
            except Exception as exc:  # keep serving the others
                log.exception("removing adapter %s failed", name)
                with self._lock:
                    self._retiring.pop(name).set_exception(exc)
                continue
            with self._lock:
                self._adapters.pop(name, None)
                self._inflight.pop(name, None)
                self._retiring.pop(name).set_result(None)
            log.info("unloaded LoRA adapter %s", name)

    # --- the step loop ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        drained = any(self._inflight[n] <= 0 for n in self._retiring)
        return bool(self._stopping or self._waiting or self._running or self._commands or drained)

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
                    free = self.max_num_seqs - len(self._running)
                    while self._waiting and len(admitted) < free:
                        admitted.append(self._waiting.popleft())
                    self._set_queue_gauges()
                for command in commands:
                    command()
                try:
                    self._drop_cancelled()
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._decode()
                except Exception as exc:
                    log.exception("generation step failed; failing the requests in the batch")
                    self._fail_all([s.request for s in self._running] + admitted, exc)
                self._finish_drained()
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._waiting) + [s.request for s in self._running]
            self._waiting.clear()
        self._fail_all(pending, ServerBusyError("The server is shutting down."))
        with self._lock:
            for name, done in list(self._retiring.items()):
                done.set_result(None)
                self._retiring.pop(name)

    def _fail_all(self, requests: list[Request], exc: BaseException) -> None:
        self._reset_batch()
        with self._lock:
            for request in requests:
                if not request.done:
                    self._release(request)
                    request.emit(exc)

    def _reset_batch(self) -> None:
        self._running = []
        self._cache = self._mask = self._next = None

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        adapters: list[str | None],
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        model = self._base
        if self._peft is not None:
            model = self._peft
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _prefill(self, requests: list[Request]) -> None:
        live = [r for r in requests if not r.cancelled]
        with self._lock:
            for r in requests:
                if r.cancelled:
                    self._release(r)
        if not live:
            return
        width = max(len(r.prompt_ids) for r in live)
        ids = torch.full((len(live), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for i, r in enumerate(live):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in live])
        seqs = [
            _Seq(
                request=r,
                row=RowState(
                    params=r.params,
                    seen_ids=torch.tensor(r.prompt_ids, dtype=torch.long, device=self._device),
                    generator=make_generator(r.params.seed, self._device),
                ),
                text=IncrementalText(self.loaded.tokenizer, r.params.stop),
            )
            for r in live
        ]
        tokens = sample(logits, [s.row for s in seqs])
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in live))
        first = len(self._running)
        self._merge(seqs, cache, mask, tokens)
        self._accept(tokens, first)

    def _merge(
        self, seqs: list[_Seq], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever side has
        the shorter cache so that every row ends at the same column."""
        if not self._running or self._cache is None or self._mask is None or self._next is None:
            self._running = list(seqs)
            self._cache, self._mask, self._next = cache, mask, tokens
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t: torch.Tensor, length: int, dim_from_end: int) -> torch.Tensor:
            if length == width:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [width - length, 0]
            return F.pad(t, spec)

        layers = []
        old: Any
        new: Any
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys = torch.cat([pad(old.keys, old_len, 2), pad(new.keys, new_len, 2)])
            values = torch.cat([pad(old.values, old_len, 2), pad(new.values, new_len, 2)])
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([pad(self._mask, old_len, 1), pad(mask, new_len, 1)])
        self._next = torch.cat([self._next, tokens])
        self._running.extend(seqs)
        with self._lock:
            self._set_queue_gauges()

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None and self._next is not None
        batch = len(self._running)
        ones = torch.ones((batch, 1), dtype=self._mask.dtype, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        positions = self._mask.sum(-1, keepdim=True) - 1
        logits = self._forward(
            self._next[:, None],
            self._mask,
            positions,
            self._cache,
            [s.request.adapter for s in self._running],
        )
        tokens = sample(logits, [s.row for s in self._running])
        self._next = tokens
        self._accept(tokens, 0)

    def _accept(self, tokens: torch.Tensor, first: int) -> None:
        """Record the tokens sampled for rows `first..`, send their text, retire finished rows."""
        now = time.monotonic()
        finished: list[int] = []
        accepted = 0
        eos_ids = self.loaded.eos_token_ids
        max_len = self.loaded.max_model_len
        for offset, token in enumerate(tokens.tolist()):
            index = first + offset
            seq = self._running[index]
            request, params = seq.request, seq.row.params
            if request.cancelled:
                continue
            seq.output_ids.append(token)
            accepted += 1
            if params.repetition_penalty != 1.0:
                seq.row.seen_ids = torch.cat([seq.row.seen_ids, tokens[offset : offset + 1]])
            if seq.first_token_at is None:
                seq.first_token_at = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - request.arrival)
            n_out = len(seq.output_ids)
            reason: str | None = None
            if token in eos_ids and not params.ignore_eos and n_out >= params.min_tokens:
                reason = "stop"
                text = seq.text.update(seq.output_ids[:-1]) + seq.text.flush()
            else:
                text = seq.text.update(seq.output_ids)
                if seq.text.stopped_by is not None:
                    reason = "stop"
                elif n_out >= params.max_tokens or len(request.prompt_ids) + n_out >= max_len:
                    reason = "length"
                    text += seq.text.flush()
            if reason is None:
                if text:
                    request.emit(RequestOutput(text=text))
                continue
            finished.append(index)
            request.emit(
                RequestOutput(
                    text=text,
                    finished=True,
                    finish_reason=reason,
                    stop_reason=seq.text.stopped_by,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=n_out,
                )
            )
            if self.metrics is not None:
                self.metrics.e2e.observe(now - request.arrival)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(accepted)
        if finished:
            with self._lock:
                for index in finished:
                    self._release(self._running[index].request)
            self._keep([i for i in range(len(self._running)) if i not in set(finished)])

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, s in enumerate(self._running) if s.request.cancelled]
        if not cancelled:
            return
        with self._lock:
            for index in cancelled:
                self._release(self._running[index].request)
        gone = set(cancelled)
        self._keep([i for i in range(len(self._running)) if i not in gone])

    def _keep(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, then cut the padding columns no row needs any more."""
        if not rows:
            self._reset_batch()
            with self._lock:
                self._set_queue_gauges()
            return
        assert self._cache is not None and self._mask is not None and self._next is not None
        index = torch.tensor(rows, device=self._device)
        self._running = [self._running[i] for i in rows]
        mask = self._mask.index_select(0, index)
        used = mask.any(dim=0)
        start = int(used.to(torch.int8).argmax()) if bool(used.any()) else 0
        self._mask = mask[:, start:]
        layer: Any
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
        self._next = self._next.index_select(0, index)
        with self._lock:
            self._set_queue_gauges()


def lora_config_problem(config: Any, max_rank: int) -> str | None:
    """Why an adapter config cannot be served (vLLM's limits), or None when it can."""
    peft_type = str(getattr(config, "peft_type", ""))
    if peft_type.rsplit(".", 1)[-1].upper() != "LORA":
        return f"peft_type is {peft_type or 'missing'}, only LORA adapters can be served"
    rank = max([int(config.r), *(int(v) for v in (config.rank_pattern or {}).values())])
    if rank > max_rank:
        return f"LoRA rank {rank} is greater than max_lora_rank {max_rank}."
    if getattr(config, "use_dora", False):
        return "DoRA adapters (use_dora=true) are not supported"
    if getattr(config, "modules_to_save", None):
        return f"modules_to_save is not supported (found {list(config.modules_to_save)})"
    return None
