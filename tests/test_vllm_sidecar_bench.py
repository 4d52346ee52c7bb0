"""benchmarks/vllm_sidecar.py, every check run on this CPU against the embedded server with the
tiny model (the same API as vLLM's), small sizes: so that on a GPU host only GPU problems are
left. Each check prints JSON lines ending in a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.core.sidecar import EmbeddedServer
from formats.registry import AdapterRegistry
from tests.adapters import make_adapter

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "vllm_sidecar.py"


@dataclass
class Rig:
    server: EmbeddedServer
    registry: Path
    model: Path
    adapters: dict[str, Path]
    data: Path


@pytest.fixture(scope="module")
def rig(
    tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("sidecar")
    adapters = {
        "a": make_adapter(tiny_model_dir, root / "a", 1),
        "b": make_adapter(tiny_model_dir, root / "b", 2, r=16, use_rslora=True),
    }
    registry = AdapterRegistry(root / "registry")
    haruhi = registry.add_version("haruhi", adapters["a"])
    registry.set_current("haruhi", haruhi.version)
    server = EmbeddedServer(
        ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--max-model-len", "2048",
         "--adapters-dir", str(registry.root)],
        log_path=root / "server.log",
        startup_timeout=300,
    )  # fmt: skip
    with server:
        yield Rig(server, registry.root, tiny_model_dir, adapters, data_dir)


def bench(rig: Rig, check: str, *args: str) -> tuple[int, list[dict], str]:
    argv = [
        sys.executable, str(BENCH), check, "--server", rig.server.url, "--kind", "embedded",
        "--model", str(rig.model), "--adapters-dir", str(rig.registry), "--data", str(rig.data),
        "--device", "cpu", *args,
    ]  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines and lines[0]["event"] == "setup", run.stderr[-3000:]
    assert lines[-1]["event"] == "summary" and lines[-1]["check"] == check, run.stderr[-3000:]
    return run.returncode, lines, run.stderr


def events(lines: list[dict], name: str) -> list[dict]:
    return [line for line in lines if line["event"] == name]


def test_equivalence(rig: Rig) -> None:
    adapters = [f"--adapter={n}={p}" for n, p in rig.adapters.items()]
    code, lines, err = bench(rig, "equivalence", *adapters, "--prompts", "1", "--max-tokens", "8")
    replies = events(lines, "equivalence")
    assert len(replies) == 2 * 3  # two adapters, one held-out dialogue of each persona
    assert all(r["template_ids_equal"] and r["compared_as"] == "text" for r in replies)
    summary = lines[-1]
    assert set(summary["adapters"]) == {"a", "b"}
    # the embedded server is transformers + PEFT too: on a CPU in float32 the same greedy text
    assert all(s["identical"] == s["replies"] == 3 for s in summary["adapters"].values()), err
    assert summary["ok"] and code == 0


def test_the_bot_on_the_server(rig: Rig) -> None:
    code, lines, err = bench(rig, "bot", "--max-tokens", "12", "--history-turns", "40")
    replies = {r["persona"]: r for r in events(lines, "bot_reply")}
    assert replies["haruhi"]["expected"] == "haruhi@v1"  # its registry version
    assert replies["atri"]["expected"] == replies["xin"]["expected"] == "tiny"  # no shipped one
    assert all(r["ok"] for r in replies.values()), replies
    (budget,) = events(lines, "token_budget")
    assert budget["ok"] and budget["turns_in_prompt"] < budget["history_turns"], budget
    (injection,) = events(lines, "injection")
    assert len(injection["control_token_ids"]) == 2
    # the embedded server keeps message text as text, and the bot defuses look-alikes on top
    # (for vLLM, which does not): neither the raw text nor the bot's prompt adds a control token
    assert injection["extra_control_tokens_raw"] == 0
    assert injection["extra_control_tokens_through_the_bot"] == 0 and injection["ok"]
    (terminal,) = events(lines, "terminal_chat")
    assert terminal["ok"], (terminal, err[-2000:])
    parts = [*replies.values(), budget, injection, terminal]
    assert lines[-1]["ok"] == all(p["ok"] for p in parts) and code == (0 if lines[-1]["ok"] else 1)


def test_publish_and_rollback_under_load(rig: Rig) -> None:
    code, lines, err = bench(
        rig, "publish", "--publish-adapter", str(rig.adapters["b"]), "--streams", "4",
        "--max-tokens", "16", "--settle-s", "1.5",
    )  # fmt: skip
    moves = [line for line in lines if line["event"] in ("publish", "rollback")]
    assert [m["event"] for m in moves] == ["publish", "publish", "rollback"]
    assert all(m["same_registry"] for m in moves)
    retired = [m["retired"] for m in moves if "retired" in m]
    assert len(retired) == 3  # v1 (live at the start), then the first and second new versions
    assert all(r["drained_before_unload"] and r["unloaded_s"] is not None for r in retired), retired
    summary = lines[-1]
    assert summary["failed"] == 0 and summary["requests"] > 4, summary
    assert summary["root_is_the_registry_version"] and summary["ok"] and code == 0, err


def test_throughput(rig: Rig) -> None:
    adapters = [f"--adapter={n}={p}" for n, p in rig.adapters.items()]
    code, lines, err = bench(
        rig, "throughput", *adapters, "--levels", "2,4", "--rounds", "1", "--max-tokens", "8",
    )  # fmt: skip
    levels = events(lines, "throughput")
    assert [(r["mode"], r["concurrency"]) for r in levels] == [
        ("lora", 2), ("lora", 4), ("base", 2), ("base", 4),
    ]  # fmt: skip
    for r in levels:
        assert r["complete"] and r["failed"] == 0 and r["output_tokens"] == 8 * r["requests"]
        assert r["output_tok_s"] > 0 and r["ttft_p95_s"] >= r["ttft_p50_s"] > 0
    assert set(lines[-1]["lora_over_base"]) == {"2", "4"} and lines[-1]["ok"] and code == 0, err


def test_retrain_with_the_server_as_sidecar(rig: Rig) -> None:
    """An imported persona (haruhi's card under a new key, nothing live for it), as the GPU run
    uses it: the built-in haruhi's live version there is the shipped adapter."""
    assert not AdapterRegistry(rig.registry).versions("haruhi-imported")
    code, lines, err = bench(
        rig, "retrain", "--persona", "haruhi-imported",
        "--dialogues", "10", "--base", str(rig.model), "--validation", "0.25",
        "--max-length", "1024", "--eval-max-new-tokens", "8", "--tolerance", "100",
        "--consistency-tolerance", "100",
        "--train-args", "--max_steps 4 --save_steps 2 --max_length 1024 --batch_tokens 1024 "
        "--lora_r 8 --learning_rate 1e-3",
    )  # fmt: skip
    summary = lines[-1]
    expected = "haruhi-imported@v1"
    assert summary["state"] == "done", (summary, err[-3000:])
    assert summary["new_version"] == summary["reply_model"] == expected
    assert {"export", "clean_split", "train", "eval_gate", "publish", "first_reply"} <= set(
        summary["phases_s"]
    )
    assert summary["ok"] and code == 0


def test_text_divergence_ignores_only_a_held_back_partial_character(
    smollm2_tokenizer_dir: Path,
) -> None:
    """A reply cut at max_tokens can end inside a character; a streaming server holds those
    bytes back, so the reference's trailing U+FFFD is not a difference. A real one still is."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from vllm_sidecar import text_divergence

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = tok.encode("我们SOS团今天要去找外星人！", add_special_tokens=False)
    cut = next(
        n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd")
    )  # a prefix of the tokens that ends inside a character
    shown = tok.decode(ids[:cut]).rstrip("\ufffd")
    assert text_divergence(tok, ids[:cut], shown) is None
    assert text_divergence(tok, ids, tok.decode(ids)) is None
    same = len(tok.encode("我们SOS团", add_special_tokens=False))
    where = text_divergence(tok, ids, "我们SOS团明天")  # 今 / 明: a real difference
    assert where is not None and same <= where < len(ids)
