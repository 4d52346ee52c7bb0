"""`rolecast eval --baseline`: a new adapter is compared against another adapter (the served
version) instead of the base model."""

from __future__ import annotations

import json
from pathlib import Path

from finetune import evaluate as ev
from tests.finetune.ft_helpers import dialogue, write_jsonl


def random_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random, large weights: it visibly changes greedy replies."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(out)
    return out


def test_baseline_adapter_replaces_the_base_column(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "val.jsonl", [dialogue(i) for i in range(3)])
    a = random_adapter(tiny_llama_dir, tmp_path / "a", 1)
    b = random_adapter(tiny_llama_dir, tmp_path / "b", 2)
    settings = ev.GenerationSettings(max_new_tokens=6, batch_size=4)
    base = str(tiny_llama_dir)

    same = ev.predict(data, a, base, settings, baseline=a)
    assert all(ev.BASE not in r for r in same)  # the base model is not what it is compared with
    assert [r[ev.BASELINE] for r in same] == [r[ev.TUNED] for r in same]

    against_b = ev.predict(data, a, base, settings, baseline=b)
    only_b = ev.predict(data, b, base, settings, include_base=False)
    assert [r[ev.BASELINE] for r in against_b] == [r[ev.TUNED] for r in only_b]
    assert [r[ev.TUNED] for r in against_b] == [r[ev.TUNED] for r in same]
    assert [r[ev.BASELINE] for r in against_b] != [r[ev.TUNED] for r in against_b]

    results = ev.write_report(against_b, tmp_path / "report", "baseline vs adapter")
    assert set(results) == {ev.BASELINE, ev.TUNED}
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(saved["scores"]) == {"baseline", "adapter"}


def test_sampled_predictions_keep_every_sample(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from finetune.metrics import consensus

    data = write_jsonl(tmp_path / "val.jsonl", [dialogue(i) for i in range(3)])
    a = random_adapter(tiny_llama_dir, tmp_path / "a", 1)
    settings = ev.GenerationSettings(max_new_tokens=6, batch_size=2, samples=4, temperature=1.5)
    records = ev.predict(data, a, str(tiny_llama_dir), settings)
    for r in records:
        for column in (ev.BASE, ev.TUNED):
            samples = r[column + ev.SAMPLES_SUFFIX]
            assert len(samples) == 4
            assert r[column] == samples[consensus(samples)]
    assert len({s for r in records for s in r[ev.TUNED + ev.SAMPLES_SUFFIX]}) > 3  # sampled

    greedy = ev.predict(data, a, str(tiny_llama_dir), ev.GenerationSettings(max_new_tokens=6))
    assert all(not k.endswith(ev.SAMPLES_SUFFIX) for r in greedy for k in r)
