"""`rolecast.json`: typed, versioned, round-trips, keeps what it does not know, and still reads
the files written before it had a schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formats.errors import ManifestError
from formats.manifest import (
    SCHEMA_VERSION,
    DataInfo,
    EvalInfo,
    Manifest,
    read_manifest,
    write_manifest,
)

# What a published, retrained adapter's rolecast.json held before the schema had a version: the
# trainer's keys, then the registry's (persona, version, served_name, rank) and the retrain
# gate's (metrics from the gate, eval, retrain_job).
UNVERSIONED = {
    "persona": "haruhi",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "system_prompt": "你是凉宫春日。",
    "data": {
        "path": "/var/lib/rolecast/retrain/haruhi-3/data/haruhi_train.jsonl",
        "sha256": "9f2c0a4e0b9a1f3c5d7e2b4a6c8d0e1f3a5b7c9d1e3f5a7b9c1d3e5f7a9b1c3d",
        "dialogues": 412,
        "tokens": 188421,
        "assistant_tokens": 61237,
    },
    "settings": {
        "data": "/var/lib/rolecast/retrain/haruhi-3/data/haruhi_train.jsonl",
        "persona": "haruhi",
        "base": "default",
        "output": "/var/lib/rolecast/retrain/haruhi-3/adapter",
        "validation_data": None,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "use_rslora": False,
        "target_modules": "all-linear",
        "learning_rate": 0.0002,
        "lr_schedule": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "neftune_alpha": 0.0,
        "max_grad_norm": 1.0,
        "epochs": 3.0,
        "max_steps": -1,
        "max_length": 2048,
        "batch_tokens": 8192,
        "grad_accum": 1,
        "packing": True,
        "batch_size": 4,
        "attention": "auto",
        "gradient_checkpointing": False,
        "seed": 42,
        "save_steps": 0,
        "save_total_limit": 2,
        "resume": False,
        "progress": False,
        "attention_implementation": "sdpa",
        "dtype": "float32",
        "processes": 1,
    },
    "metrics": {
        "final_train_loss": 2.118734,
        "steps": 75,
        "bleu-4": 6.12,
        "rouge-1": 31.4,
        "rouge-2": 9.87,
        "rouge-l": 22.3,
    },
    "wall_time_s": 1843.27,
    "train_time_s": 1790.05,
    "tokens_per_s": 315.8,
    "device": "cpu",
    "created": "2026-11-22T09:41:07+00:00",
    "persona_note": "kept: a key this schema does not know",
    "version": 3,
    "served_name": "haruhi@v3",
    "rank": 16,
    "eval": {
        "against": "haruhi@v2",
        "scores": {"bleu-4": 6.1234, "rouge-1": 31.4012, "rouge-2": 9.8731, "rouge-l": 22.2987},
    },
    "retrain_job": 3,
}


def test_an_unversioned_manifest_reads_typed_and_writes_back_whole(tmp_path: Path) -> None:
    (tmp_path / "rolecast.json").write_text(json.dumps(UNVERSIONED, ensure_ascii=False))
    manifest = read_manifest(tmp_path)
    assert not manifest.versioned
    assert manifest.data is not None and manifest.data.dialogues == 412
    assert manifest.eval is not None and manifest.eval.against == "haruhi@v2"
    assert manifest.served_name == "haruhi@v3" and manifest.retrain_job == 3
    assert manifest.settings["lora_r"] == 16 and manifest.metrics["rouge-l"] == 22.3
    assert manifest.model_extra == {"persona_note": "kept: a key this schema does not know"}

    written = write_manifest(tmp_path, manifest)
    assert written == {"schema_version": SCHEMA_VERSION, **UNVERSIONED}
    assert json.loads((tmp_path / "rolecast.json").read_text()) == written
    assert read_manifest(tmp_path).versioned


def test_a_new_manifest_round_trips(tmp_path: Path) -> None:
    manifest = Manifest(
        persona="atri",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        system_prompt=None,  # set, though empty: kept as null
        data=DataInfo(path="a.jsonl", sha256="0" * 64, dialogues=3, tokens=90, assistant_tokens=30),
        settings={"lora_r": 8},
        metrics={"steps": 2},
        eval=EvalInfo(against="the base model", scores={"bleu-4": 1.0, "rouge-l": 2.0}),
    )
    written = write_manifest(tmp_path, manifest)
    assert written["schema_version"] == SCHEMA_VERSION and written["system_prompt"] is None
    assert "version" not in written and "soup" not in written  # nothing that was not set
    again = read_manifest(tmp_path)
    assert again == Manifest.model_validate(written)
    assert write_manifest(tmp_path, again) == written


def test_a_newer_writers_keys_survive_an_older_reader(tmp_path: Path) -> None:
    newer = {"schema_version": SCHEMA_VERSION + 1, "persona": "xin", "data": {"rows_dropped": 4}}
    newer["lineage"] = {"parent": "xin@v1"}
    (tmp_path / "rolecast.json").write_text(json.dumps(newer))
    manifest = read_manifest(tmp_path)
    manifest.version = 2  # what the registry adds on publish
    written = write_manifest(tmp_path, manifest)
    assert written["lineage"] == {"parent": "xin@v1"} and written["data"] == {"rows_dropped": 4}
    assert written["version"] == 2


def test_missing_and_broken_manifests(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == Manifest()  # an adapter without one
    (tmp_path / "rolecast.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "rolecast.json").write_text(json.dumps({"data": {"dialogues": "many"}}))
    with pytest.raises(ManifestError, match=r"data\.dialogues"):
        read_manifest(tmp_path)
