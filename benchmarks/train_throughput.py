"""LoRA SFT throughput: plain transformers + PEFT against `rolecast train`'s path, in one run.

Model: Llama-3.1-8B's shape (random init, bf16; speed does not depend on the weights).
Data: role-play-like dialogues, log-normal lengths clipped to 150-2,048 tokens, a system prompt
and alternating user/assistant turns; the loss covers the assistant turns.

- baseline: padded batches of 4 dialogues, gradient checkpointing, sdpa attention, the model's
  own loss over the full vocabulary at every position (what a plain transformers + PEFT loop does);
- rolecast: the functions `rolecast train` runs (packing, varlen attention, logits only at
  labelled positions), no gradient checkpointing, `--batch_tokens` per step.

Both use LoRA r=16, alpha=32, all linear layers, AdamW, bf16 autocast with fp32 adapter weights.
Real tokens/s counts dialogue tokens, not padding; MFU counts 4*N FLOPs per token (forward plus
backward to the activations; the frozen weights get no gradient) against 989 TFLOP/s (H100 SXM
dense bf16). Prints one JSON object per line.

    python benchmarks/train_throughput.py                  # on one GPU
    python benchmarks/train_throughput.py --layers 2 --hidden 256 --vocab 1024 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.adapter import keep_input_dtype, lora_config
from finetune.attention import VARLEN, choose_attention
from finetune.config import TrainConfig
from finetune.loop import batch_loss
from finetune.packing import collate_packed, collate_padded, packed_batches
from finetune.template import IGNORE_INDEX, Encoded

PEAK_FLOPS = 989e12
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def roleplay_samples(
    n: int, vocab: int, seed: int, low: int = 150, high: int = 2048
) -> list[Encoded]:
    """Dialogues with log-normal total length and assistant-labelled turns."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = int(min(high, max(low, rng.lognormvariate(math.log(600), 0.7))))
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] * length
        pos = min(length - 8, rng.randint(60, 140))  # system prompt
        user = True
        while pos < length:
            turn = max(8, int(rng.lognormvariate(math.log(60 if user else 90), 0.6)))
            if not user:
                labels[pos : pos + turn] = ids[pos : pos + turn]
            pos += turn
            user = not user
        samples.append(Encoded(ids, labels[:length]))
    return samples


def build_model(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.config.use_cache = False
    return model


def run(model: Any, batches: list[Any], step_fn: Any, warmup: int) -> dict[str, Any]:
    """Train on `batches` with AdamW; real and padded tokens/s and peak memory after `warmup`
    steps (bf16 autocast on a GPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = padded = 0
    start = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
            tokens = padded = 0
        batch = batch.to(DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss = step_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.n_tokens
        padded += batch.input_ids.numel()
    sync()
    seconds = time.perf_counter() - start
    return {
        "steps": len(batches) - warmup,
        "seconds": round(seconds, 3),
        "real_tokens": tokens,
        "padded_tokens": padded,
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if DEVICE == "cuda"
        else None,
    }


def baseline_step(model: Any, batch: Any) -> torch.Tensor:
    labels = batch.labels.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=labels,
        use_cache=False,
    ).loss


def check_packed_equals_padded(samples: list[Encoded], vocab: int) -> dict[str, Any]:
    """On a small model: varlen packed loss == sdpa padded loss (same tokens, same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(DEVICE).float()
    attn = choose_attention("auto")
    small = samples[:6]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        padded, n1 = batch_loss(model, collate_padded(small, 0).to(DEVICE), varlen=False)
        packed_sdpa, n2 = batch_loss(model, collate_packed(small).to(DEVICE), varlen=False)
        model.set_attn_implementation(attn)
        packed_varlen, n3 = batch_loss(
            model, collate_packed(small).to(DEVICE), varlen=attn == VARLEN
        )
    ref = float(padded) / n1
    return {
        "check": "packed_vs_padded_loss",
        "attention": attn,
        "padded_sdpa": round(ref, 6),
        "packed_sdpa_rel_diff": abs(float(packed_sdpa) / n2 - ref) / ref,
        "packed_fast_rel_diff": abs(float(packed_varlen) / n3 - ref) / ref,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[16],
        help="LoRA ranks of the rolecast variants (the baseline uses the first)",
    )
    parser.add_argument(
        "--rslora",
        action="store_true",
        help="The README's recipe: rsLoRA scaling with alpha 16 (default: alpha = 2 x rank)",
    )
    args = parser.parse_args()

    from peft import get_peft_model

    samples = roleplay_samples(2000, args.vocab, seed=0)
    emit(
        device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        **_versions(),
    )
    emit(**check_packed_equals_padded(samples, args.vocab))

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())

    def config(rank: int) -> TrainConfig:
        return TrainConfig(
            data="-",
            persona="bench",
            lora_r=rank,
            lora_alpha=16 if args.rslora else 2 * rank,
            use_rslora=args.rslora,
            lora_dropout=0.0,
            batch_tokens=max(args.batch_tokens),
            max_length=2048,
        )

    cfg = config(args.ranks[0])
    lengths = [len(s) for s in samples]
    emit(
        model_params=n_params,
        dialogues=len(samples),
        mean_tokens=round(sum(lengths) / len(lengths), 1),
        label_fraction=round(sum(s.n_labels for s in samples) / sum(lengths), 3),
    )

    def report(name: str, result: dict[str, float], **extra: Any) -> None:
        mfu = result["tokens_per_s"] * 4 * n_params / PEAK_FLOPS
        emit(variant=name, **extra, **result, mfu_4n=round(mfu, 4))

    results: dict[str, float] = {}
    cursor = 0
    if not args.skip_baseline:
        peft_model = get_peft_model(model, lora_config(cfg, model))
        keep_input_dtype(peft_model)
        peft_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        peft_model.enable_input_require_grads()
        n = (args.warmup + args.steps) * 4
        batches = [collate_padded(samples[i : i + 4], 0) for i in range(cursor, cursor + n, 4)]
        cursor += n
        try:
            res = run(peft_model, batches, baseline_step, args.warmup)
            results["baseline"] = res["tokens_per_s"]
            report(
                "baseline", res, batch="padded x4", gradient_checkpointing=True, attention="sdpa"
            )
        except torch.cuda.OutOfMemoryError as exc:
            emit(variant="baseline", error=f"out of memory: {str(exc)[:200]}")
        peft_model.gradient_checkpointing_disable()
        model = peft_model.unload()
        del peft_model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    attn = choose_attention("auto")
    model.set_attn_implementation(attn)
    for rank, batch_tokens in [(r, b) for r in args.ranks for b in args.batch_tokens]:
        cfg = config(rank)
        peft_model = get_peft_model(model, lora_config(cfg, model))
        adapter_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        keep_input_dtype(peft_model)
        pool = samples[cursor : cursor + 400]
        bins = packed_batches(pool, batch_tokens, seed=0, epoch=0)[: args.warmup + args.steps]
        batches = [collate_packed([pool[i] for i in b]) for b in bins]

        def step(m: Any, b: Any) -> torch.Tensor:
            loss, n = batch_loss(m, b, varlen=attn == VARLEN)
            return loss / max(1, n)

        try:
            res = run(peft_model, batches, step, args.warmup)
            results[f"rolecast_r{rank}_{batch_tokens}"] = res["tokens_per_s"]
            report(
                f"rolecast (r={rank}, batch_tokens={batch_tokens})",
                res,
                lora_rank=rank,
                rslora=args.rslora,
                adapter_params=adapter_params,
                adapter_mb_bf16=round(adapter_params * 2 / 1e6, 1),
                batch="packed",
                gradient_checkpointing=False,
                attention=attn,
                speedup=round(res["tokens_per_s"] / results["baseline"], 2)
                if "baseline" in results
                else None,
            )
        except torch.cuda.OutOfMemoryError as exc:
            emit(
                variant=f"rolecast (r={rank}, batch_tokens={batch_tokens})",
                error=f"out of memory: {str(exc)[:200]}",
            )
        model = peft_model.unload()
        del peft_model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    emit(summary=results)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
