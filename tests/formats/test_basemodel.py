"""The default model's one converted checkpoint: one folder for every command, made once even
when two first runs race."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from formats import basemodel

RACER = """
import sys, time
from pathlib import Path
from formats.basemodel import prepare_once

target, log = Path(sys.argv[1]), Path(sys.argv[2])

def write(folder):
    with log.open("a") as f:
        f.write(f"{folder}\\n")
    time.sleep(1.0)  # long enough for the other process to arrive meanwhile
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")

print(prepare_once(target, write))
"""


def test_two_first_runs_convert_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / basemodel.SERVED_NAME
    log = tmp_path / "conversions.log"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(target), str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in racers]
    assert [p.returncode for p in racers] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(target)] * 2
    assert len(log.read_text().splitlines()) == 1  # converted once
    assert basemodel.is_complete(target)
    leftovers = {p.name for p in target.parent.iterdir()} - {target.name}
    assert leftovers <= {f".{target.name}.lock"}  # no temporary folder left behind


def test_a_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / basemodel.SERVED_NAME

    def broken(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        basemodel.prepare_once(target, broken)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f".{target.name}.lock"]


@pytest.fixture
def converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache whose default-model folder is complete (as a first run leaves it)."""
    monkeypatch.setenv("ROLECAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = basemodel.checkpoint_dir()
    folder.mkdir(parents=True)
    for name in basemodel.COMPLETE:
        (folder / name).write_text("{}")
    return folder


def test_serving_and_finetune_load_the_same_folder(converted: Path) -> None:
    from finetune.models import resolve
    from serving.models import resolve_model_path

    assert converted == Path(os.environ["ROLECAST_CACHE_DIR"]) / "models" / basemodel.SERVED_NAME
    for name in ("default", "smollm2"):
        assert resolve_model_path(name) == resolve(name) == str(converted)
    assert basemodel.hub_id("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_setup_prepares_through_the_one_conversion(converted: Path) -> None:
    """`./setup.sh` runs `rolecast serve --prepare-only`; a checkpoint there is used as is."""
    result = subprocess.run(
        [sys.executable, "-m", "rolecast", "serve", "--prepare-only"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"model ready: {converted}"
    assert "converting" not in result.stderr
    setup = (Path(__file__).resolve().parents[2] / "setup.sh").read_text()
    assert 'rolecast" serve --prepare-only' in setup


@pytest.mark.slow
def test_the_real_conversion_once_for_both_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLECAST_CACHE_DIR", str(tmp_path / "cache"))
    from finetune.models import load_tokenizer
    from serving.models import resolve_model_path

    folder = Path(resolve_model_path("default"))  # converts
    assert basemodel.is_complete(folder) and (folder / "model.safetensors").is_file()
    made = (folder / "config.json").stat().st_mtime_ns
    assert load_tokenizer("default").chat_template  # finetune reads the same folder
    assert (folder / "config.json").stat().st_mtime_ns == made  # not converted again
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        f".{basemodel.SERVED_NAME}.lock",
        basemodel.SERVED_NAME,
    ]
