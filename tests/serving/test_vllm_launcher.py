"""The `vllm serve` command line built from settings and the registry (vLLM itself is not
needed: the command is checked, not run)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from formats.lora import allowed_rank
from formats.registry import AdapterRegistry
from rolecast.cli import app
from serving.settings import ServeSettings
from serving.vllm_launcher import build_vllm_command
from tests.adapters import fake_lora


def fake_adapter(path: Path, rank: int) -> Path:
    return fake_lora(path, r=rank, base="base-model")


def flags(argv: list[str]) -> dict[str, str]:
    """`--flag value` pairs of a command line (a flag without a value maps to '')."""
    found = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            found[word] = "" if nxt.startswith("--") else nxt
    return found


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (33, 64), (500, 512)])
def test_smallest_allowed_rank(rank: int, expected: int) -> None:
    assert allowed_rank(rank) == expected


def test_command_covers_registry_versions(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    v1 = registry.add_version("haruhi", fake_adapter(tmp_path / "h1", 8))
    registry.set_current("haruhi", v1.version)
    v2 = registry.add_version("haruhi", fake_adapter(tmp_path / "h2", 32))  # not current yet
    x1 = registry.add_version("xin", fake_adapter(tmp_path / "x1", 16))
    registry.set_current("xin", x1.version)
    settings = ServeSettings(
        model="base-model", served_model_name="base", port=8001, max_lora_rank=16
    )

    argv, env = build_vllm_command(settings, registry, "base-model")

    assert argv[:3] == ["vllm", "serve", "base-model"]
    assert env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}  # no cache directory given
    flag = flags(argv)
    assert flag["--served-model-name"] == "base" and flag["--port"] == "8001"
    assert "--enable-lora" in argv
    assert flag["--max-lora-rank"] == "32"  # v2 may be published or rolled to later
    assert flag["--max-loras"] == "3" and flag["--max-cpu-loras"] == "6"
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1 :]]
    assert modules == [
        {"name": "haruhi@v1", "path": str(v1.path), "base_model_name": "base"},
        {"name": "xin@v1", "path": str(x1.path), "base_model_name": "base"},
    ]
    assert str(v2.path) not in " ".join(argv)


@pytest.mark.parametrize(
    "published, setting, expected",
    [
        ([], None, "256"),  # the README's recipe (rsLoRA r256) can be published at once
        ([8, 32], None, "256"),  # a small published rank does not shut the larger ones out
        ([8], 16, "16"),
        ([8, 300], 64, "320"),  # a version above the setting still loads (and rolls back)
    ],
)
def test_max_lora_rank_covers_the_registry_and_what_a_publish_accepts(
    tmp_path: Path, published: list[int], setting: int | None, expected: str
) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    for i, rank in enumerate(published):
        v = registry.add_version("haruhi", fake_adapter(tmp_path / f"a{i}", rank))
        registry.set_current("haruhi", v.version)
    given = {} if setting is None else {"max_lora_rank": setting}
    settings = ServeSettings(model="base-model", shipped_adapter=False, **given)

    argv, _ = build_vllm_command(settings, registry, "base-model")

    assert flags(argv)["--max-lora-rank"] == expected
    # whatever the publisher accepts (ROLECAST_SERVE_MAX_LORA_RANK), the server loads
    assert int(expected) >= allowed_rank(settings.max_lora_rank)
    assert all(int(expected) >= rank for rank in published)


def test_the_default_model_with_the_shipped_adapter_leaves_room_for_r256(tmp_path: Path) -> None:
    argv, _ = build_vllm_command(
        ServeSettings(), AdapterRegistry(tmp_path / "empty"), "/cache/models/SmolLM2"
    )
    modules = [json.loads(a) for a in argv[argv.index("--lora-modules") + 1 :]]
    assert [m["name"] for m in modules] == ["rolecast-personas"]  # rank 32
    assert flags(argv)["--max-lora-rank"] == "256"


def test_run_options_and_the_compile_cache(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    plain = ServeSettings(model="m", shipped_adapter=False)
    argv, env = build_vllm_command(plain, registry, "m", cache_dir=tmp_path / "cache", environ={})
    # off unless asked for: vLLM's own defaults (the embedded server's 16 seqs is not vLLM's)
    for flag in (
        "--enforce-eager",
        "--gpu-memory-utilization",
        "--kv-cache-memory-bytes",
        "--max-num-seqs",
    ):
        assert flag not in argv
    assert env == {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache" / "vllm"),
    }

    tuned = ServeSettings(
        model="m",
        shipped_adapter=False,
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        kv_cache_memory_gb=1.5,
        max_num_seqs=128,
    )
    argv, env = build_vllm_command(
        tuned, registry, "m", cache_dir=tmp_path / "cache", environ={"VLLM_CACHE_ROOT": "/mine"}
    )
    flag = flags(argv)
    assert flag["--enforce-eager"] == "" and flag["--gpu-memory-utilization"] == "0.5"
    assert flag["--max-num-seqs"] == "128"
    assert flag["--kv-cache-memory-bytes"] == str(3 * 2**29)  # vLLM takes bytes
    assert "VLLM_CACHE_ROOT" not in env  # the operator's own cache wins


def test_print_command_options_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("ROLECAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ROLECAST_SERVE_MAX_NUM_SEQS", "64")
    result = CliRunner().invoke(
        app,
        [
            "serve", "--engine", "vllm", "--print-command", "--model", "org/model",
            "--enforce-eager", "--gpu-memory-utilization", "0.6", "--kv-cache-memory-gb", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    words = shlex.split(result.output)
    assert words[:2] == [
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1",
        f"VLLM_CACHE_ROOT={tmp_path / 'cache' / 'vllm'}",
    ]
    flag = flags(words[2:])
    assert flag["--enforce-eager"] == "" and flag["--gpu-memory-utilization"] == "0.6"
    assert flag["--max-num-seqs"] == "64"  # given through the environment: passed on
    assert flag["--kv-cache-memory-bytes"] == str(8 * 2**30)


def test_prepare_only_with_vllm_names_the_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["serve", "--engine", "vllm", "--prepare-only", "--model", str(tmp_path)]
    )
    assert result.exit_code == 0 and result.output.strip() == f"model ready: {tmp_path}"
    bad = CliRunner().invoke(
        app, ["serve", "--engine", "vllm", "--prepare-only", "--print-command"]
    )
    assert bad.exit_code != 0


def test_print_command_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLECAST_SERVE_MAX_LORA_RANK", "16")
    result = CliRunner().invoke(
        app,
        ["serve", "--engine", "vllm", "--print-command", "--model", "org/model", "--port", "9000"],
    )
    assert result.exit_code == 0, result.output
    words = shlex.split(result.output)
    assert words[0] == "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
    assert words[1].startswith("VLLM_CACHE_ROOT=") or "VLLM_CACHE_ROOT" in os.environ
    words = [w for w in words if not w.startswith("VLLM_CACHE_ROOT=")]
    assert words[1:4] == ["vllm", "serve", "org/model"]
    assert words[words.index("--max-lora-rank") + 1] == "16"
    assert words[words.index("--served-model-name") + 1] == "org/model"


def test_registry_pointer_and_names_never_reused(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    a = registry.add_version("atri", fake_adapter(tmp_path / "src1", 8))
    registry.set_current("atri", a.version)
    b = registry.add_version("atri", fake_adapter(tmp_path / "src2", 8))
    registry.set_current("atri", b.version)
    assert registry.previous("atri").served_name == "atri@v1"
    registry.set_current("atri", 1, rollback=True)
    assert registry.current("atri").served_name == "atri@v1"  # type: ignore[union-attr]
    assert registry.previous("atri") is None  # the first version: a rollback means the base
    manifest = json.loads((b.path / "rolecast.json").read_text())
    assert manifest["served_name"] == "atri@v2" and manifest["rank"] == 8
    assert manifest["schema_version"] == 1
    c = registry.add_version("atri", fake_adapter(tmp_path / "src3", 8))
    assert c.served_name == "atri@v3"
    assert not list(tmp_path.glob("atri/.*"))  # no temp files left behind


def test_adapters_cli_list_publish_rollback(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    runner = CliRunner()

    def rolecast(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [*args, "--adapters-dir", str(registry_dir)])
        return result.exit_code, result.output

    code, out = rolecast(
        "adapters", "publish", str(fake_adapter(tmp_path / "a", 8)), "--persona", "xin"
    )
    assert code == 0 and "published xin@v1 (was none" in out, out
    code, out = rolecast(
        "adapters", "publish", str(fake_adapter(tmp_path / "b", 16)), "--persona", "xin"
    )
    assert code == 0 and "published xin@v2 (was xin@v1" in out, out

    bad = fake_adapter(tmp_path / "bad", 8)
    (bad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "modules_to_save": ["lm_head"], "use_dora": True})
    )
    code, out = rolecast("adapters", "publish", str(bad), "--persona", "xin")
    assert code == 1 and "modules_to_save" in out and "use_dora" in out

    code, out = rolecast("adapters", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("  xin@v1") and lines[1].startswith("* xin@v2")

    code, out = rolecast("adapters", "rollback", "xin")
    assert code == 0 and "xin is back on xin@v1 (was xin@v2)" in out
    assert "Only the registry files changed" in out  # no server configured or running
    # from the first version, back to the base model: the pointer goes, the versions stay
    code, out = rolecast("adapters", "rollback", "xin")
    # xin is a shipped persona: with no server told, both things it may return to are named
    back = (
        "xin is back on the adapter that ships for the default model (rolecast-personas) on a "
        "server running the default model, else the base model (was xin@v1)"
    )
    assert code == 0 and back in out
    assert not (registry_dir / "xin" / "current.json").exists()
    assert AdapterRegistry(registry_dir).knows("xin")
    code, out = rolecast("adapters", "rollback", "xin")
    assert code == 1 and "xin has no published adapter" in out
    code, out = rolecast(
        "adapters", "publish", str(fake_adapter(tmp_path / "c", 8)), "--persona", "xin"
    )
    assert code == 0 and "published xin@v3 (was none" in out, out  # v1, v2 never reused
