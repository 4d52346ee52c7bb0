"""The adapter registry: versions, the typed pointer and its atomic switch, the way back to the
base model, and the readers' view of files that cannot be read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from formats.errors import RegistryError
from formats.registry import AdapterRegistry, Pointer, parse_served_name, served_name
from tests.adapters import fake_lora


def fake_adapter(path: Path, rank: int = 8, **manifest: object) -> Path:
    return fake_lora(path, r=rank, manifest=manifest or None)


def test_pointer_round_trips_through_its_file(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    for n in (1, 2):
        version = registry.add_version("haruhi", fake_adapter(tmp_path / f"a{n}", seed=n))
        registry.set_current("haruhi", version.version)
    path = tmp_path / "reg" / "haruhi" / "current.json"
    on_disk = json.loads(path.read_text())
    pointer = registry.pointer("haruhi")
    assert pointer == Pointer.model_validate(on_disk)
    assert pointer is not None and pointer.model_dump(mode="json") == on_disk
    assert (pointer.version, pointer.served_name, pointer.history) == (2, "haruhi@v2", [1, 2])
    # a key that a newer publisher wrote does not stop this one from reading the pointer
    path.write_text(json.dumps({**on_disk, "switched_by": "admin"}))
    assert registry.current_served_name("haruhi") == "haruhi@v2"


def test_versions_carry_their_manifest_and_the_registrys_keys(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    source = fake_adapter(tmp_path / "src", rank=16, persona="whoever", custom={"kept": True})
    added = registry.add_version("xin", source)
    (listed,) = registry.versions("xin")
    assert listed == added and listed.served_name == "xin@v1" and listed.rank == 16
    manifest = listed.manifest
    assert (manifest.persona, manifest.version, manifest.served_name) == ("xin", 1, "xin@v1")
    assert manifest.base_model == "org/base" and manifest.rank == 16 and manifest.created
    assert manifest.model_extra == {"custom": {"kept": True}}
    assert json.loads((source / "rolecast.json").read_text())["persona"] == "whoever"  # a copy


def test_rollback_from_the_first_version_is_the_base_model(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    v1 = registry.add_version("atri", fake_adapter(tmp_path / "src1"))
    registry.set_current("atri", v1.version)
    assert registry.previous("atri") is None
    registry.clear_current("atri")
    assert registry.pointer("atri") is None and registry.current("atri") is None
    assert registry.current_served_name("atri") is None and registry.knows("atri")
    assert not registry.knows("xin")
    with pytest.raises(RegistryError, match="atri has no published adapter"):
        registry.previous("atri")
    again = registry.add_version("atri", fake_adapter(tmp_path / "src2"))
    assert again.served_name == "atri@v2"  # v1's name is never used for other weights


def test_unreadable_files_are_errors_for_writers_and_base_for_readers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = AdapterRegistry(tmp_path)
    registry.add_version("haruhi", fake_adapter(tmp_path / "src"))
    (tmp_path / "haruhi" / "current.json").write_text('{"version": "two"')
    with pytest.raises(RegistryError, match="not a valid pointer"):
        registry.current("haruhi")
    with caplog.at_level(logging.WARNING, logger="formats.registry"):
        assert registry.current_served_name("haruhi") is None  # the bot answers on the base
    assert "not a valid pointer" in caplog.text
    (tmp_path / "haruhi" / "v1" / "rolecast.json").write_text("[]")
    assert registry.versions("haruhi")[0].manifest.version is None  # listed, manifest unread
    with pytest.raises(RegistryError, match="lower-case"):
        registry.versions("../etc")
    assert registry.current_served_name("../etc") is None and not registry.knows("../etc")


def test_served_names() -> None:
    assert served_name("haruhi", 3) == "haruhi@v3"
    assert parse_served_name("haruhi@v3") == ("haruhi", 3)
    assert parse_served_name("my-persona@v12") == ("my-persona", 12)
    for other in ("SmolLM2-135M-Instruct", "haruhi@v0", "haruhi@vx", "@v1"):
        assert parse_served_name(other) is None


def test_a_version_takes_neither_tokenizer_files_nor_checkpoints(tmp_path: Path) -> None:
    source = fake_adapter(tmp_path / "run", rank=8, persona="haruhi")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (source / name).write_text("{}")
    (source / "checkpoints" / "step-2").mkdir(parents=True)
    (source / "checkpoints" / "step-2" / "state.json").write_text("{}")
    (source / "loss.png").write_bytes(b"png")

    version = AdapterRegistry(tmp_path / "registry").add_version("haruhi", source)

    names = {p.name for p in version.path.iterdir()}
    assert names == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "rolecast.json",
        "loss.png",
    }
    assert (source / "tokenizer.json").is_file()  # the source is left as it was
