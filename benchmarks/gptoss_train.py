"""gpt-oss LoRA SFT throughput: plain transformers + PEFT against `rolecast train`'s path, in one
run, on a gpt-oss model directory (the stand-in of `finetune.standin`: gpt-oss-20b's public
config, random weights; speed does not depend on the weights or on which token ids the text
has). Prints one JSON object per line.

- checks first (GPU): the flash varlen kernel with sinks and a sliding window against the
  reference kernel (values and gradients of q, k, v and the sinks), and the model's packed loss
  (flash) against its padded loss (transformers' eager attention) on a few dialogues;
- baseline: transformers + PEFT as one writes them plainly: eager attention (gpt-oss has no
  sdpa), padded batches of `--batch-size` dialogues, gradient checkpointing, the model's own
  loss over the whole vocabulary, LoRA on q/k/v/o and on the fused experts through PEFT's
  `target_parameters` (PEFT's own expert path);
- rolecast: the model `rolecast train` builds (`finetune.adapter.build_model`: varlen flash
  attention with sinks, LoRA on the experts' activations) and its loss (`finetune.loop`:
  packed rows of `--batch-tokens`, logits only where a label is), no checkpointing.

Both: the same LoRA (r, alpha, targets), AdamW, bf16 with fp32 adapter weights, the same
dialogues (`--data`, tokenized with the model's harmony template, assistant-only labels).
Real tokens/s counts dialogue tokens, not padding. MFU counts 4 x N_active FLOPs per token
(forward, and backward to the activations: the frozen weights get no gradient), N_active = the
matmul parameters a token passes through (attention, router, 4 of 32 experts, the head; not the
input embedding), against 989 TFLOP/s (H100/H200 dense bf16).

    python -m finetune.standin gpt-oss-20b /tmp/gpt-oss-20b --corpus data/*.jsonl --device cuda
    python -m rolecast data clean data/haruhi.jsonl -o /tmp/haruhi.jsonl --base /tmp/gpt-oss-20b
    python benchmarks/gptoss_train.py --base /tmp/gpt-oss-20b --data /tmp/haruhi.jsonl
    python benchmarks/gptoss_train.py --base TINY_DIR --data data/xin.jsonl --steps 2 --warmup 1 \\
        --batch-tokens 1024 --max-length 512      # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_throughput import run  # the same timed loop as the Llama benchmark

from finetune.adapter import build_model
from finetune.attention import FLASH, REFERENCE, VARLEN, sink_attention, varlen_available
from finetune.config import TrainConfig
from finetune.data import load_dialogues
from finetune.loop import batch_loss
from finetune.models import load_tokenizer
from finetune.moe import EXPERT_PARAMETERS, quantization_kwargs
from finetune.packing import collate_packed, collate_padded, packed_batches
from finetune.standin import parameter_counts
from finetune.template import IGNORE_INDEX, Encoded, encode

PEAK_FLOPS = 989e12
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def free() -> None:
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def check_sink_kernel() -> dict[str, Any]:
    """The flash composition against the reference kernel on gpt-oss's head layout (64 query
    heads, 8 key/value heads, 64 dims), packed sequences, a window of 128 and sinks."""
    torch.manual_seed(0)
    lengths = [300, 700, 1200]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, 64, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(64, device=DEVICE, requires_grad=True)
    grad = torch.randn(total, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    record: dict[str, Any] = {"check": "flash_sinks_vs_reference"}
    for window in ((127, 0), (-1, 0)):
        results = []
        for kernel in (FLASH, REFERENCE):
            out = sink_attention(q, k, v, sinks, cu.to(DEVICE), max(lengths), None, window, kernel)
            grads = torch.autograd.grad(out, (q, k, v, sinks), grad)
            results.append((out, *grads))
        name = "window127" if window[0] > 0 else "full"
        for label, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), *results, strict=True):
            scale = float(b.float().abs().max()) or 1.0
            record[f"{name}_{label}_rel_max_err"] = round(
                float((a.float() - b.float()).abs().max()) / scale, 5
            )
    return record


def check_packed_equals_padded(model: Any, samples: list[Encoded], pad_id: int) -> dict[str, Any]:
    """The rolecast model's packed loss (its attention) against its padded loss (eager)."""
    small = samples[:4]
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=GPU):
        packed, n1 = batch_loss(model, collate_packed(small).to(DEVICE), varlen=True)
        model.set_attn_implementation("eager")
        padded, n2 = batch_loss(model, collate_padded(small, pad_id).to(DEVICE), varlen=False)
        model.set_attn_implementation(VARLEN)
    ref = float(padded) / n2
    return {
        "check": "packed_vs_padded_loss",
        "padded_eager": round(ref, 5),
        "packed_rel_diff": abs(float(packed) / n1 - ref) / ref,
        "labels": n1,
    }


def take(samples: list[Encoded], start: int, count: int) -> list[Encoded]:
    """`count` dialogues from `start`, going round the list again if it is short."""
    return [samples[(start + i) % len(samples)] for i in range(count)]


def baseline(args: argparse.Namespace, samples: list[Encoded], pad_id: int) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(
        args.base,
        dtype=torch.bfloat16 if GPU else torch.float32,
        attn_implementation="eager",
        device_map=DEVICE,
        **quantization_kwargs(config),
    )
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=list(EXPERT_PARAMETERS["gpt_oss"]),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.enable_input_require_grads()
    n = (args.warmup + args.steps) * args.batch_size
    batches = [
        collate_padded(take(samples, i, args.batch_size), pad_id)
        for i in range(0, n, args.batch_size)
    ]

    def step(m: Any, b: Any) -> torch.Tensor:
        labels = b.labels.masked_fill(b.attention_mask == 0, IGNORE_INDEX)
        return m(  # type: ignore[no-any-return]
            input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels, use_cache=False
        ).loss

    try:
        result = run(peft_model, batches, step, args.warmup)
    except torch.cuda.OutOfMemoryError as exc:
        result = {"error": f"out of memory: {str(exc)[:200]}"}
    del peft_model, model
    free()
    return result


def rolecast(
    args: argparse.Namespace, samples: list[Encoded], pad_id: int, batch_tokens: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    cfg = TrainConfig(
        data="-",
        persona="bench",
        base=args.base,
        lora_r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        batch_tokens=batch_tokens,
        max_length=args.max_length,
    )
    built = build_model(cfg, gpu=GPU)
    model, varlen, attention = built.model.to(DEVICE), built.varlen, built.attention
    del built
    check = check_packed_equals_padded(model, samples, pad_id) if args.checks else None
    # the dialogues the baseline trained on, then on: the same kind of data, packed
    pool = take(samples, 0, len(samples) * 4)
    bins = packed_batches(pool, batch_tokens, seed=0, epoch=0)[: args.warmup + args.steps]
    batches = [collate_packed([pool[i] for i in b]) for b in bins]

    def step(m: Any, b: Any) -> torch.Tensor:
        loss, n = batch_loss(m, b, varlen=varlen)
        return loss / max(1, n)

    try:
        result = run(model, batches, step, args.warmup)
        result["attention"] = attention
    except torch.cuda.OutOfMemoryError as exc:
        result = {"error": f"out of memory: {str(exc)[:200]}"}
    del model
    free()
    return result, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="a gpt-oss model directory")
    parser.add_argument(
        "--data", required=True, nargs="+", help="ShareGPT JSONL dialogues (`rolecast data clean`)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="dialogues per padded batch")
    # 16,384 does not fit on a 141 GB H200 without checkpointing (measured: out of memory)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-checks", dest="checks", action="store_false")
    args = parser.parse_args()

    import peft
    import transformers

    emit(
        device=torch.cuda.get_device_name(0) if GPU else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        flash_varlen=varlen_available(),
    )
    if args.checks and GPU:
        emit(**check_sink_kernel())
    tokenizer = load_tokenizer(args.base)
    samples: list[Encoded] = []
    for path in args.data:
        for d in load_dialogues(path, None, 10**9):
            s = encode(tokenizer, d.messages)
            if 16 <= len(s) <= args.max_length and s.n_labels:
                samples.append(s)
    config = json.loads((Path(args.base) / "config.json").read_text())
    counts = parameter_counts(config)
    lengths = [len(s) for s in samples]
    emit(
        model=config.get("model_type"),
        layers=config["num_hidden_layers"],
        experts=config["num_local_experts"],
        params_total=counts["total"],
        params_active=counts["active"],
        dialogues=len(samples),
        mean_tokens=round(sum(lengths) / max(1, len(lengths)), 1),
        label_fraction=round(sum(s.n_labels for s in samples) / max(1, sum(lengths)), 3),
    )

    def report(name: str, result: dict[str, Any], **extra: Any) -> None:
        if "tokens_per_s" in result:
            result["mfu_4n_active"] = round(
                result["tokens_per_s"] * 4 * counts["active"] / PEAK_FLOPS, 4
            )
        emit(variant=name, **extra, **result)

    results: dict[str, float] = {}
    if not args.skip_baseline:
        res = baseline(args, samples, tokenizer.pad_token_id)
        report("baseline", res, batch=f"padded x{args.batch_size}", checkpointing=True)
        if "tokens_per_s" in res:
            results["baseline"] = res["tokens_per_s"]
    for batch_tokens in args.batch_tokens:
        res, check = rolecast(args, samples, tokenizer.pad_token_id, batch_tokens)
        if check is not None:
            emit(**check)
            args.checks = False  # once
        speedup = (
            round(res["tokens_per_s"] / results["baseline"], 2)
            if "baseline" in results and "tokens_per_s" in res
            else None
        )
        report(
            f"rolecast (batch_tokens={batch_tokens})",
            res,
            batch="packed",
            checkpointing=False,
            speedup=speedup,
        )
        if "tokens_per_s" in res:
            results[f"rolecast_{batch_tokens}"] = res["tokens_per_s"]
    emit(summary=results)


if __name__ == "__main__":
    main()
