"""Average LoRA adapters of one base into a single adapter (a "soup").

Adapters trained on the same data from different seeds make different errors; the average of
their weight updates, ΔW = mean_i(s_i · B_i · A_i), tends to generalise better than any one of
them (Wortsman et al., "Model soups", 2022) and still serves as one adapter at one adapter's
cost. The factors themselves cannot be averaged (each seed's A is a different random basis), so
the averaged update is computed per module and factored back into rank `rank` with an SVD:

    ΔW = U Σ Vᵀ  →  B = U_r Σ_r^½ / √s,  A = Σ_r^½ V_rᵀ / √s

where s is the output adapter's own LoRA scaling (alpha / r, or alpha / √r with rsLoRA). A
module whose update has fewer than `rank` singular values gets zero rows, so every module has
the same rank and the result stays a plain LoRA that vLLM loads. The share of the update's
energy (squared Frobenius norm) the kept rank holds is recorded: 1.0 means the soup is exact.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, ModelNotFoundError
from formats import lora
from formats.manifest import Manifest, SoupInfo, read_manifest, write_manifest

CONFIG, WEIGHTS = lora.CONFIG, lora.WEIGHTS
_A, _B = ".lora_A.weight", ".lora_B.weight"
# Files an adapter directory carries besides its weights that a soup keeps from its first input
# (no tokenizer files: the tokenizer is the base model's, `formats.lora.TOKENIZER_FILES`).
_KEEP = ("README.md",)


def scaling(config: dict[str, Any]) -> float:
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _read(adapter: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    if not (adapter / CONFIG).is_file() or not (adapter / WEIGHTS).is_file():
        raise ModelNotFoundError(f"{adapter} is not an adapter directory ({CONFIG}, {WEIGHTS})")
    problems = lora.problems(adapter)  # the soup of servable adapters must be servable too
    if problems:
        raise ConfigError(f"{adapter}: only plain LoRA adapters can be averaged: {problems[0]}")
    config = lora.read_config(adapter)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ConfigError(f"{adapter}: per-module ranks cannot be averaged")
    return config, load_file(str(adapter / WEIGHTS))


def _modules(weights: dict[str, Any], adapter: Path) -> list[str]:
    modules = sorted(k.removesuffix(_A) for k in weights if k.endswith(_A))
    extra = set(weights) - {m + s for m in modules for s in (_A, _B)}
    if extra or any(m + _B not in weights for m in modules):
        raise ConfigError(f"{adapter}: weights other than LoRA A/B pairs: {sorted(extra)[:3]}")
    return modules


def average_adapters(
    adapters: Sequence[str | Path], output: str | Path, rank: int | None = None
) -> dict[str, Any]:
    """Write the average of `adapters` to `output` as one LoRA of rank `rank` (default: the
    largest input rank); returns the manifest written to rolecast.json."""
    import torch
    from safetensors.torch import save_file

    paths = [Path(a) for a in adapters]
    if len(paths) < 2:
        raise ConfigError("a soup needs at least two adapters")
    loaded = [_read(p) for p in paths]
    configs = [c for c, _ in loaded]
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) != 1:
        raise ConfigError(
            f"the adapters were trained on different base models: {sorted(map(str, bases))}"
        )
    modules = _modules(loaded[0][1], paths[0])
    for path, (_, weights) in zip(paths[1:], loaded[1:], strict=True):
        if _modules(weights, path) != modules:
            raise ConfigError(f"{path} adapts other modules than {paths[0]}")

    if rank is None:
        rank = max(int(c["r"]) for c in configs)
    elif rank < 1:
        raise ConfigError(f"rank must be at least 1, got {rank}")
    out_config = {**configs[0], "r": rank}
    s_out = scaling(out_config)
    dtype = loaded[0][1][modules[0] + _A].dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    averaged: dict[str, Any] = {}
    kept = total = 0.0
    for module in modules:
        delta = sum(
            scaling(c)
            * w[module + _B].to(device, torch.float32)
            @ w[module + _A].to(device, torch.float32)
            for c, w in loaded
        ) / len(loaded)
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, sigma.numel())
        kept += float(sigma[:k].square().sum())
        total += float(sigma.square().sum())
        root = sigma[:k].sqrt() / math.sqrt(s_out)
        b = delta.new_zeros(delta.shape[0], rank)
        a = delta.new_zeros(rank, delta.shape[1])
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        averaged[module + _B] = b.to("cpu", dtype).contiguous()
        averaged[module + _A] = a.to("cpu", dtype).contiguous()

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(averaged, str(output / WEIGHTS), metadata={"format": "pt"})
    (output / CONFIG).write_text(json.dumps(out_config, indent=2) + "\n", encoding="utf-8")
    for name in _KEEP:
        if (paths[0] / name).is_file():
            shutil.copyfile(paths[0] / name, output / name)
    manifest = _soup_manifest(paths, rank, kept / total if total else 1.0)
    return write_manifest(output, manifest)


def _soup_manifest(paths: Sequence[Path], rank: int, retained: float) -> Manifest:
    """The first input's manifest (persona, base, settings, system prompt) with the soup's
    sources; metrics that are averages over the inputs are the mean of theirs."""
    sources = [read_manifest(p) for p in paths]
    first = sources[0]
    losses = [s.metrics.get("validation_loss") for s in sources]
    metrics: dict[str, Any] = {}
    numbers = [float(x) for x in losses if isinstance(x, int | float)]
    if len(numbers) == len(losses):
        metrics["sources_mean_validation_loss"] = round(sum(numbers) / len(numbers), 6)
    inherited = first.model_dump(
        include={"persona", "base_model", "system_prompt", "data"}, exclude_unset=True
    )
    return Manifest(
        **inherited,
        settings={**first.settings, "lora_r": rank},
        soup=SoupInfo(
            sources=[str(p) for p in paths],
            seeds=[s.settings.get("seed") for s in sources],
            rank=rank,
            retained_energy=round(retained, 6),
        ),
        metrics=metrics,
        train_time_s=round(sum(s.train_time_s or 0.0 for s in sources), 2),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
