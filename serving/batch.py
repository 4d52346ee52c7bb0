"""The running batch and its KV cache: one row per request, each with its own adapter.

Left-padded prompts are prefilled together, their KV cache rows are merged into the running
batch, every decode step is one forward pass for all rows (with PEFT's per-row
`adapter_names`), each row's token is sampled with its own parameters, its text is sent on, and
finished or cancelled rows are dropped between steps, cutting the padding columns no row needs
any more. Only the engine thread touches a batch; the requests it finishes are returned so that
the engine can do their bookkeeping under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serving.detokenize import IncrementalText
from serving.harmony import HarmonyText
from serving.metrics import EngineMetrics
from serving.models import LoadedModel
from serving.request import Request, RequestOutput
from serving.sampling import RowState, make_generator, sample

#: (adapter of each row) -> (model to run, extra forward kwargs); see `serving.adapters`.
ModelFor = Callable[[list[str | None]], tuple[Any, dict[str, Any]]]


@dataclass
class _Seq:
    """A request while it holds a row of the running batch."""

    request: Request
    row: RowState
    text: IncrementalText | HarmonyText
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None


class RunningBatch:
    """The rows generating together, their KV cache, mask and next input tokens."""

    def __init__(
        self, loaded: LoadedModel, model_for: ModelFor, metrics: EngineMetrics | None = None
    ) -> None:
        self.loaded = loaded
        self.model_for = model_for
        self.metrics = metrics
        self._device = torch.device(loaded.device)
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad_id = int(pad if pad is not None else 0)
        self._running: list[_Seq] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cached tokens], 1 = real token
        self._next: torch.Tensor | None = None  # [batch], sampled but not yet fed

    def __len__(self) -> int:
        return len(self._running)

    def requests(self) -> list[Request]:
        return [s.request for s in self._running]

    def reset(self) -> None:
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
        model, kwargs = self.model_for(adapters)
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

    def prefill(self, live: list[Request]) -> list[Request]:
        """Prefill `live` requests and add them to the batch; returns those already finished."""
        if not live:
            return []
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
                text=(HarmonyText if self.loaded.harmony else IncrementalText)(
                    self.loaded.tokenizer, r.params.stop
                ),
            )
            for r in live
        ]
        tokens = sample(logits, [s.row for s in seqs])
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in live))
        first = len(self._running)
        self._merge(seqs, cache, mask, tokens)
        return self._accept(tokens, first)

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

    def decode(self) -> list[Request]:
        """One step for every row; returns the requests that finished."""
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
        return self._accept(tokens, 0)

    def _accept(self, tokens: torch.Tensor, first: int) -> list[Request]:
        """Record the tokens sampled for rows `first..`, send their text, drop finished rows."""
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
            reasoning = seq.text.take_reasoning() if isinstance(seq.text, HarmonyText) else ""
            if reason is None:
                if text or reasoning:
                    request.emit(RequestOutput(text=text, reasoning=reasoning))
                continue
            finished.append(index)
            request.emit(
                RequestOutput(
                    text=text,
                    reasoning=reasoning,
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
        if not finished:
            return []
        done = [self._running[i].request for i in finished]
        gone = set(finished)
        self._keep([i for i in range(len(self._running)) if i not in gone])
        return done

    def drop_cancelled(self) -> list[Request]:
        """Drop the rows of cancelled requests; returns those requests."""
        cancelled = [i for i, s in enumerate(self._running) if s.request.cancelled]
        if not cancelled:
            return []
        dropped = [self._running[i].request for i in cancelled]
        gone = set(cancelled)
        self._keep([i for i in range(len(self._running)) if i not in gone])
        return dropped

    def _keep(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, then cut the padding columns no row needs any more."""
        if not rows:
            self.reset()
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
