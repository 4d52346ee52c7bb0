"""Publishing and rolling back adapters on running servers (vLLM or the embedded one) without
failing a request: load the new served name, switch the persona's pointer in the registry
(`formats.registry`), wait until no request runs or waits on the old name, then unload it.

With no server to tell, only the registry's files change; a server loads the current versions
when it starts. Which servers to tell is the CLI's choice (`serving.cli`, `serving.discovery`).

Nothing is added to the registry before the adapter passed the servable-LoRA rule
(`formats.lora.problems`), its weights included: the safetensors header is read and every
tensor's name, rank, dtype and shape checked against the adapter's config and the base model's
`config.json` (`base_config`), so corrupt or mismatched weights are refused with their reasons
before a version number is spent on them.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from formats import basemodel, lora
from formats.errors import FormatError, RegistryError
from formats.jsonfile import read_object
from formats.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    persona: str
    new: AdapterVersion | None  # None: back on the base model (or the shipped adapter)
    old: AdapterVersion | None
    unloaded: bool
    servers: list[str] = field(default_factory=list)  # the servers that were told
    unpublished: str = "the base model"  # what the persona speaks through with no version

    @property
    def new_name(self) -> str:
        return self.new.served_name if self.new is not None else self.unpublished

    @property
    def old_name(self) -> str:
        return self.old.served_name if self.old is not None else self.unpublished


def lora_busy_adapters(metrics_text: str) -> set[str]:
    """The adapters with running or waiting requests in `vllm:lora_requests_info`.

    vLLM sets this gauge to the current time under labels that list the busy adapters, and never
    removes a label set it used before: every past state stays in the text, each with the time it
    was last current. The state now is the sample with the latest time. vLLM writes it after it
    has processed each batch's outputs, so once an adapter's last request is finished the newest
    sample no longer names it, with or without other traffic."""
    latest: tuple[float, set[str]] | None = None
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:lora_requests_info{") or "}" not in line:
            continue
        labels, _, value = line.rpartition("}")
        try:
            stamp = float(value.split()[0])
        except (IndexError, ValueError):
            continue
        busy: set[str] = set()
        for key, names in re.findall(r'(\w+)="([^"]*)"', labels):
            if key in ("running_lora_adapters", "waiting_lora_adapters"):
                busy.update(n for n in names.split(",") if n)
        if latest is None or stamp >= latest[0]:
            latest = (stamp, busy)
    return latest[1] if latest else set()


class ServerClient:
    """The few admin calls publishing needs, over the OpenAI-compatible server's HTTP API."""

    def __init__(self, url: str, http: httpx.Client) -> None:
        self.root = url.rstrip("/").removesuffix("/v1")
        self.http = http

    def health(self) -> bool:
        try:
            return self.http.get(f"{self.root}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict[str, object]]:
        try:
            response = self.http.get(f"{self.root}/v1/models")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise RegistryError(f"the model server at {self.root} did not answer: {exc}") from exc
        try:
            cards = response.json()["data"]
            if not (isinstance(cards, list) and all(isinstance(c, dict) for c in cards)):
                raise TypeError("data is not a list of objects")
            if not all(isinstance(c.get("id"), str) for c in cards):
                raise TypeError("a model has no id")
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(
                f"the model server at {self.root} answered /v1/models with something else than "
                f"a model list ({exc})"
            ) from None
        return cards

    def base_model(self) -> str:
        for card in self.models():
            if not card.get("parent"):
                return str(card.get("root") or card["id"])
        raise RegistryError(f"{self.root} lists no base model")

    def loaded(self) -> set[str]:
        return {str(c["id"]) for c in self.models() if c.get("parent")}

    def _post(self, path: str, body: dict[str, str], what: str) -> None:
        try:
            response = self.http.post(f"{self.root}{path}", json=body, timeout=None)
        except httpx.HTTPError as exc:
            raise RegistryError(f"the model server at {self.root} did not answer: {exc}") from exc
        if response.status_code != 200:
            try:
                message = str(response.json()["error"]["message"])
            except Exception:
                message = response.text
            raise RegistryError(f"the server at {self.root} refused to {what}: {message[:500]}")

    def load(self, name: str, path: Path) -> None:
        self._post(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, f"load {name}"
        )

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"unload {name}")

    def busy_adapters(self) -> set[str]:
        """Adapters with running or waiting requests, from vLLM's `vllm:lora_requests_info`."""
        try:
            text = self.http.get(f"{self.root}/metrics").text
        except httpx.HTTPError as exc:
            raise RegistryError(f"the model server at {self.root} did not answer: {exc}") from exc
        return lora_busy_adapters(text)

    def wait_drained(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while name in self.busy_adapters():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


class Publisher:
    def __init__(
        self,
        registry: AdapterRegistry,
        servers: Sequence[ServerClient] = (),
        *,
        max_rank: int,
        base_model: str | None = None,
        drain_timeout: float = 300.0,
        cache_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.servers = list(servers)
        self.max_rank = max_rank
        self.base_model = base_model
        self.drain_timeout = drain_timeout
        self.cache_dir = cache_dir

    def _current(self, persona: str) -> AdapterVersion | None:
        """The live version, or None with a warning when the persona's pointer is broken (the
        publish then repairs it)."""
        try:
            return self.registry.current(persona)
        except RegistryError as exc:
            log.warning("%s; publishing replaces it", exc)
            return None

    def publish(self, persona: str, source: Path) -> PublishResult:
        self.registry.check_writable(persona)
        old = self._current(persona)
        base = self.base_model
        if base is None and self.servers:
            base = self.servers[0].base_model()
        if base is None and old is not None:
            base = old.manifest.base_model
        try:
            claimed = lora.trained_base(source)
        except FormatError:
            claimed = None  # lora.problems says why
        config = base_config(base or claimed, self.cache_dir)
        if config is None:
            log.warning(
                "the base model's config.json was not found (%s): the weights are checked "
                "against the adapter's own config only",
                base or claimed or "no base model named",
            )
        problems = lora.problems(
            source, max_rank=self.max_rank, base_model=base, base_config=config
        )
        if problems:
            raise RegistryError(
                f"cannot publish {source} for {persona}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        new = self.registry.add_version(persona, source)
        loaded: list[ServerClient] = []
        try:
            for server in self.servers:
                server.load(new.served_name, new.path)
                loaded.append(server)
            self.registry.set_current(persona, new.version)
        except BaseException:
            # never live: drop it from the servers and the registry, which lists only versions
            # that were usable, and keeps pointing at the old one
            self._unload_quietly(loaded, new.served_name)
            shutil.rmtree(new.path, ignore_errors=True)
            raise
        log.warning("%s now speaks through %s", persona, new.served_name)
        # the switch is done: what follows is tidying up, and a server failing at it from now
        # on is a warning, never a publish that failed (it took effect)
        unloaded = self._retire(old)
        servers = [s.root for s in self.servers]
        fallback = self._unpublished(persona, self._loaded_quietly() if old is None else [])
        return PublishResult(persona, new, old, unloaded, servers, fallback)

    @staticmethod
    def _unload_quietly(servers: Sequence[ServerClient], name: str) -> None:
        for server in servers:
            try:
                server.unload(name)
            except RegistryError as exc:
                log.warning("%s", exc)

    def _loaded_quietly(self) -> list[set[str]]:
        """Each server's loaded adapters, an empty set for one that does not answer (logged)."""
        found = []
        for server in self.servers:
            try:
                found.append(server.loaded())
            except RegistryError as exc:
                log.warning("%s", exc)
                found.append(set())
        return found

    def rollback(self, persona: str) -> PublishResult:
        """Back to the version published before the live one; from the first version, back to
        the base model (the pointer is removed)."""
        current = self.registry.current(persona)
        if current is None:
            raise RegistryError(f"{persona} has no published adapter")
        previous = self.registry.previous(persona)
        if previous is not None:
            # its files may have been deleted or damaged since it was live: never point at a
            # version that cannot be served
            problems = lora.problems(
                previous.path, max_rank=self.max_rank, base_model=self.base_model
            )
            if problems:
                raise RegistryError(
                    f"cannot roll {persona} back to {previous.served_name}; it stays on "
                    f"{current.served_name}:\n" + "\n".join(f"  - {p}" for p in problems)
                )
        loaded = [server.loaded() for server in self.servers]  # each answers before any change
        if previous is None:
            self.registry.clear_current(persona)
        else:
            added: list[ServerClient] = []
            try:
                for server, names in zip(self.servers, loaded, strict=True):
                    if previous.served_name not in names:
                        server.load(previous.served_name, previous.path)
                        added.append(server)
                self.registry.set_current(persona, previous.version, rollback=True)
            except BaseException:
                self._unload_quietly(added, previous.served_name)
                raise
        servers = [s.root for s in self.servers]
        fallback = self._unpublished(persona, loaded)
        result = PublishResult(persona, previous, current, False, servers, fallback)
        log.warning("%s rolled back to %s", persona, result.new_name)
        result.unloaded = self._retire(current)
        return result

    def _unpublished(self, persona: str, loaded: Sequence[set[str]]) -> str:
        """What `persona` speaks through with no published version: the base model, or for a
        shipped persona the shipped adapter where the servers told (`loaded`: their adapters)
        run it; with no server told, both cases are named."""
        if persona not in basemodel.shipped_personas():
            return "the base model"
        shipped = f"the adapter that ships for the default model ({basemodel.SHIPPED_NAME})"
        if not self.servers:
            return f"{shipped} on a server running the default model, else the base model"
        return (
            shipped
            if any(basemodel.SHIPPED_NAME in names for names in loaded)
            else "the base model"
        )

    def _retire(self, old: AdapterVersion | None) -> bool:
        """Unload `old` from every server that has it, once its requests have finished; a server
        that fails at it keeps `old` loaded (logged), which serves nobody once the pointer moved."""
        if old is None:
            return False
        unloaded = False
        for server in self.servers:
            try:
                if old.served_name not in server.loaded():
                    continue
                if not server.wait_drained(old.served_name, self.drain_timeout):
                    log.warning(
                        "%s still had requests on %s after %.0f s; unloading anyway",
                        old.served_name,
                        server.root,
                        self.drain_timeout,
                    )
                server.unload(old.served_name)
                unloaded = True
            except RegistryError as exc:  # the switch stands; the old version stays loaded
                log.warning("%s; %s stays loaded there", exc, old.served_name)
        return unloaded


def base_config(model: str | None, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The `config.json` of a base model named as a server or a manifest names it: the default
    model's converted checkpoint, a local directory, or a hub id already in the local Hugging
    Face cache (nothing is downloaded). None when it is not found or cannot be read."""
    if not model:
        return None
    if basemodel.is_default(model) or lora.same_base(model, basemodel.HUB_ID):
        folder: Path | None = basemodel.checkpoint_dir(cache_dir)
    else:
        folder = Path(model).expanduser()
    path: Path | None = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a hub id, or no hub library: nothing more to find
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return None
    try:
        return read_object(path)
    except ValueError as exc:
        log.warning("the base model's config.json cannot be read: %s", exc)
        return None
