"""Publishing and rolling back adapters on a running server (vLLM or the embedded one) without
failing a request: load the new served name, switch the persona's pointer, wait until no request
runs or waits on the old name, then unload it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.registry import AdapterRegistry, AdapterVersion, RegistryError, validate_adapter

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    persona: str
    new: AdapterVersion
    old: AdapterVersion | None
    unloaded: bool


class ServerClient:
    """The few admin calls publishing needs, over the OpenAI-compatible server's HTTP API."""

    def __init__(self, url: str, http: httpx.Client) -> None:
        self.root = url.rstrip("/").removesuffix("/v1")
        self.http = http

    def models(self) -> list[dict[str, object]]:
        response = self.http.get(f"{self.root}/v1/models")
        response.raise_for_status()
        return list(response.json()["data"])

    def base_model(self) -> str:
        for card in self.models():
            if not card.get("parent"):
                return str(card.get("root") or card["id"])
        raise RegistryError(f"{self.root} lists no base model")

    def loaded(self) -> set[str]:
        return {str(c["id"]) for c in self.models() if c.get("parent")}

    def _post(self, path: str, body: dict[str, str], what: str) -> None:
        response = self.http.post(f"{self.root}{path}", json=body, timeout=None)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text
            raise RegistryError(f"the server refused to {what}: {message}")

    def load(self, name: str, path: Path) -> None:
        self._post(
            "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, f"load {name}"
        )

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name}, f"unload {name}")

    def busy_adapters(self) -> set[str]:
        """Adapters with running or waiting requests, from vLLM's `vllm:lora_requests_info`."""
        text = self.http.get(f"{self.root}/metrics").text
        busy: set[str] = set()
        for line in text.splitlines():
            if not line.startswith("vllm:lora_requests_info{"):
                continue
            labels = line[line.index("{") + 1 : line.rindex("}")]
            for part in labels.split('",'):
                key, _, value = part.partition("=")
                if key.strip() in ("running_lora_adapters", "waiting_lora_adapters"):
                    busy.update(n for n in value.strip('"').split(",") if n)
        return busy

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
        server: ServerClient | None,
        *,
        max_rank: int,
        base_model: str | None = None,
        drain_timeout: float = 300.0,
    ) -> None:
        self.registry = registry
        self.server = server
        self.max_rank = max_rank
        self.base_model = base_model
        self.drain_timeout = drain_timeout

    def publish(self, persona: str, source: Path) -> PublishResult:
        base = self.base_model
        if base is None and self.server is not None:
            base = self.server.base_model()
        if base is None and (current := self.registry.current(persona)) is not None:
            base = current.manifest.get("base_model")
        problems = validate_adapter(source, base_model=base, max_rank=self.max_rank)
        if problems:
            raise RegistryError(
                f"cannot publish {source} for {persona}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        old = self.registry.current(persona)
        new = self.registry.add_version(persona, source)
        if self.server is not None:
            try:
                self.server.load(new.served_name, new.path)
            except RegistryError:
                # never served: drop the copy so the registry lists only usable versions
                import shutil

                shutil.rmtree(new.path, ignore_errors=True)
                raise
        self.registry.set_current(persona, new.version)
        log.warning("%s now speaks through %s", persona, new.served_name)
        unloaded = self._retire(old)
        return PublishResult(persona, new, old, unloaded)

    def rollback(self, persona: str) -> PublishResult:
        current = self.registry.current(persona)
        if current is None:
            raise RegistryError(f"{persona} has no published adapter")
        previous = self.registry.previous(persona)
        if self.server is not None and previous.served_name not in self.server.loaded():
            self.server.load(previous.served_name, previous.path)
        self.registry.set_current(persona, previous.version, rollback=True)
        log.warning("%s rolled back to %s", persona, previous.served_name)
        unloaded = self._retire(current)
        return PublishResult(persona, previous, current, unloaded)

    def _retire(self, old: AdapterVersion | None) -> bool:
        if old is None or self.server is None:
            return False
        if old.served_name not in self.server.loaded():
            return False
        if not self.server.wait_drained(old.served_name, self.drain_timeout):
            log.warning(
                "%s still had requests after %.0f s; unloading anyway",
                old.served_name,
                self.drain_timeout,
            )
        self.server.unload(old.served_name)
        return True
