"""scripts/vllm-host.sh on a fake bundle: the parts are joined in order and checked against
their sha256, unpacked once, the wheels carried beside them installed without an index, and
the command it would exec (and the `vllm serve` line that builds) printed in a dry run."""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "vllm-host.sh"


def split_into(data: bytes, name: str, folders: list[Path]) -> None:
    """`data` as NAME.part00, NAME.part01, ... one part in each folder, like `split -d`."""
    size = -(-len(data) // len(folders))
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.part{i:02d}").write_bytes(data[i * size : (i + 1) * size])


def fake_bundle(root: Path) -> bytes:
    """A tiny xz-packed tree in two parts (p1/, p2/) with its sha256 in p2/."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in {
            "fakevllm/__init__.py": "VERSION = 'fake'\n",
            "README": "x" * 4000,
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    data = buffer.getvalue()
    split_into(data, "site.tar.xz", [root / "p1", root / "p2"])
    digest = hashlib.sha256(data).hexdigest()
    (root / "p2" / "site.tar.xz.sha256").write_text(f"{digest}  site.tar.xz\n")
    return data


def fake_wheel(root: Path, name: str = "fakedep") -> bytes:
    """A pure-Python wheel, split in two with its sha256 (as build-wheelhouse.sh splits a big one)."""
    buffer = io.BytesIO()
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "ANSWER = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(buffer, "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"]))
    data = buffer.getvalue()
    wheel = f"{name}-1.0-py3-none-any.whl"
    split_into(data, wheel, [root / "w1", root / "w2"])
    (root / "w2" / f"{wheel}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {wheel}\n")
    return data


def host(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "ROLECAST_CACHE_DIR": str(tmp_path / "cache"),
        "ROLECAST_ADAPTERS_DIR": str(tmp_path / "adapters"),
    }
    env.pop("VLLM_CACHE_ROOT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def carried(tmp_path: Path) -> Path:
    fake_bundle(tmp_path / "carry" / "bundle")
    fake_wheel(tmp_path / "carry" / "wheels")
    return tmp_path / "carry"


def test_dry_run_joins_checks_unpacks_installs_and_prints_the_command(
    tmp_path: Path, carried: Path
) -> None:
    prefix = tmp_path / "prefix"
    args = ["--dry-run", "--prefix", str(prefix), "--wheels", str(carried / "wheels")]
    serve = ["--", "--model", "org/model", "--port", "9001", "--enforce-eager"]

    first = host(tmp_path, *args, str(carried / "bundle"), *serve)

    assert first.returncode == 0, first.stderr
    assert "joining 2 parts" in first.stderr and "sha256 OK" in first.stderr
    assert (prefix / "site" / "fakevllm" / "__init__.py").read_text() == "VERSION = 'fake'\n"
    assert (prefix / "python" / "fakedep" / "__init__.py").is_file()  # joined, checked, installed
    wrapper = prefix / "bin" / "vllm"
    assert os.access(wrapper, os.X_OK)
    assert shlex.split(wrapper.read_text().splitlines()[1]) == [
        "exec", sys.executable, "-m", "vllm.entrypoints.cli.main", "$@",
    ]  # fmt: skip
    would_exec, vllm_line = first.stdout.strip().splitlines()
    words = shlex.split(would_exec)
    env = dict(w.split("=", 1) for w in words[:3])
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert env["PATH"].split(":")[0] == str(prefix / "bin")
    assert env["PYTHONPATH"].split(":")[:3] == [
        str(REPO), str(prefix / "python"), str(prefix / "site"),
    ]  # fmt: skip
    assert words[3:] == [
        sys.executable, "-m", "rolecast", "serve", "--engine", "vllm",
        "--model", "org/model", "--port", "9001", "--enforce-eager",
    ]  # fmt: skip
    vllm = shlex.split(vllm_line)
    assert vllm[0] == "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
    assert vllm[1] == f"VLLM_CACHE_ROOT={tmp_path / 'cache' / 'vllm'}"
    assert vllm[2:5] == ["vllm", "serve", "org/model"]
    assert "--enforce-eager" in vllm and vllm[vllm.index("--port") + 1] == "9001"

    again = host(tmp_path, *args, str(carried / "bundle"), *serve)  # every start runs it
    assert again.returncode == 0, again.stderr
    assert "already unpacked" in again.stderr and "already installed" in again.stderr
    assert again.stdout == first.stdout


def test_a_damaged_or_unverifiable_bundle_is_not_unpacked(tmp_path: Path, carried: Path) -> None:
    part = carried / "bundle" / "p2" / "site.tar.xz.part01"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    damaged = host(tmp_path, "--dry-run", "--prefix", str(tmp_path / "a"), str(carried / "bundle"))
    assert damaged.returncode != 0 and "sha256 is" in damaged.stderr
    assert not (tmp_path / "a" / "site").exists()

    (carried / "bundle" / "p2" / "site.tar.xz.sha256").unlink()
    unchecked = host(
        tmp_path, "--dry-run", "--prefix", str(tmp_path / "b"), str(carried / "bundle")
    )
    assert unchecked.returncode != 0 and "site.tar.xz.sha256" in unchecked.stderr
    assert not (tmp_path / "b" / "site").exists()


def test_a_part_carried_twice_is_refused(tmp_path: Path, carried: Path) -> None:
    copy = carried / "bundle" / "p3"
    copy.mkdir()
    (copy / "site.tar.xz.part00").write_bytes(
        (carried / "bundle/p1/site.tar.xz.part00").read_bytes()
    )
    result = host(tmp_path, "--dry-run", "--prefix", str(tmp_path / "p"), str(carried / "bundle"))
    assert result.returncode != 0 and "site.tar.xz.part00 is there twice" in result.stderr


def test_env_prints_what_other_commands_need(tmp_path: Path, carried: Path) -> None:
    prefix = tmp_path / "prefix"
    result = host(tmp_path, "--env", "--prefix", str(prefix), str(carried / "bundle"))
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[0] == "export"
    env = dict(w.split("=", 1) for w in words[1:])
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert env["PYTHONPATH"].split(":")[:2] == [str(REPO), str(prefix / "site")]
    check = subprocess.run(
        ["bash", "-c", f"{result.stdout}\n{shlex.quote(sys.executable)} -c 'import fakevllm, rolecast'"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("script", ["vllm_sidecar_run.sh", "gptoss_run.sh"])
def test_the_gpu_run_scripts_parse(script: str) -> None:
    """The GPU run scripts run only on a GPU host; here, at least, bash reads them."""
    run = REPO / "benchmarks" / script
    assert subprocess.run(["bash", "-n", str(run)], capture_output=True).returncode == 0
    assert os.access(run, os.X_OK)
