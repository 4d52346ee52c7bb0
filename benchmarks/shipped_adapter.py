"""The adapter that ships for the default model: one small LoRA that plays every shipped persona.

One command reproduces it (on a GPU; the trainings are those `rolecast train` runs):

    python benchmarks/shipped_adapter.py --data-dir ../shared/data/roleplay --work runs/shipped \
        --output runs/shipped/export

1. Each persona's file is cleaned and split (10% held out, seed 42), as `train_quality.py` does.
2. Selection. Every candidate is small enough to ship (its weights in bf16 at most `--max-mb`)
   and is trained on haruhi's training portion less a carved validation split, plus the other
   personas' training portions (the recipe's mixed data). Each candidate's greedy replies to
   the carved split are scored. The smallest candidate that reaches BLEU-4 >= 8 and
   ROUGE-L >= 25 wins; if none does, the best by min(BLEU-4 / 8, ROUGE-L / 25). The held-out
   split is not looked at before the choice.
3. The winner is trained again on the three personas' whole training portions, and scored once
   on each persona's held-out split: greedy, beside the base model and beside `rolecast train`'s
   default settings trained on that persona alone; then the chat's sampled decodings (`DECODINGS`)
   on the same split, from which the chat defaults are chosen.
4. The adapter is written to `--output` in bf16, without tokenizer files, with its manifest
   (`rolecast.json`: data hashes, settings, selection table, held-out scores).

Prints one JSON object per line; `<work>/results.json` keeps them all. Steps whose output
exists are skipped, so a run cut short resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_consistency import classifier_for
from train_quality import mixed_data, prepare, score, select_split, sh

from finetune.data import file_sha256
from finetune.evaluate import read_predictions

PERSONAS = ("haruhi", "atri", "xin")
TARGET = {"bleu-4": 8.0, "rouge-l": 25.0}
COMMON = ["--max_length", "4096", "--batch_tokens", "8192", "--seed", "42", "--no_progress"]


def recipe(rank: int, lr: str, epochs: str = "4") -> list[str]:
    """The README's recipe (rsLoRA, alpha 16, all linear layers, cosine with 5% warm-up) at a
    smaller rank."""
    return [
        "--lora_r", str(rank), "--lora_alpha", "16", "--use_rslora", "true",
        "--lora_dropout", "0.05", "--learning_rate", lr, "--epochs", epochs,
        "--warmup_ratio", "0.05", *COMMON,
    ]  # fmt: skip


# Ordered by size, then learning rate: the first that reaches the target is the smallest.
CANDIDATES: dict[str, tuple[int, list[str]]] = {
    "rs8-lr5e-4": (8, recipe(8, "5e-4")),
    "rs8-lr1e-3": (8, recipe(8, "1e-3")),
    "rs16-lr5e-4": (16, recipe(16, "5e-4")),
    "rs16-lr1e-3": (16, recipe(16, "1e-3")),
    "rs32-lr5e-4": (32, recipe(32, "5e-4")),
    "rs32-lr1e-3": (32, recipe(32, "1e-3")),
    # a second round around the first round's best
    "rs16-lr2e-3": (16, recipe(16, "2e-3")),
    "rs32-lr2e-3": (32, recipe(32, "2e-3")),
    "rs32-lr1e-3-e3": (32, recipe(32, "1e-3", "3")),
    "rs32-lr1e-3-e6": (32, recipe(32, "1e-3", "6")),
}
# `rolecast train`'s settings before the recipe became its default (what the retrain loop used),
# trained on one persona alone.
DEFAULTS = [
    "--lora_r", "16", "--lora_alpha", "32", "--use_rslora", "false", "--learning_rate", "2e-4",
    "--epochs", "3", "--warmup_ratio", "0.03", "--batch_tokens", "8192",
    "--max_length", "4096", "--seed", "42", "--no_progress",
]  # fmt: skip


# The chat's decodings, all with the chat's 200-token limit: greedy, and sampled ones around the
# bot's defaults (temperature 0.7, top-p 0.9, repetition penalty 1.1), two seeds each.
def sampled(temperature: str, penalty: str, seed: int) -> list[str]:
    return [
        "--max-new-tokens", "200", "--sample", "--temperature", temperature, "--top-p", "0.9",
        "--repetition-penalty", penalty, "--seed", str(seed),
    ]  # fmt: skip


DECODINGS: dict[str, list[str]] = {
    "greedy-200": ["--max-new-tokens", "200"],
    "greedy-200-rp1.1": ["--max-new-tokens", "200", "--repetition-penalty", "1.1"],
    **{
        f"t{t}-p0.9-rp{rp}-s{seed}": sampled(t, rp, seed)
        for t, rp in (("0.7", "1.1"), ("0.7", "1.0"), ("0.5", "1.1"), ("0.3", "1.1"))
        for seed in (0, 1)
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def tiny_base(directory: Path) -> Path:
    """A two-layer random Llama with the default model's tokenizer, for `--smoke`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.models import DEFAULT_BASE, resolve

    if not (directory / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_BASE))
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def emit(results: list[dict[str, Any]], **record: Any) -> None:
    results.append(record)
    print(json.dumps(record, ensure_ascii=False), flush=True)


# `--smoke` appends these: a run of the whole pipeline in minutes on a CPU, to try it first.
SMOKE = {"train": [], "eval": []}


def train(data: Path, validation: Path, persona: str, out: Path, flags: list[str]) -> Path:
    if not (out / "rolecast.json").exists():
        resume = ["--resume", "true"] if any(out.glob("checkpoints/*")) else []
        sh(
            "train", "--data", str(data), "--validation_data", str(validation),
            "--persona", persona, "--output", str(out), *flags, *resume, *SMOKE["train"],
        )  # fmt: skip
    return out


def predict(data: Path, adapter: Path, out: Path, flags: list[str], base: bool = False) -> Path:
    predictions = out / "predictions.jsonl"
    if not predictions.exists():
        sh(
            "eval", "--data", str(data), "--adapter", str(adapter), "--output", str(out),
            "--no-score", *flags, *([] if base else ["--no-base-replies"]), *SMOKE["eval"],
        )  # fmt: skip
    return predictions


def weights_mb(adapter: Path) -> float:
    """Size of the adapter's weights in bf16, from the safetensors header."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return round(numel * 2 / 1e6, 2)


def run_all(jobs: list[Callable[[], Any]], workers: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def choose(table: list[dict[str, Any]], max_mb: float) -> dict[str, Any]:
    """The smallest candidate that fits and reaches the target; else the best that fits."""
    fits = [row for row in table if row["mb_bf16"] <= max_mb]
    reaching = [r for r in fits if all(r[m] >= t for m, t in TARGET.items())]
    if reaching:
        return min(reaching, key=lambda r: (r["mb_bf16"], -r["merit"]))
    return max(fits, key=lambda r: r["merit"])


def export(adapter: Path, output: Path, extra: dict[str, Any]) -> None:
    """`adapter` in bf16, without tokenizer files, with `extra` added to its manifest."""
    import torch
    from safetensors.torch import load_file, save_file

    output.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
        str(output / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    (output / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    from formats.manifest import read_manifest, write_manifest

    manifest = read_manifest(adapter).model_copy(update={**extra, "dtype": "bfloat16"})
    write_manifest(output, manifest)
    for name in ("loss.png", "loss.jsonl"):
        if (adapter / name).exists():
            shutil.copy2(adapter / name, output / name)
    assert not any((output / n).exists() for n in TOKENIZER_FILES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/roleplay",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/shipped"))
    parser.add_argument("--output", type=Path, default=Path("runs/shipped/export"))
    parser.add_argument("--max-mb", type=float, default=25.0, help="Largest shippable size.")
    parser.add_argument("--parallel", type=int, default=9, help="Trainings side by side.")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="These candidates.")
    parser.add_argument(
        "--decodings", nargs="*", choices=sorted(DECODINGS), help="Chat decodings scored (all)."
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Score the run under --work again and rewrite --output's manifest (no training).",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 training steps, 4 short replies: try the pipeline."
    )
    args = parser.parse_args()

    if args.report_only:
        report_only(args)
        return
    work, results = args.work, []
    if args.smoke:
        base = str(tiny_base(work / "tiny-base"))
        SMOKE.update(
            train=["--max_steps", "2", "--base", base],
            eval=["--limit", "4", "--max-new-tokens", "8"],
        )
    lock = threading.Lock()
    for persona in PERSONAS:
        prepare(args.data_dir, work, persona)
    train_of = {p: work / f"{p}.clean_train.jsonl" for p in PERSONAS}
    held_of = {p: work / f"{p}.clean_validation.jsonl" for p in PERSONAS}
    sel_train, sel_val = select_split(work, "haruhi")
    sel_mix = mixed_data(sel_train, work, "haruhi", list(PERSONAS))
    names = args.only or list(CANDIDATES)

    def candidate(name: str) -> Callable[[], Path]:
        def job() -> Path:
            run = train(sel_mix, sel_val, "haruhi", work / "select" / name, CANDIDATES[name][1])
            return predict(sel_val, run, run / "eval-greedy", [])

        return job

    def defaults(persona: str) -> Callable[[], Path]:
        def job() -> Path:
            run = train(
                train_of[persona], held_of[persona], persona, work / "defaults" / persona, DEFAULTS
            )
            return predict(held_of[persona], run, run / "eval-greedy", [], base=True)

        return job

    # Stage 1: the candidates on the carved split, and the per-persona defaults (whose held-out
    # evaluation also gives the base model's replies), side by side.
    run_all([candidate(n) for n in names] + [defaults(p) for p in PERSONAS], args.parallel)
    table = []
    for name in names:
        run = work / "select" / name
        scores = score(run / "eval-greedy" / "predictions.jsonl")["adapter"]
        merit = min(scores[m] / t for m, t in TARGET.items())
        manifest = json.loads((run / "rolecast.json").read_text(encoding="utf-8"))
        row = {
            "candidate": name,
            "rank": CANDIDATES[name][0],
            "mb_bf16": weights_mb(run),
            "merit": round(merit, 4),
            **scores,
            "validation_loss": manifest["metrics"].get("validation_loss"),
            "train_time_s": manifest.get("train_time_s"),
        }
        with lock:
            emit(results, stage="selection", split="carved validation (haruhi)", **row)
        table.append(row)
    chosen = choose(table, args.max_mb)
    emit(results, stage="chosen", **chosen)

    # Stage 2: the chosen settings on the whole training portions, scored on the held-out splits.
    full_mix = mixed_data(train_of["haruhi"], work, "haruhi", list(PERSONAS))
    final = train(full_mix, held_of["haruhi"], "haruhi", work / "final" / chosen["candidate"],
                  CANDIDATES[chosen["candidate"]][1])  # fmt: skip
    chat = DECODINGS if args.decodings is None else {d: DECODINGS[d] for d in args.decodings}
    decodings = {"greedy": [], **chat}  # greedy at eval's usual limit, as `defaults` had
    run_all(
        [
            (lambda p=p, d=d: predict(held_of[p], final, final / f"eval-{p}-{d}", decodings[d]))
            for p in PERSONAS
            for d in decodings
        ],
        args.parallel,
    )
    for p in PERSONAS:
        for d in chat:
            scores = score(final / f"eval-{p}-{d}" / "predictions.jsonl")["adapter"]
            emit(results, stage="held-out", persona=p, model="shipped", decoding=d, **scores)
    held_out = held_out_report(work, final)
    for p, models in held_out.items():
        for model, scores in models.items():
            emit(results, stage="held-out", persona=p, model=model, decoding="greedy", **scores)
    extra = {
        "persona": None,  # it plays several: `personas`
        "system_prompt": None,  # each persona's comes from its card
        "personas": list(PERSONAS),
        "selection": {"target": TARGET, "max_mb": args.max_mb, "table": table, "chosen": chosen},
        "scores": {"held_out_greedy": held_out},
        "sources": sources(args.data_dir),
        "reproduce": REPRODUCE,
    }
    export(final, args.output, extra)
    emit(results, stage="exported", output=str(args.output), mb=weights_mb(args.output))
    (work / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")


REPRODUCE = "python benchmarks/shipped_adapter.py --data-dir DATA --work runs/shipped"


def held_out_report(work: Path, final: Path) -> dict[str, dict[str, Any]]:
    """Per persona, greedy on its held-out split: BLEU/ROUGE and persona consistency of the base
    model, of `rolecast train`'s defaults, and of the shipped adapter (`final`)."""
    classifier = classifier_for(work)
    report: dict[str, dict[str, Any]] = {}
    for p in PERSONAS:
        defaults = work / "defaults" / p / "eval-greedy" / "predictions.jsonl"
        columns = {
            "base": (defaults, "base"),
            "defaults": (defaults, "adapter"),
            "shipped": (final / f"eval-{p}-greedy" / "predictions.jsonl", "adapter"),
        }
        report[p] = {}
        for model, (path, column) in columns.items():
            records = read_predictions(path)
            replies = [r[column] for r in records]
            consistency = classifier.score(p, replies).to_json()
            report[p][model] = {
                **{k: round(v, 2) for k, v in score(path)[column].items()},
                "recognised": consistency["recognised"],
                "own_probability": consistency["own_probability"],
            }
    return report


def sources(data_dir: Path) -> dict[str, dict[str, str]]:
    """The role-play files the adapter was made from, with their hashes."""
    return {
        p: {"file": f"{p}.jsonl", "sha256": file_sha256(data_dir / f"{p}.jsonl")} for p in PERSONAS
    }


def report_only(args: argparse.Namespace) -> None:
    """Score an exported adapter's run again and rewrite its manifest's scores and sources."""
    from formats.manifest import read_manifest, write_manifest

    manifest = read_manifest(args.output)
    chosen = (manifest.model_extra or {})["selection"]["chosen"]["candidate"]
    held_out = held_out_report(args.work, args.work / "final" / chosen)
    update = {
        "scores": {"held_out_greedy": held_out},
        "sources": sources(args.data_dir),
        "reproduce": REPRODUCE,
        "persona": None,
        "system_prompt": None,
    }
    manifest = manifest.model_copy(update=update)
    (manifest.model_extra or {}).pop("training_files", None)  # an earlier name of `sources`
    write_manifest(args.output, manifest)
    print(json.dumps(held_out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
