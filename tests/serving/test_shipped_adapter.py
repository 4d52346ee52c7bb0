"""The adapter that ships for the default model: servable as it is, small, loaded where it
applies, and said to play the shipped personas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from formats import basemodel, lora
from formats.manifest import read_manifest
from formats.registry import AdapterRegistry
from serving.app import startup_adapters
from serving.settings import ServeSettings
from serving.vllm_launcher import build_vllm_command

BUILTIN = Path(__file__).resolve().parents[2] / "bot" / "personas"


def test_it_plays_the_shipped_personas_and_is_servable() -> None:
    shipped = basemodel.SHIPPED_DIR
    assert basemodel.shipped_personas() == {p.stem for p in BUILTIN.glob("*.json")}
    assert lora.problems(shipped, base_model=basemodel.HUB_ID, max_rank=64) == []
    names = {p.name for p in shipped.iterdir()}
    assert not names & {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def test_it_is_small_bf16_and_carries_its_provenance() -> None:
    shipped = basemodel.SHIPPED_DIR
    weights = shipped / "adapter_model.safetensors"
    assert weights.stat().st_size <= 25 * 10**6
    with safe_open(str(weights), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    manifest = read_manifest(shipped)
    assert manifest.base_model == basemodel.HUB_ID
    extra = manifest.model_extra or {}
    assert set(extra["sources"]) == set(manifest.personas or ())
    assert all(len(source["sha256"]) == 64 for source in extra["sources"].values())
    assert manifest.data is not None and manifest.data.sha256
    assert manifest.settings["lora_r"] == lora.rank(lora.read_config(shipped))
    for persona in manifest.personas or ():
        assert set(extra["scores"]["held_out_greedy"][persona]) == {"base", "defaults", "shipped"}


@pytest.mark.parametrize(
    ("model", "enabled", "loaded"),
    [("default", True, True), ("smollm2", True, True), ("default", False, False),
     ("/models/Llama-3.1-8B-Instruct", True, False)],
)  # fmt: skip
def test_servers_load_it_for_the_default_model_only(
    tmp_path: Path, model: str, enabled: bool, loaded: bool
) -> None:
    settings = ServeSettings(model=model, shipped_adapter=enabled)
    embedded = startup_adapters(settings, tmp_path / "adapters")
    assert (basemodel.SHIPPED_NAME in embedded) is loaded
    argv, _ = build_vllm_command(settings, AdapterRegistry(tmp_path / "adapters"), "/m")
    modules = argv[argv.index("--lora-modules") + 1 :] if "--lora-modules" in argv else []
    names = {json.loads(m)["name"] for m in modules}
    assert (basemodel.SHIPPED_NAME in names) is loaded


def test_rollback_past_the_first_version_names_what_a_shipped_persona_returns_to(
    tmp_path: Path,
) -> None:
    from serving.publish import Publisher

    registry = AdapterRegistry(tmp_path / "adapters")
    told = Publisher(registry, [object()], max_rank=64)  # type: ignore[list-item]
    alone = Publisher(registry, [], max_rank=64)
    shipped = f"the adapter that ships for the default model ({basemodel.SHIPPED_NAME})"
    assert told._unpublished("haruhi", [{basemodel.SHIPPED_NAME, "haruhi@v1"}]) == shipped
    assert told._unpublished("haruhi", [{"haruhi@v1"}]) == "the base model"  # another base
    assert told._unpublished("mycat", [{basemodel.SHIPPED_NAME}]) == "the base model"
    assert alone._unpublished("haruhi", []).startswith(shipped)
    assert alone._unpublished("haruhi", []).endswith("else the base model")
