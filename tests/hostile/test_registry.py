"""The adapter registry and publishing against broken and hostile files: one persona's corrupt
pointer, version folder, manifest, config or weights never stops `rolecast serve` (the vLLM
command line; the embedded server in tests/serving/test_adapters.py) or `rolecast adapters
list`; `rolecast adapters publish` refuses wrong-typed ranks and weights that do not fit the
adapter's config or the base model, with reasons and without a traceback, before any version
is created; and a property feeds generated configs, manifests, weights and pointers through
publish and every reader of the registry."""

from __future__ import annotations

import functools
import json
import logging
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import typer.main
import typer.testing
from hypothesis import strategies as st
from typer.testing import CliRunner

from formats import lora
from formats.errors import RegistryError
from formats.registry import AdapterRegistry
from rolecast.cli import app
from serving.app import startup_adapters
from serving.publish import Publisher
from serving.settings import ServeSettings
from serving.vllm_launcher import build_vllm_command
from tests.adapters import broken_registry, fake_lora, lora_tensors, safetensors_bytes
from tests.hostile.properties import PROFILES, run_property, tally

runner = CliRunner()

# The tiny model's config.json, as a base model folder holds it.
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 49152,
}


@pytest.fixture(autouse=True)
def built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(typer.testing, "_get_command", functools.cache(typer.main.get_command))


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


# -- readers of a broken registry ------------------------------------------------------------


def test_vllm_command_and_adapters_list_skip_each_broken_persona(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "reg"
    registry = AdapterRegistry(root)
    good = registry.add_version("atri", fake_lora(tmp_path / "good"))
    registry.set_current("atri", good.version)
    broken = broken_registry(root, fake_lora(tmp_path / "source"))

    with caplog.at_level(logging.WARNING):
        argv, _ = build_vllm_command(ServeSettings(model="org/base"), registry, "org/base")
    modules = [json.loads(a)["name"] for a in argv[argv.index("--lora-modules") + 1 :]]
    assert modules == ["atri@v1"]
    for persona in broken:
        assert f"not serving {persona}" in caplog.text, (persona, broken[persona])
    assert startup_adapters(ServeSettings(model="org/base"), root) == {
        "atri@v1": str(good.path),
        # the embedded server loads the current versions whose pointer reads, and checks each
        # as it loads it (tests/serving/test_adapters.py): the rule is the same
        **{f"{p}@v1": str(root / p / "v1") for p in broken if not p.startswith("pointer-")},
    }

    printed = invoke(
        "serve", "--engine", "vllm", "--print-command", "--model", "org/base",
        "--adapters-dir", str(root),
    )  # fmt: skip
    assert printed.exit_code == 0
    words = shlex.split(printed.stdout)
    assert [json.loads(w)["name"] for w in words[words.index("--lora-modules") + 1 :]] == [
        "atri@v1"
    ]

    listed = invoke("adapters", "list", "--adapters-dir", str(root))
    assert listed.exit_code == 0
    assert "* atri@v1" in listed.stdout
    for persona, what in broken.items():
        named = persona in listed.stdout or persona in listed.stderr
        assert named, (persona, what)


def test_a_publish_repairs_a_broken_pointer(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    broken = broken_registry(root, fake_lora(tmp_path / "source"))
    for persona in [p for p in broken if p.startswith("pointer-")]:
        result = invoke(
            "adapters", "publish", str(tmp_path / "source"), "--persona", persona,
            "--adapters-dir", str(root),
        )  # fmt: skip
        if persona == "pointer-directory":  # not ours to delete: refused before any change
            assert result.exit_code == 1 and "is not a file: remove it" in result.output
            assert [v.version for v in AdapterRegistry(root).versions(persona)] == [1]
            continue
        assert result.exit_code == 0, result.output
        current = AdapterRegistry(root).current(persona)
        assert current is not None and current.version >= 2, persona
        assert current.served_name == f"{persona}@v{current.version}"


# -- what publish refuses ---------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["eight", None, -8, 0, 1.5, 8.0, True, [8], {"r": 8}, "8"])
def test_publish_refuses_a_wrong_typed_rank(rank: object, tmp_path: Path) -> None:
    source = fake_lora(tmp_path / "src", r=rank)  # type: ignore[arg-type]
    result = invoke(
        "adapters", "publish", str(source), "--persona", "haruhi",
        "--adapters-dir", str(tmp_path / "reg"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"r is {json.dumps(rank)}; a LoRA rank is a positive integer" in result.output
    assert AdapterRegistry(tmp_path / "reg").versions("haruhi") == []


def test_publish_refuses_a_wrong_typed_rank_pattern(tmp_path: Path) -> None:
    source = fake_lora(tmp_path / "src", rank_pattern={"q_proj": "sixteen"})
    result = invoke(
        "adapters", "publish", str(source), "--persona", "haruhi",
        "--adapters-dir", str(tmp_path / "reg"),
    )  # fmt: skip
    assert result.exit_code == 1 and 'rank_pattern["q_proj"] is "sixteen"' in result.output


def _header(raw: bytes) -> tuple[int, dict[str, Any]]:
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length])


def _rewrite(raw: bytes, header: dict[str, Any]) -> bytes:
    length, _ = _header(raw)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + raw[8 + length :]


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def weights_cases() -> dict[str, tuple[bytes, str]]:
    """A broken weights file for each way it can be broken, with what the refusal says."""
    good = safetensors_bytes(lora_tensors(8))
    _, header = _header(good)

    def edited(name: str, **entry: object) -> bytes:
        return _rewrite(good, {**header, name: {**header[name], **entry}})

    wrong_in = safetensors_bytes(lora_tensors(8, dims={"q_proj": (96, 64), "v_proj": (64, 32)}))
    wrong_out = safetensors_bytes(lora_tensors(8, dims={"q_proj": (64, 64), "v_proj": (64, 48)}))
    return {
        "empty": (b"", "too short for a safetensors file"),
        "truncated": (good[: len(good) - 10], "the file holds"),
        "header larger than the file": (
            (10**6).to_bytes(8, "little") + good[8:],
            "declares a header of 1,000,000 bytes",
        ),
        "header not JSON": (len(b"{nope").to_bytes(8, "little") + b"{nope", "is not JSON"),
        "header not an object": (len(b"[1]").to_bytes(8, "little") + b"[1]", "not a JSON object"),
        "nested header": (
            (5000).to_bytes(8, "little") + b"[" * 2500 + b"]" * 2500,
            "is not JSON",
        ),
        "unknown dtype": (edited(A, dtype="F99"), "unknown dtype"),
        "integer dtype": (
            safetensors_bytes(lora_tensors(8, dtype="I64")),
            "is I64; LoRA weights are F16, BF16 or F32",
        ),
        "shape of the wrong type": (edited(A, shape=["8", 64]), "not a list of sizes"),
        "offsets past the data": (edited(A, data_offsets=[0, 10**9]), "do not hold"),
        "overlapping tensors": (
            edited(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                data_offsets=header[A]["data_offsets"],
                shape=[8, 64],
            ),
            "overlaps another",
        ),
        "rank other than the config's": (
            safetensors_bytes(lora_tensors(16)),
            "has rank 16; the config says 8",
        ),
        "A and B of different ranks": (
            safetensors_bytes({**lora_tensors(8), A: ("F32", [4, 64])}),
            "lora_A has rank 4, lora_B rank 8",
        ),
        "a tensor that is not a LoRA weight": (
            safetensors_bytes({**lora_tensors(8), "model.embed_tokens.weight": ("F32", [4, 4])}),
            "is not a LoRA weight",
        ),
        "a lonely lora_A": (
            safetensors_bytes({A: ("F32", [8, 64])}),
            "does not have one lora_A and one lora_B",
        ),
        "a module the config does not target": (
            safetensors_bytes(lora_tensors(8, modules=("q_proj", "k_proj"))),
            "is not among the config's target_modules",
        ),
        "no tensors": (safetensors_bytes({}), "it holds no tensors"),
        "inputs of another model": (wrong_in, "takes 96 inputs; the base model's has 64"),
        "outputs of another model": (wrong_out, "gives 48 outputs; the base model's gives 32"),
        "a layer the base does not have": (
            safetensors_bytes(lora_tensors(8, layers=3)),
            "is in layer 2; the base has 2",
        ),
    }


@pytest.mark.parametrize("case", sorted(weights_cases()))
def test_publish_refuses_weights_that_do_not_fit(case: str, tmp_path: Path, base_dir: Path) -> None:
    raw, reason = weights_cases()[case]
    source = fake_lora(tmp_path / "src", base=str(base_dir))
    (source / "adapter_model.safetensors").write_bytes(raw)
    result = invoke(
        "adapters", "publish", str(source), "--persona", "haruhi",
        "--adapters-dir", str(tmp_path / "reg"), "--base-model", str(base_dir),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "cannot publish" in result.output and reason in result.output, result.output
    assert not (tmp_path / "reg" / "haruhi").exists() or not list(
        (tmp_path / "reg" / "haruhi").glob("v*")
    )


def test_weights_that_fit_are_published_and_the_base_comes_from_the_adapter(
    tmp_path: Path, base_dir: Path
) -> None:
    # no server and no --base-model: the dimensions come from the base the adapter names
    source = fake_lora(tmp_path / "src", base=str(base_dir))
    result = invoke(
        "adapters", "publish", str(source), "--persona", "haruhi",
        "--adapters-dir", str(tmp_path / "reg"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    wrong = fake_lora(
        tmp_path / "wrong",
        base=str(base_dir),
        tensors=lora_tensors(8, dims={"q_proj": (96, 96), "v_proj": (96, 32)}),
    )
    refused = invoke(
        "adapters", "publish", str(wrong), "--persona", "haruhi",
        "--adapters-dir", str(tmp_path / "reg"),
    )  # fmt: skip
    assert refused.exit_code == 1 and "takes 96 inputs" in refused.output


def test_the_shipped_adapter_fits_the_default_model() -> None:
    """The adapter that ships passes the rule, header included (its dimensions are the default
    model's; checked against them when the converted checkpoint is in the cache)."""
    from formats import basemodel
    from serving.publish import base_config

    config = base_config(basemodel.HUB_ID)
    assert lora.problems(basemodel.SHIPPED_DIR, max_rank=64, base_config=config) == []


# -- the property -----------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
RANKS = st.one_of(
    st.integers(-3, 600),
    st.sampled_from(["eight", "8", "", None, True, False, 8.0, 1.5, [8], {"r": 8}]),
    JSON,
)


def mostly(good: object, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four, else anything from `other`."""
    return st.sampled_from([True, True, True, False]).flatmap(
        lambda keep: st.just(good) if keep else other
    )


CONFIGS = st.fixed_dictionaries(
    {
        "peft_type": mostly(
            "LORA", st.one_of(st.sampled_from(["lora", "PeftType.LORA", "IA3"]), JSON)
        ),
        "r": mostly(8, RANKS),
        "target_modules": mostly(["q_proj", "v_proj"], JSON),
        "base_model_name_or_path": mostly("org/base", JSON),
    },
    optional={
        "rank_pattern": st.one_of(
            st.dictionaries(st.sampled_from(["q_proj", "v_proj"]), RANKS, max_size=2), JSON
        ),
        "lora_alpha": JSON,
        "modules_to_save": JSON,
        "use_dora": JSON,
    },
)
MANIFEST_KEYS = ["base_model", "rank", "metrics", "created", "persona", "personas", "data",
                 "settings", "eval", "soup", "version", "schema_version", "served_name"]  # fmt: skip
MANIFESTS = st.one_of(
    st.none(),
    st.none(),
    st.dictionaries(st.sampled_from(MANIFEST_KEYS), JSON, max_size=4).map(json.dumps),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
WEIGHTS = st.one_of(
    st.just("matching"),
    st.just("matching"),
    st.sampled_from(["rank 16", "I64"]),
    st.binary(max_size=80),
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=80)).map(
        lambda t: t[0].to_bytes(8, "little") + t[1]
    ),
    st.dictionaries(st.text(max_size=20), JSON, max_size=3).map(
        lambda h: (lambda raw: len(raw).to_bytes(8, "little") + raw)(json.dumps(h).encode())
    ),
)
POINTERS = st.one_of(
    st.none(),
    st.binary(max_size=40),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"version": st.one_of(st.integers(-1, 3), JSON), "served_name": JSON, "history": JSON}
    ).map(lambda v: json.dumps(v).encode()),
)
CASES = st.tuples(CONFIGS, MANIFESTS, WEIGHTS, POINTERS)


def weights_bytes(kind: object, config: dict[str, Any]) -> bytes:
    r = config.get("r")
    rank = r if isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 600 else 8
    if kind == "matching":
        return safetensors_bytes(lora_tensors(rank))
    if kind == "rank 16":
        return safetensors_bytes(lora_tensors(16))
    if kind == "I64":
        return safetensors_bytes(lora_tensors(rank, dtype="I64"))
    assert isinstance(kind, bytes)
    return kind


def check_case(case: tuple[dict[str, Any], str | None, object, bytes | None]) -> None:
    config, manifest, weights, pointer = case
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        source = tmp / "src"
        source.mkdir()
        (source / "adapter_config.json").write_text(json.dumps(config))
        (source / "adapter_model.safetensors").write_bytes(weights_bytes(weights, config))
        if manifest is not None:
            (source / "rolecast.json").write_text(manifest, encoding="utf-8", errors="replace")
        root = tmp / "reg"
        registry = AdapterRegistry(root)
        publisher = Publisher(registry, [], max_rank=64, cache_dir=tmp / "cache")
        try:
            result = publisher.publish("haruhi", source)
        except RegistryError as exc:
            assert str(exc).startswith(("cannot publish", "cannot add")), exc
            assert registry.versions("haruhi") == []
            if not (isinstance(config["r"], int) and not isinstance(config["r"], bool)):
                assert "r is " in str(exc)
            tally("refused with a reason")
        else:
            assert result.new is not None
            assert lora.problems(result.new.path, max_rank=64) == []
            assert registry.current_served_name("haruhi") == "haruhi@v1"
            tally("published")
        # the same files as a second persona's current version, behind a generated pointer
        other = root / "other" / "v1"
        other.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, other)
        if pointer is not None:
            (root / "other" / "current.json").write_bytes(pointer)
        settings = ServeSettings(model="org/base")
        argv, _ = build_vllm_command(settings, registry, "org/base")
        startup_adapters(settings, root)
        listed = runner.invoke(app, ["adapters", "list", "--adapters-dir", str(root)])
        assert listed.exception is None or isinstance(listed.exception, SystemExit)
        assert listed.exit_code == 0
        served = " ".join(argv)
        assert ("haruhi@v1" in served) == (registry.current_served_name("haruhi") is not None)


@PROFILES
def test_generated_configs_manifests_weights_and_pointers(profile: str) -> None:
    run_property(profile, CASES, check_case)
