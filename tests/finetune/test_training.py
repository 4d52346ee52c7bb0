"""LoRA SFT on a tiny Llama built from a config (CPU): packing, freezing, resume, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from finetune import trainer as trainer_mod
from finetune.adapter import NoisyEmbeddings, lora_config
from finetune.config import TrainConfig
from finetune.data import load_dialogues
from finetune.errors import ConfigError, DataError
from finetune.loop import batch_loss
from finetune.packing import collate_packed, collate_padded
from finetune.trainer import encode_dialogues, train
from tests.finetune.ft_helpers import dialogue, write_jsonl


def config(data: Path, base: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "data": str(data),
        "persona": "haruhi",
        "base": str(base),
        "output": str(output),
        "max_length": 256,
        "batch_tokens": 512,
        "epochs": 2,
        "learning_rate": 1e-2,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_packed_and_padded_batches_give_the_same_loss(
    tiny_llama_dir: Path, small_dataset: Path, smol_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    samples = encode_dialogues(smol_tokenizer, load_dialogues(small_dataset))[:5]
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.no_grad():
        padded, n_padded = batch_loss(
            model, collate_padded(samples, smol_tokenizer.pad_token_id), varlen=False
        )
        packed, n_packed = batch_loss(model, collate_packed(samples), varlen=False)
        alone = [batch_loss(model, collate_packed([s]), varlen=False) for s in samples]
    assert n_packed == n_padded == sum(n for _, n in alone) > 0
    assert float(packed) / n_packed == pytest.approx(float(padded) / n_padded, rel=1e-5)
    # packing does not let a dialogue see its neighbours: the sum equals the dialogues one by one
    assert float(packed) == pytest.approx(sum(float(x) for x, _ in alone), rel=1e-5)


def test_neftune_noise_is_per_dialogue_and_only_while_training(
    tiny_llama_dir: Path, small_dataset: Path, smol_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    samples = encode_dialogues(smol_tokenizer, load_dialogues(small_dataset))[:3]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    embed = model.get_input_embeddings()
    batch = collate_packed(samples)
    clean = embed(batch.input_ids).detach()
    noise = NoisyEmbeddings(model, alpha=5.0)
    noise.use(batch)
    model.train()
    noisy = embed(batch.input_ids).detach()
    hidden = clean.shape[-1]
    start = 0
    for s in samples:  # each dialogue's noise is bounded by alpha / sqrt(its own length * d)
        delta = (noisy - clean)[0, start : start + len(s)]
        bound = 5.0 / (len(s) * hidden) ** 0.5
        assert float(delta.abs().max()) <= bound * (1 + 1e-5)
        assert float(delta.abs().max()) > bound * 0.5  # uniform noise reaches near the bound
        start += len(s)
    model.eval()
    torch.testing.assert_close(embed(batch.input_ids), clean)  # no noise outside training
    noise.remove()
    model.train()
    torch.testing.assert_close(embed(batch.input_ids), clean)


def test_base_weights_stay_frozen_and_adapter_weights_change(
    tiny_llama_dir: Path, small_dataset: Path, smol_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    cfg = config(small_dataset, tiny_llama_dir, Path("unused"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(model, lora_config(cfg, model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    samples = encode_dialogues(smol_tokenizer, load_dialogues(small_dataset))
    for i in range(3):
        loss, n = batch_loss(model, collate_packed(samples[i * 4 : i * 4 + 4]), varlen=False)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"base weight {name} changed"


def test_train_writes_a_vllm_loadable_adapter_and_manifest(
    tiny_llama_dir: Path, small_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    manifest = train(config(small_dataset, tiny_llama_dir, out, validation_data=str(small_dataset)))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert not adapter_config.get("modules_to_save")
    assert not adapter_config.get("use_dora")
    assert set(adapter_config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    saved = json.loads((out / "rolecast.json").read_text())
    assert saved == manifest
    assert saved["data"]["dialogues"] == 12 and len(saved["data"]["sha256"]) == 64
    assert saved["tokens_per_s"] > 0
    # no --lora_r: the rank for a base under 1 B parameters, and the recipe's other defaults
    assert saved["settings"]["lora_r"] == adapter_config["r"] == 256
    assert saved["settings"]["base_parameters"] < 1e9
    assert adapter_config["use_rslora"] and adapter_config["lora_alpha"] == 16
    assert saved["system_prompt"] == "你是凉宫春日。"
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == manifest["metrics"]["steps"]
    assert losses[-1] < losses[0]
    assert any("validation_loss" in r for r in log)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter loads back onto the base and its LoRA B matrices (zero at init) were trained
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = PeftModel.from_pretrained(base, str(out))
    assert any(float(p.abs().sum()) > 0 for n, p in tuned.named_parameters() if "lora_B" in n)


def test_resume_continues_from_the_checkpoint(
    tiny_llama_dir: Path, small_dataset: Path, tmp_path: Path
) -> None:
    # NEFTune on: its noise comes from the torch RNG, which the checkpoint restores
    def run(output: Path, **extra: object) -> dict:
        settings = {"max_steps": 4, "save_steps": 2, "neftune_alpha": 5.0, **extra}
        return train(config(small_dataset, tiny_llama_dir, output, **settings))

    straight = tmp_path / "straight"
    run(straight)
    # an interrupted run: everything after the step-2 checkpoint is lost
    broken = tmp_path / "broken"
    run(broken, save_total_limit=5)
    for name in ("adapter_model.safetensors", "adapter_config.json", "rolecast.json"):
        (broken / name).unlink()
    import shutil

    shutil.rmtree(broken / "checkpoints" / "step-4")
    with pytest.raises(ConfigError):  # a half-done run is not silently overwritten
        run(broken)
    manifest = run(broken, resume=True)
    assert manifest["metrics"]["steps"] == 4
    a = [json.loads(x) for x in (straight / "loss.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (broken / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    from safetensors.torch import load_file

    wa = load_file(str(straight / "adapter_model.safetensors"))
    wb = load_file(str(broken / "adapter_model.safetensors"))
    for key, value in wa.items():
        torch.testing.assert_close(wb[key], value, rtol=1e-4, atol=1e-6)


def test_malformed_dataset_stops_training_before_the_model_loads(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ends = dialogue(1)
    ends["conversations"].append({"from": "human", "value": "然后呢？"})
    twice = dialogue(2)
    twice["conversations"].insert(2, {"from": "human", "value": "喂？"})
    data = write_jsonl(tmp_path / "bad.jsonl", [dialogue(0), ends, twice])

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although the data is malformed")

    monkeypatch.setattr(trainer_mod.models, "load_model", no_model)
    with pytest.raises(DataError) as info:
        train(config(data, tiny_llama_dir, tmp_path / "out"))
    problems = "\n".join(info.value.problems)
    assert "row_1" in problems and "ends_on_user" in problems
    assert "row_2" in problems and "user_twice" in problems
    assert "row_0" not in problems


def test_rank_follows_the_base_size_unless_given(
    tiny_llama_dir: Path, small_dataset: Path, tmp_path: Path
) -> None:
    from finetune.config import default_rank

    assert default_rank(134_515_008) == 256  # SmolLM2-135M
    assert default_rank(999_999_999) == 256
    assert default_rank(1_000_000_000) == 64
    assert default_rank(8_030_261_248) == 64  # Llama-3.1-8B
    out = tmp_path / "r8"
    manifest = train(config(small_dataset, tiny_llama_dir, out, lora_r=8, max_steps=1))
    assert manifest["settings"]["lora_r"] == 8
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_recipe_defaults() -> None:
    cfg = TrainConfig(data="x", persona="p")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.use_rslora, cfg.target_modules) == (
        None,  # by base size
        16,
        True,
        "all-linear",
    )
    assert (cfg.learning_rate, cfg.epochs, cfg.warmup_ratio) == (5e-4, 4.0, 0.05)
    assert cfg.batch_tokens is None  # sized to the free memory


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--lora_r"):
        TrainConfig(data="x", persona="p", lora_r=0)
    with pytest.raises(ConfigError, match="--neftune_alpha"):
        TrainConfig(data="x", persona="p", neftune_alpha=-1)
    with pytest.raises(ConfigError, match="--batch_tokens"):
        TrainConfig(data="x", persona="p", batch_tokens=100, max_length=2048)
