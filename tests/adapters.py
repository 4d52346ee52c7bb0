"""LoRA adapters made in tests: peft on the tiny model, saved as training would save them."""

from __future__ import annotations

import json
from pathlib import Path


def make_adapter(base_dir: Path, out: Path, seed: int, *, r: int = 8, **config: object) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) weights, saved as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random B as well: the adapter visibly changes the output
        **config,  # type: ignore[arg-type]
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(20.0)  # big enough to move a random tiny model's greedy choice
    peft_model.save_pretrained(out)
    (out / "rolecast.json").write_text(json.dumps({"base_model": str(base_dir), "seed": seed}))
    return out
