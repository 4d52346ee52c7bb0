"""`rolecast adapters publish|rollback` without `--server`: a running `rolecast serve` of the
same registry is found and told; a configured server that does not answer is named; with none,
only the registry files change, and the command says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from bot.core.sidecar import EmbeddedServer, free_port
from tests.adapters import make_adapter


def rolecast(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rolecast", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "ROLECAST_HOME": str(home), **env},
        check=False,
    )


def served(server: EmbeddedServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.base_url}/models", timeout=10).json()["data"]}


def test_a_running_server_is_found_told_and_rolled_back_to_the_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    adapter = make_adapter(tiny_model_dir, tmp_path / "trained", seed=3)
    server = EmbeddedServer(
        ["--model", str(tiny_model_dir), "--served-model-name", "tiny"],
        log_path=tmp_path / "server.log",
        startup_timeout=300,
        env={"ROLECAST_HOME": str(home)},  # the registry is <home>/adapters: no flag given
    )
    with server:
        records = list((home / "run").glob("server-*.json"))
        assert len(records) == 1
        record = json.loads(records[0].read_text())
        assert record["url"] == server.url
        assert record["adapters_dir"] == str((home / "adapters").resolve())

        published = rolecast(home, "adapters", "publish", str(adapter), "--persona", "haruhi")
        assert published.returncode == 0, published.stderr
        assert "published haruhi@v1 (was none" in published.stdout
        assert f"told {server.url}" in published.stdout
        assert "haruhi@v1" in served(server)

        back = rolecast(home, "adapters", "rollback", "haruhi", "--json")
        assert back.returncode == 0, back.stderr
        result = json.loads(back.stdout)
        assert result["new"] is None and result["old"] == "haruhi@v1" and result["unloaded"]
        assert result["message"] == "haruhi is back on the base model (was haruhi@v1)"
        assert result["servers"] == [server.url]
        assert "haruhi@v1" not in served(server)
        assert not (home / "adapters" / "haruhi" / "current.json").exists()
    assert not list((home / "run").glob("server-*.json"))  # removed when the server stopped


def test_with_no_server_only_the_files_change_and_it_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    adapter = make_adapter(tiny_model_dir, tmp_path / "trained", seed=4)
    # a record left by a server that was killed: not believed, and cleaned up
    (home / "run").mkdir(parents=True)
    stale = home / "run" / "server-1.json"
    stale.write_text(
        json.dumps(
            {
                "pid": 1,
                "started": 0.0,
                "url": "http://127.0.0.1:9",
                "base_model": "tiny",
                "adapters_dir": str((home / "adapters").resolve()),
            }
        )
    )
    dead = f"http://127.0.0.1:{free_port()}/v1"
    published = rolecast(
        home, "adapters", "publish", str(adapter), "--persona", "xin", ROLECAST_SERVER_URL=dead
    )
    assert published.returncode == 0, published.stderr
    assert f"the configured server (ROLECAST_SERVER_URL={dead}) did not answer" in published.stderr
    assert "Only the registry files changed" in published.stdout
    assert "serves xin@v1 for xin" in published.stdout
    assert not stale.exists()
    # an explicit --server that does not answer is an error, and nothing changes
    refused = rolecast(home, "adapters", "rollback", "xin", "--server", dead)
    assert refused.returncode == 1 and "did not answer" in refused.stderr
    assert (home / "adapters" / "xin" / "current.json").is_file()
