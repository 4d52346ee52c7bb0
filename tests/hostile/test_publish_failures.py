"""Publishing and rolling back when a server or the registry's files fail part-way: the registry
never points at a version no server could load, a version that was never live is not left
behind, and once the pointer has switched, a server that will not unload the old version (or
stops answering) no longer turns a publish that took effect into an error. No real server: a
stand-in for the few admin calls publishing makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from formats.errors import RegistryError
from formats.registry import AdapterRegistry
from serving.publish import Publisher, ServerClient
from tests.adapters import fake_lora


class StandIn(ServerClient):
    """A model server's admin calls, answered from memory; `fail` names the calls that fail."""

    def __init__(self, fail: set[str] | None = None, loaded: set[str] | None = None) -> None:
        super().__init__("http://stand-in:1", httpx.Client())
        self.fail = fail or set()
        self.adapters = set(loaded or ())

    def _check(self, call: str) -> None:
        if call in self.fail:
            raise RegistryError(f"the server at {self.root} refused to {call}")

    def base_model(self) -> str:
        return "org/base"

    def loaded(self) -> set[str]:
        self._check("list")
        return set(self.adapters)

    def load(self, name: str, path: Path) -> None:
        self._check("load")
        self.adapters.add(name)

    def unload(self, name: str) -> None:
        self._check("unload")
        self.adapters.discard(name)

    def busy_adapters(self) -> set[str]:
        self._check("metrics")
        return set()


def publisher(root: Path, *servers: ServerClient) -> Publisher:
    return Publisher(AdapterRegistry(root), servers, max_rank=64)


def two_versions(tmp_path: Path) -> AdapterRegistry:
    """haruhi published twice: v2 live, v1 before it."""
    root = tmp_path / "reg"
    for n in (1, 2):
        publisher(root).publish("haruhi", fake_lora(tmp_path / f"a{n}", manifest={"n": n}))
    return AdapterRegistry(root)


@pytest.mark.parametrize("failing", ["unload", "metrics", "list"])
def test_a_publish_that_switched_stands_when_retiring_the_old_version_fails(
    failing: str, tmp_path: Path
) -> None:
    registry = two_versions(tmp_path)
    server = StandIn(loaded={"haruhi@v2"})
    server.fail = {failing}
    if failing == "list":  # the server stops answering its model list after the load
        server.fail = set()
        original = server.load

        def load_then_break(name: str, path: Path) -> None:
            original(name, path)
            server.fail = {"list"}

        server.load = load_then_break  # type: ignore[method-assign]
    result = publisher(registry.root, server).publish("haruhi", fake_lora(tmp_path / "a3"))
    assert result.new is not None and result.new.served_name == "haruhi@v3"
    assert registry.current_served_name("haruhi") == "haruhi@v3"
    assert "haruhi@v3" in server.adapters and result.unloaded is False


def test_a_pointer_that_cannot_be_written_leaves_no_loaded_or_listed_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = two_versions(tmp_path)
    server = StandIn(loaded={"haruhi@v2"})

    def disk_full(*args: object, **kwargs: object) -> None:
        raise RegistryError("cannot write current.json: No space left on device")

    monkeypatch.setattr(AdapterRegistry, "set_current", disk_full)
    with pytest.raises(RegistryError, match="No space left"):
        publisher(registry.root, server).publish("haruhi", fake_lora(tmp_path / "a3"))
    assert registry.current_served_name("haruhi") == "haruhi@v2"
    assert [v.version for v in registry.versions("haruhi")] == [1, 2]
    assert server.adapters == {"haruhi@v2"}


@pytest.mark.parametrize("servers", [0, 1])
@pytest.mark.parametrize("deleted", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_rollback_to_a_version_whose_files_were_deleted_changes_nothing(
    servers: int, deleted: str, tmp_path: Path
) -> None:
    registry = two_versions(tmp_path)
    (registry.root / "haruhi" / "v1" / deleted).unlink()
    stand_ins = [StandIn(loaded={"haruhi@v2"}) for _ in range(servers)]
    with pytest.raises(RegistryError, match=r"cannot roll haruhi back to haruhi@v1"):
        publisher(registry.root, *stand_ins).rollback("haruhi")
    pointer = registry.pointer("haruhi")
    assert pointer is not None and (pointer.version, pointer.history) == (2, [1, 2])
    assert all(s.adapters == {"haruhi@v2"} for s in stand_ins)


def test_a_rollback_to_a_version_folder_that_is_gone_changes_nothing(tmp_path: Path) -> None:
    registry = two_versions(tmp_path)
    shutil.rmtree(registry.root / "haruhi" / "v1")
    with pytest.raises(RegistryError, match="previous version v1 is missing"):
        publisher(registry.root).rollback("haruhi")
    assert registry.current_served_name("haruhi") == "haruhi@v2"


def test_a_rollback_that_switched_stands_when_retiring_fails(tmp_path: Path) -> None:
    registry = two_versions(tmp_path)
    server = StandIn(loaded={"haruhi@v1", "haruhi@v2"}, fail={"unload"})
    result = publisher(registry.root, server).rollback("haruhi")
    assert result.new is not None and result.new.served_name == "haruhi@v1"
    assert registry.current_served_name("haruhi") == "haruhi@v1" and result.unloaded is False
