"""`rolecast serve --engine vllm`: the `vllm serve` command line built from Rolecast's settings
and the adapter registry, so production runs the same adapters under the same names."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from formats import basemodel, lora
from formats.lora import allowed_rank
from formats.registry import AdapterRegistry
from serving.settings import ServeSettings


def build_vllm_command(
    settings: ServeSettings, registry: AdapterRegistry | None, model_path: str
) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment of `vllm serve` for these settings."""
    base_name = settings.resolved_served_name()
    argv = [
        "vllm",
        "serve",
        model_path,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--served-model-name",
        base_name,
    ]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    if settings.dtype != "auto":
        argv += ["--dtype", settings.dtype]
    argv += model_flags(model_type(model_path))

    modules: dict[str, str] = settings.startup_modules()
    ranks: list[int] = [lora.rank(lora.read_config(Path(p))) for p in modules.values()]
    if registry is not None:
        for persona in registry.personas():
            # every version may be rolled back to, so the rank limit covers them all
            ranks += [v.rank for v in registry.versions(persona)]
            if (current := registry.current(persona)) is not None:
                modules.setdefault(current.served_name, str(current.path))
    max_loras = settings.max_loras or max(1, len(modules)) + 1  # +1: old and new in a publish
    argv += [
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        # with nothing published yet, leave room for what the publisher will accept
        str(allowed_rank(max(ranks) if ranks else settings.max_lora_rank)),
        "--max-cpu-loras",
        str(settings.max_cpu_loras or 2 * max_loras),
    ]
    if modules:
        argv.append("--lora-modules")
        argv += [
            json.dumps({"name": name, "path": path, "base_model_name": base_name})
            for name, path in sorted(modules.items())
        ]
    return argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def model_type(model_path: str) -> str | None:
    """The base model's `model_type`: from its config.json for a local directory, else from a
    hub id's name (gpt-oss)."""
    config = Path(model_path).expanduser() / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, OSError, AttributeError):
            return None
        return str(value) if value else None
    return "gpt_oss" if "gpt-oss" in model_path.lower() else None


def model_flags(model_type: str | None) -> list[str]:
    """Flags a base model type needs in vLLM 0.26.

    gpt-oss: vLLM renders its prompts with openai-harmony (not the chat template) and, without
    a reasoning parser, streams every channel's text as `content`, the analysis included; with
    `--reasoning-parser openai_gptoss` the analysis goes to `reasoning`, which the bot never
    shows, and the reply alone to `content`. LoRA on its attention and fused experts needs no
    flag beyond `--enable-lora` (the MXFP4 experts then run on a LoRA-capable MoE kernel).
    openai-harmony reads the o200k vocabulary at run time: an offline host sets
    `TIKTOKEN_ENCODINGS_BASE` to a folder holding `o200k_base.tiktoken`.
    """
    if model_type == "gpt_oss":
        return ["--reasoning-parser", "openai_gptoss"]
    return []


def vllm_model_path(
    settings: ServeSettings, *, prepare: bool, cache_dir: Path | None = None
) -> str:
    """vLLM loads the default model from its one converted checkpoint (made if `prepare`)."""
    if not basemodel.is_default(settings.model):
        return settings.model
    from serving.models import resolve_model_path

    if prepare:
        return resolve_model_path(settings.model, cache_dir)
    return str(basemodel.checkpoint_dir(cache_dir))


def format_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def exec_vllm(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with vLLM (signals and exit code are then vLLM's own)."""
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError("vLLM is not installed: pip install 'rolecast[vllm]'")
    os.execvpe(argv[0], argv, {**os.environ, **env})
