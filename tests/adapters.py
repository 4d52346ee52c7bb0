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


# The tiny model's dimensions (tests/conftest.py: hidden 64, 4 heads of 16, 2 KV heads, 2 layers).
TINY_DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors file of zero-filled tensors (`name -> (dtype, shape)`), written by hand
    from the format's description: 8-byte header size, JSON header, the data."""
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + count * sizes[dtype]],
        }
        offset += count * sizes[dtype]
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def lora_tensors(
    r: int = 8,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: int = 2,
    dims: dict[str, tuple[int, int]] = TINY_DIMS,
    dtype: str = "F32",
) -> dict[str, tuple[str, list[int]]]:
    """The tensors PEFT saves for a LoRA of rank `r` on `modules` of a Llama-style model."""
    tensors = {}
    for layer in range(layers):
        for module in modules:
            inputs, outputs = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (dtype, [r, inputs])
            tensors[f"{prefix}.lora_B.weight"] = (dtype, [outputs, r])
    return tensors


def fake_lora(
    path: Path,
    *,
    r: int = 8,
    base: str = "org/base",
    manifest: dict[str, object] | None = None,
    tensors: dict[str, tuple[str, list[int]]] | None = None,
    **config: object,
) -> Path:
    """An adapter directory with a real safetensors header and zero weights (no torch): enough
    for everything that reads adapters without running them."""
    path.mkdir(parents=True)
    rank = r if isinstance(r, int) and not isinstance(r, bool) and r > 0 else 8
    full = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base,
        **config,
    }
    (path / "adapter_config.json").write_text(json.dumps(full))
    chosen = lora_tensors(rank) if tensors is None else tensors
    (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(chosen))
    if manifest is not None:
        (path / "rolecast.json").write_text(json.dumps(manifest))
    return path


def broken_registry(root: Path, source: Path) -> dict[str, str]:
    """Add to the registry at `root` one persona per way its files can be broken, each first
    published from `source` (a good adapter); returns persona -> what is broken. Every reader
    of the registry must skip these, with a reason, and keep serving the others."""
    from formats.registry import AdapterRegistry

    registry = AdapterRegistry(root)
    broken: dict[str, str] = {}

    def publish(persona: str, what: str) -> Path:
        version = registry.add_version(persona, source)
        registry.set_current(persona, version.version)
        broken[persona] = what
        return version.path

    def pointer(persona: str) -> Path:
        return root / persona / "current.json"

    publish("pointer-not-json", "a current.json that is not JSON")
    pointer("pointer-not-json").write_text('{"version": 1, "served_name": ')
    publish("pointer-dangling", "a current.json pointing at a missing version")
    pointer("pointer-dangling").write_text(
        json.dumps({"version": 9, "served_name": "pointer-dangling@v9", "history": [1, 9]})
    )
    publish("pointer-directory", "a directory named current.json")
    pointer("pointer-directory").unlink()
    pointer("pointer-directory").mkdir()
    publish("pointer-elsewhere", "a current.json naming another persona's adapter")
    pointer("pointer-elsewhere").write_text(
        json.dumps({"version": 1, "served_name": "atri@v1", "history": [1]})
    )
    publish("pointer-types", "a current.json with wrong-typed fields")
    pointer("pointer-types").write_text(
        json.dumps({"version": "one", "served_name": None, "history": "x"})
    )
    path = publish("manifest-not-json", "a version whose rolecast.json is not JSON")
    (path / "rolecast.json").write_text("{{{")
    path = publish("manifest-types", "a version whose rolecast.json has wrong-typed fields")
    (path / "rolecast.json").write_text(json.dumps({"base_model": 7, "metrics": [1], "rank": "x"}))
    path = publish("config-not-json", "a version whose adapter_config.json is not JSON")
    (path / "adapter_config.json").write_text("not json")
    for persona, rank in (("rank-eight", "eight"), ("rank-null", None), ("rank-float", 1.5)):
        path = publish(persona, f"a version whose rank is {rank!r}")
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "r": rank}))
    path = publish("weights-missing", "a version without its weights")
    (path / "adapter_model.safetensors").unlink()
    path = publish("weights-garbage", "a version whose weights are not safetensors")
    (path / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    path = publish("weights-truncated", "a version whose weights are cut short")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return broken
