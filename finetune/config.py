"""Training settings: one dataclass whose fields are the `rolecast train` flags (as in trl).

The defaults are the recipe that scored best on a validation split of the role-play data
(`benchmarks/RESULTS.md`, third round): rsLoRA with alpha 16 on every linear layer, learning
rate 5e-4 with a 5% warm-up, 4 epochs. The rank follows the base model's size (`default_rank`,
RESULTS.md "Rank by base size"), and the tokens of a packed micro-batch follow the memory the
machine has free (`finetune.memory`); a flag given explicitly always wins.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
ATTENTION = ("auto", "varlen", "sdpa", "eager")

# The rank when --lora_r is not given: 256 for a base under LARGE_BASE parameters, 64 from there
# up. On the 135M default model r256 scored best (a 156 MB adapter); on an 8B base it costs 8%
# of the throughput of r16, fits one 80 GB GPU only at 4,096 batch tokens, and makes a 1.3 GB
# adapter for which vLLM reserves memory in every LoRA slot (--max-lora-rank 256), while r64
# stays within 2 GiB of r16's memory (RESULTS.md, "Rank by base size").
SMALL_BASE_RANK, LARGE_BASE_RANK, LARGE_BASE = 256, 64, 1_000_000_000
RANK_RULE = (
    f"{SMALL_BASE_RANK} for a base under {LARGE_BASE / 1e9:g} B parameters, "
    f"{LARGE_BASE_RANK} from {LARGE_BASE / 1e9:g} B up"
)


TRAIN_DESCRIPTION = (
    "LoRA SFT of a persona adapter. The defaults are the recipe that scored best on held-out "
    "role-play dialogues: rsLoRA, alpha 16, all linear layers, learning rate 5e-4 with 5% "
    "warm-up, 4 epochs (add the other personas' dialogues to --data, each with its own system "
    f"prompt, as the recipe did). Rank by base size: {RANK_RULE}; r256 scored best on the "
    "135M default model (a 156 MB adapter), while on an 8B base it holds on one 80 GB GPU only "
    "at 4,096 batch tokens, costs 8% of r16's throughput and makes a 1.3 GB adapter that vLLM "
    "reserves memory for in every LoRA slot (--max-lora-rank 256); r64 there costs 1% and 336 "
    "MB. A flag given always wins. Batch tokens follow the free memory (at most 8,192); the "
    "run stops before its first step, saying what would help, when not even the longest "
    "dialogue fits."
)


def default_rank(parameters: int) -> int:
    """The LoRA rank for a base model of `parameters` parameters (`RANK_RULE`)."""
    return SMALL_BASE_RANK if parameters < LARGE_BASE else LARGE_BASE_RANK


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "Training dialogues (ShareGPT or OpenAI JSONL)."})
    persona: str = field(
        metadata={"help": "Persona name; recorded in rolecast.json and the output path."}
    )
    base: str = field(
        default="default",
        metadata={
            "help": "Base model: a hub id, a local directory, or `default` (SmolLM2-135M-Instruct)."
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "Adapter directory to write (default: runs/<persona>)."}
    )
    validation_data: str | None = field(
        default=None,
        metadata={"help": "Held-out dialogues; their loss is logged after each epoch."},
    )
    lora_r: int | None = field(
        default=None,
        metadata={"help": f"LoRA rank (default: by the base model's size, {RANK_RULE})."},
    )
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA alpha (scale alpha / sqrt(r) with rsLoRA, else / r)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    use_rslora: bool = field(
        default=True,
        metadata={"help": "Rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r."},
    )
    target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated module names to adapt, or `all-linear` (every linear but the head)."
        },
    )
    target_parameters: str = field(
        default="auto",
        metadata={
            "help": "Comma-separated parameters to adapt (fused MoE expert weights), `auto` (a "
            "mixture-of-experts base's experts: gpt-oss's gate_up_proj and down_proj) or `none`."
        },
    )
    allow_unservable: bool = field(
        default=False,
        metadata={
            "help": "Train targets that vLLM cannot serve for this base model (refused otherwise)."
        },
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_schedule: str = field(
        default="cosine", metadata={"help": f"Schedule: {', '.join(SCHEDULES)}."}
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of steps spent warming up."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    neftune_alpha: float = field(
        default=0.0,
        metadata={
            "help": "NEFTune: uniform noise on the input embeddings while training, "
            "scaled alpha / sqrt(length * hidden size); 5 is the paper's usual value (0 = off)."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."}
    )
    epochs: float = field(default=4.0, metadata={"help": "Passes over the data."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimizer steps (-1 = epochs decide)."}
    )
    max_length: int = field(
        default=2048, metadata={"help": "Longest dialogue in tokens; longer ones stop training."}
    )
    batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per packed micro-batch (per GPU); default: as many as the free "
            "memory holds (RAM on a CPU, GPU memory on a GPU), at most 8192, at least the "
            "longest dialogue."
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    packing: bool = field(
        default=True,
        metadata={"help": "Pack dialogues padding-free (else padded batches of --batch_size)."},
    )
    batch_size: int = field(
        default=4, metadata={"help": "Dialogues per padded batch (only without packing)."}
    )
    attention: str = field(default="auto", metadata={"help": f"Attention: {', '.join(ATTENTION)}."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations to save memory."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for shuffling and LoRA init."})
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every N steps (0 = at each epoch end)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints to keep."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from the latest checkpoint in --output."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.lora_r is not None and self.lora_r <= 0:
            problems.append("--lora_r must be positive")
        if self.lora_alpha <= 0:
            problems.append("--lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append("--lora_dropout must be in [0, 1)")
        if self.learning_rate <= 0:
            problems.append("--learning_rate must be positive")
        if self.lr_schedule not in SCHEDULES:
            problems.append(f"--lr_schedule must be one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("--warmup_ratio must be in [0, 1)")
        if self.neftune_alpha < 0:
            problems.append("--neftune_alpha must not be negative")
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("--epochs or --max_steps must be positive")
        if self.max_length < 16:
            problems.append("--max_length must be at least 16")
        if self.packing and self.batch_tokens is not None and self.batch_tokens < self.max_length:
            problems.append(
                "--batch_tokens must be at least --max_length, or the longest dialogues do not fit"
            )
        if self.grad_accum < 1 or self.batch_size < 1:
            problems.append("--grad_accum and --batch_size must be at least 1")
        if self.attention not in ATTENTION:
            problems.append(f"--attention must be one of {', '.join(ATTENTION)}")
        if self.save_total_limit < 1:
            problems.append("--save_total_limit must be at least 1")
        if not self.persona.strip() or "/" in self.persona:
            problems.append("--persona must be a plain name")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.output is None:
            self.output = f"runs/{self.persona}"

    @property
    def modules(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_train_args(args: list[str], prog: str = "rolecast train") -> TrainConfig:
    """Flags to a TrainConfig, with transformers' HfArgumentParser (dataclass fields -> flags)."""
    return parse_train_command(args, prog)[0]


def parse_train_command(args: list[str], prog: str = "rolecast train") -> tuple[TrainConfig, bool]:
    """The TrainConfig and whether `--json` asked for JSON lines (`finetune.progress`) instead
    of the progress bar and summary; `--json` is how the run reports, not a training setting,
    so it is kept out of the config (and of the manifest)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        TrainConfig,  # type: ignore[arg-type]  # DataClassType is a NewType over any dataclass
        prog=prog,
        description=TRAIN_DESCRIPTION,
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print progress and the result as JSON lines on stdout, one object per line with "
        "a `type` (start, progress, validation, checkpoint, result, error), for programs that "
        "follow the run; no progress bar.",
    )
    config, extra = parser.parse_args_into_dataclasses(args=args)
    return config, bool(extra.json)
