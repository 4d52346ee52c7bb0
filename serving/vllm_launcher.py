"""`rolecast serve --engine vllm`: the `vllm serve` command line built from Rolecast's settings
and the adapter registry, so production runs the same adapters under the same names.

Beside the command line, two variables: `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, so publishing can
load and unload adapters while vLLM runs, and `VLLM_CACHE_ROOT` under Rolecast's cache directory
(`<cache>/vllm`, unless the environment names one), where vLLM keeps its torch.compile artifacts
(and the Inductor and Triton caches it points into that folder): a restart on the same machine
reads them back instead of compiling again.

vLLM refuses to start when one `--lora-modules` entry cannot be loaded, so the registry is read
defensively: a persona whose pointer is broken, or whose current version fails the
servable-LoRA rule, is left out with the reason logged (its persona speaks through the base
model, as on the embedded server), and a version whose config cannot be read does not count
towards `--max-lora-rank`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

from formats import basemodel, lora
from formats.errors import FormatError
from formats.lora import VLLM_LORA_RANKS, allowed_rank
from formats.registry import AdapterRegistry
from serving.settings import ServeSettings

#: Where vLLM keeps its compile cache, under Rolecast's cache directory.
VLLM_CACHE = "vllm"

log = logging.getLogger(__name__)


def build_vllm_command(
    settings: ServeSettings,
    registry: AdapterRegistry | None,
    model_path: str,
    *,
    cache_dir: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment of `vllm serve` for these settings.

    `cache_dir`: Rolecast's cache directory, where vLLM's compile cache goes unless `environ`
    already names one (`VLLM_CACHE_ROOT`).
    """
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
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.kv_cache_memory_gb is not None:
        argv += ["--kv-cache-memory-bytes", str(int(settings.kv_cache_memory_gb * 2**30))]
    if "max_num_seqs" in settings.model_fields_set:  # else vLLM's own, not the embedded 16
        argv += ["--max-num-seqs", str(settings.max_num_seqs)]
    if settings.enforce_eager:
        argv.append("--enforce-eager")

    modules: dict[str, str] = {}
    ranks: list[int] = []
    for name, path in settings.startup_modules().items():
        problems = lora.problems(Path(path), max_rank=VLLM_LORA_RANKS[-1])
        if problems:
            log.error("not serving %s: %s", name, "; ".join(problems))
            continue
        modules[name] = path
        ranks.append(lora.rank(lora.read_config(Path(path))))
    if registry is not None:
        for name, path, persona_ranks in registry_modules(registry):
            modules.setdefault(name, path)
            ranks += persona_ranks
    ranks = [r for r in ranks if r <= VLLM_LORA_RANKS[-1]]
    max_loras = settings.max_loras or max(1, len(modules)) + 1  # +1: old and new in a publish
    argv += [
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        # room for every version (each may be rolled back to) and for what a publish accepts
        str(allowed_rank(max([*ranks, settings.max_lora_rank]))),
        "--max-cpu-loras",
        str(settings.max_cpu_loras or 2 * max_loras),
    ]
    if modules:
        argv.append("--lora-modules")
        argv += [
            json.dumps({"name": name, "path": path, "base_model_name": base_name})
            for name, path in sorted(modules.items())
        ]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    if cache_dir is not None and not environ.get("VLLM_CACHE_ROOT"):
        env["VLLM_CACHE_ROOT"] = str(cache_dir / VLLM_CACHE)
    return argv, env


def registry_modules(registry: AdapterRegistry) -> list[tuple[str, str, list[int]]]:
    """Each persona's current version that vLLM can load, as (served name, path, the ranks of
    all its versions, which a rollback may bring back); what is left out is logged."""
    found = []
    for persona in registry.personas():
        try:
            versions = registry.versions(persona)
            current = registry.current(persona)
        except FormatError as exc:
            log.error("not serving %s: %s", persona, exc)
            continue
        ranks = []
        for version in versions:
            try:
                ranks.append(version.rank)
            except FormatError as exc:
                log.warning("%s left out of --max-lora-rank: %s", version.served_name, exc)
        if current is None:
            continue
        problems = lora.problems(current.path, max_rank=VLLM_LORA_RANKS[-1])
        if problems:
            log.error("not serving %s: %s", current.served_name, "; ".join(problems))
            continue
        found.append((current.served_name, str(current.path), ranks))
    return found


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
