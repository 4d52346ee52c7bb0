"""The engine's LoRA adapters: loading, serving and retiring them between two steps of the batch.

An adapter is loaded by the engine thread (PEFT wraps the base model on the first one), checked
first against the servable-LoRA rule (`formats.lora`, the same rule the publisher applies), and
served under its name until it is retired: a retiring adapter takes no new request, and its
weights are removed once the requests that use it have finished (`finish_drained`). The last
adapter to go takes PEFT's LoRA layers out again, so the base runs as it did before any.

The bookkeeping (which names are loaded, pending, retiring, and how many requests use each) is
shared with the event loop under the engine's lock; model code runs only on the engine thread.

A served name is the client's text: inside PEFT each adapter has a name of the server's own
(`lora1`, `lora2`, ...), since PEFT's names are module keys (no dots, no attribute names of a
module) and `__base__` means "no adapter" in a mixed batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from formats import lora
from serving.errors import BadRequestError, NotFoundError

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIXED = "<mixed>"  # PEFT's layers all enabled, the adapter picked per row
_UNKNOWN = "<unknown>"  # after a load or a removal: set the layers again before the next pass


def mixed_batch_problems(config: dict[str, Any]) -> list[str]:
    """What keeps an adapter out of this server's mixed-adapter batches: PEFT applies LoRA on
    parameters (gpt-oss's fused experts, `target_parameters`) to the whole batch, with no
    per-row adapter, so such adapters are served by vLLM only."""
    targets = config.get("target_parameters")
    if not targets:
        return []
    return [
        f"it adapts parameters ({', '.join(targets)}), which PEFT cannot apply per row of a "
        "mixed-adapter batch: serve it with vLLM (`rolecast serve --engine vllm`)"
    ]


class Adapters:
    """The loaded adapters of one base model, and the model a forward pass runs."""

    def __init__(self, base: Any, lock: threading.Condition, *, max_lora_rank: int) -> None:
        self.lock = lock
        self.max_lora_rank = max_lora_rank
        self._base: Any = base
        self._peft: Any = None  # a PeftModel around _base once an adapter is loaded
        self.loaded: dict[str, str] = {}  # loaded adapter name -> path
        self.pending: set[str] = set()
        self.retiring: dict[str, Future[None]] = {}  # unloading once their requests finish
        self.inflight: Counter[str] = Counter()  # adapter -> requests waiting or running
        self._layers = _UNKNOWN  # what PEFT's layers are set for: an adapter, the base, MIXED
        self._peft_names: dict[str, str] = {}  # served name -> PEFT's (engine thread only)
        self._ids = itertools.count(1)

    # --- any thread, with the lock held ---------------------------------------------------

    def servable(self) -> dict[str, str]:
        """Adapters that new requests may use: name -> path."""
        return {n: p for n, p in self.loaded.items() if n not in self.retiring}

    def admits(self, name: str) -> bool:
        return name in self.loaded and name not in self.retiring

    def reserve(self, name: str) -> None:
        """Claim `name` for a load about to run; an error if it is taken."""
        if name in self.loaded or name in self.pending:
            raise BadRequestError(
                f"The lora adapter '{name}' has already been loaded. If you want to load "
                "the adapter in place, set 'load_inplace' to True."
            )
        self.pending.add(name)

    def retire(self, name: str) -> Future[None]:
        """Stop admitting requests for `name`; the future is done once its weights are gone."""
        if name not in self.loaded or name in self.retiring:
            raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
        done: Future[None] = Future()
        self.retiring[name] = done
        return done

    def drained(self) -> bool:
        """Whether a retiring adapter has no request left (the engine thread has work)."""
        return any(self.inflight[n] <= 0 for n in self.retiring)

    # --- engine thread --------------------------------------------------------------------

    def model(self, adapters: list[str | None]) -> tuple[Any, dict[str, Any]]:
        """The model for a forward pass over rows with these adapters, and its extra kwargs.

        Rows that all use one adapter (or all the base), the usual case of a chat, run with
        that adapter active, or with the LoRA layers off: PEFT's per-row path (`adapter_names`)
        gathers and scatters the rows in every LoRA layer even then, which made a decode step of
        the default model with the shipped adapter about a quarter slower on a CPU."""
        if self._peft is None:
            return self._base, {}
        names = [self._peft_names[a] if a else BASE_ADAPTER for a in adapters]
        if len(set(names)) == 1:
            self._set_layers(names[0])
            return self._peft, {}
        self._set_layers(MIXED)
        return self._peft, {"adapter_names": names}

    def _set_layers(self, target: str) -> None:
        """Set PEFT's LoRA layers for `target` (an adapter, BASE_ADAPTER or MIXED). Each change
        walks every LoRA layer of the model, so it is made only when the target changes."""
        if target == self._layers:
            return
        tuner = self._peft.base_model
        if target == BASE_ADAPTER:
            tuner.disable_adapter_layers()
        else:
            if self._layers in (BASE_ADAPTER, _UNKNOWN):
                tuner.enable_adapter_layers()
            if target != MIXED:  # a mixed batch names each row's adapter itself
                self._peft.set_adapter(target)
        self._layers = target

    def load(self, name: str, path: str) -> None:
        """Check and load an adapter. Raises BadRequestError for one that cannot be served."""
        from peft import PeftConfig, PeftModel

        adapter_dir = Path(path)
        if not (adapter_dir / lora.CONFIG).is_file():
            raise BadRequestError(
                f"Loading lora {name} failed: No adapter found for {path}", param="lora_path"
            )
        try:
            PeftConfig.from_pretrained(path)
        except Exception as exc:
            raise BadRequestError(f"Loading lora {name} failed: {exc}", param="lora_path") from exc
        # the base's dimensions, so a mismatched adapter is refused with its shapes named
        config: Any = getattr(self._base, "config", None)
        base_config = config.to_dict() if hasattr(config, "to_dict") else None
        problems = lora.problems(adapter_dir, max_rank=self.max_lora_rank, base_config=base_config)
        problems += mixed_batch_problems(lora.read_config(adapter_dir))
        if problems:
            raise BadRequestError(
                f"Loading lora {name} failed: {'; '.join(problems)}", param="lora_path"
            )
        weights = adapter_dir / lora.WEIGHTS
        peft_name = f"lora{next(self._ids)}"
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
                    self._base, path, adapter_name=peft_name, is_trainable=False
                )
            else:
                self._peft.load_adapter(path, adapter_name=peft_name, is_trainable=False)
            self._peft.eval()
            self._layers = _UNKNOWN
        except Exception as exc:
            log.warning("loading adapter %s from %s failed: %s", name, path, exc)
            if self._peft is not None and peft_name in self._peft.peft_config:
                self._delete_peft(peft_name)
            raise BadRequestError(f"Loading lora {name} failed: {exc}", param="lora_path") from exc
        broken = self._non_finite(peft_name)
        if broken:
            self._delete_peft(peft_name)
            raise BadRequestError(
                f"Loading lora {name} failed: {weights.name} holds values that are not finite "
                f"(NaN or infinity) in {', '.join(broken[:3])}",
                param="lora_path",
            )
        self._peft_names[name] = peft_name
        with self.lock:
            self.loaded[name] = path
        log.info("loaded LoRA adapter %s from %s", name, path)

    def _non_finite(self, peft_name: str) -> list[str]:
        """The adapter's weights that hold NaN or infinity: every reply through them would be
        garbage, so such an adapter is refused rather than served."""
        import torch

        marker = f".{peft_name}."
        return [
            n.replace(marker, ".")
            for n, p in self._peft.named_parameters()
            if marker in n and not bool(torch.isfinite(p).all())
        ]

    def _delete(self, name: str) -> None:
        peft_name = self._peft_names.get(name)
        if peft_name is not None:
            self._delete_peft(peft_name)
        self._peft_names.pop(name, None)

    def _delete_peft(self, peft_name: str) -> None:
        if self._peft is None:
            return
        self._layers = _UNKNOWN
        if list(self._peft.peft_config) == [peft_name]:
            # The last adapter: take the LoRA layers out again so the base runs as it did.
            self._base = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(peft_name)

    def finish_drained(self) -> None:
        """Remove retiring adapters that have no request left."""
        with self.lock:
            ready = [n for n in self.retiring if self.inflight[n] <= 0]
        for name in ready:
            try:
                self._delete(name)
            except Exception as exc:  # keep serving the others
                log.exception("removing adapter %s failed", name)
                with self.lock:
                    self.retiring.pop(name).set_exception(exc)
                continue
            with self.lock:
                self.loaded.pop(name, None)
                self.inflight.pop(name, None)
                self.retiring.pop(name).set_result(None)
            log.info("unloaded LoRA adapter %s", name)

    def release_retiring(self) -> None:
        """On shutdown: whoever waits for an unload stops waiting. The caller holds the lock."""
        for name, done in list(self.retiring.items()):
            done.set_result(None)
            self.retiring.pop(name)
