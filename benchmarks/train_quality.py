"""Quality of persona adapters on the default base model: clean, split, train, predict, score.

For each persona file (haruhi, atri, xin by default) this runs the same commands a user runs:

    rolecast data clean  DATA/P.jsonl -o WORK/P.clean.jsonl --max-length 4096
    rolecast data split  WORK/P.clean.jsonl -o WORK --validation 0.1 --seed 42
    rolecast train --data WORK/P.clean_train.jsonl --validation_data WORK/P.clean_validation.jsonl \
                   --persona P --output WORK/P [SETTINGS]
    rolecast eval  --data WORK/P.clean_validation.jsonl --adapter WORK/P --output WORK/P/eval

The validation split is held out from training; its last replies are what is scored.
`--no-score` saves predictions only (for a GPU host without the metric packages);
`--score-only WORK` scores saved predictions later. Prints one JSON object per persona.

`--select` first chooses the settings among CANDIDATES on a validation split carved from the
first persona's training portion (`data split P.clean_train.jsonl --seed 42`): each candidate
is trained on the rest of that portion, its replies at each repetition penalty are scored
there, and the one with the best min(BLEU-4 / 7, ROUGE-L / 25) wins. The held-out split is
not looked at until the chosen settings are trained and evaluated on it, once per persona.
The trainings of a stage run side by side, `--parallel` at a time (a 135M model leaves a GPU
mostly idle); `--select-only` stops after choosing, and a sweep skips candidates already trained.

Candidates ending in `-mix` train on the persona's training portion plus the other personas'
(`--mix-with`), never their held-out rows. `naive-r16-lr2e-4-e3-padded` is the issue's reference
LoRA, for a comparison on the same split. `--model-free` scores two model-free baselines on both
splits: copy the most similar training dialogue's reply, and answer every dialogue with the
training portion's most typical reply (the consensus of all its replies).

`--eval-parallel` bounds the evaluations generating at once, apart from the trainings.

`--seeds 43 44 ...` trains every run again with those seeds (`<run>-s<seed>`), and `--soup`
averages a run's seeds into one adapter (`rolecast soup`, `<run>-soup<K>`) that is scored too.
`--decodings beam4 mbr16` scores beam search and consensus (MBR) decoding besides greedy, each
in `eval-<decoding>`. Every step is skipped when its output exists, so a sweep cut short by a
time limit resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COMMON = ["--max_length", "4096", "--batch_tokens", "8192", "--seed", "42", "--no_progress"]

# The settings of the first published run (kept as the reference candidate).
SETTINGS = [
    "--lora_r", "32", "--lora_alpha", "64", "--use_rslora", "false", "--lora_dropout", "0.05",
    "--learning_rate", "3e-4", "--epochs", "5", "--warmup_ratio", "0.03", *COMMON,
]  # fmt: skip


def _rs(r: int, lr: str, epochs: str, *extra: str) -> list[str]:
    """rsLoRA on all linear layers with alpha 16 (scale 16 / sqrt(r)), cosine with 5% warm-up."""
    return [
        "--lora_r", str(r), "--lora_alpha", "16", "--use_rslora", "true",
        "--lora_dropout", "0.05", "--learning_rate", lr, "--epochs", epochs,
        "--warmup_ratio", "0.05", *extra, *COMMON,
    ]  # fmt: skip


# The reference point, for a same-split comparison: a plain 3-epoch LoRA, rank 16,
# lr 2e-4, padded batches of 4.
NAIVE = [
    "--lora_r", "16", "--lora_alpha", "32", "--use_rslora", "false", "--learning_rate", "2e-4",
    "--epochs", "3", "--warmup_ratio", "0.03", "--packing", "false", "--batch_size", "4",
    "--max_length", "4096", "--seed", "42", "--no_progress",
]  # fmt: skip

CANDIDATES: dict[str, list[str]] = {
    "naive-r16-lr2e-4-e3-padded": NAIVE,
    "r32-lr3e-4-e5": SETTINGS,
    "r32-lr3e-4-e3": [*SETTINGS, "--epochs", "3"],
    "rs64-lr5e-4-e3": _rs(64, "5e-4", "3"),
    "rs64-lr1e-3-e2": _rs(64, "1e-3", "2"),
    "rs64-lr1e-3-e3": _rs(64, "1e-3", "3"),
    "rs64-lr1e-3-e3-wd": _rs(64, "1e-3", "3", "--weight_decay", "0.1", "--lora_dropout", "0.1"),
    "rs64-lr2e-3-e2": _rs(64, "2e-3", "2"),
    "rs128-lr1e-3-e3": _rs(128, "1e-3", "3"),
    "rs128-lr2e-3-e3": _rs(128, "2e-3", "3"),
    "rs64-lr5e-4-e5": _rs(64, "5e-4", "5"),
    "rs64-lr5e-4-e3-neft5": _rs(64, "5e-4", "3", "--neftune_alpha", "5"),
    "rs64-lr1e-3-e3-neft5": _rs(64, "1e-3", "3", "--neftune_alpha", "5"),
    "rs64-lr5e-4-e3-mix": _rs(64, "5e-4", "3"),
    "rs128-lr1e-3-e5": _rs(128, "1e-3", "5"),
    "rs256-lr1e-3-e3": _rs(256, "1e-3", "3"),
    "rs128-lr1e-3-e3-mix": _rs(128, "1e-3", "3"),
    "rs256-lr1e-3-e3-mix": _rs(256, "1e-3", "3"),
    "rs256-lr5e-4-e4-mix": _rs(256, "5e-4", "4"),
    "rs128-lr1e-3-e4-mix": _rs(128, "1e-3", "4"),
    "rs128-lr1e-3-e3-rag3": _rs(128, "1e-3", "3"),
    "rs256-lr5e-4-e4-rag3": _rs(256, "5e-4", "4"),
    "rs64-lr5e-4-e3-rag3": _rs(64, "5e-4", "3"),
}
# Candidates whose training data adds the other personas' training portions (more Chinese
# dialogue for a small model; each row keeps its own persona's system prompt). The other
# personas' held-out rows are never added.
MIXED = {c for c in CANDIDATES if c.endswith("-mix")}
# Candidates whose dialogues carry, in the system prompt, the RETRIEVED most similar exchanges of
# the persona's training portion (never the dialogue itself), as ChatHaruhi does with a
# character's classic scenes. Train and scored files get the same treatment.
RETRIEVED = {c for c in CANDIDATES if c.endswith("-rag3")}
RETRIEVED_K = 3
SELECTED = [
    c for c in CANDIDATES if c not in ("r32-lr3e-4-e5", "naive-r16-lr2e-4-e3-padded")
]  # the sweep; the first run's is known
REPETITION_PENALTIES = ("1.0", "1.1", "1.2")
# Decodings besides greedy at a repetition penalty (`rp<x>`): each is scored in `eval-<name>`.
DECODINGS: dict[str, list[str]] = {
    "beam4": ["--num-beams", "4"],
    "mbr16": ["--samples", "16", "--temperature", "0.7", "--top-p", "0.95", "--batch-size", "16"],
    # 64 samples, every one kept in the predictions: `mbr_selection.py` tries selections on them
    "mbr64": ["--samples", "64", "--temperature", "0.7", "--top-p", "0.95", "--batch-size", "8"],
    "mbr64-t1": ["--samples", "64", "--temperature", "1.0", "--top-p", "0.95", "--batch-size", "8"],
}


def decoding_flags(name: str) -> list[str]:
    if name.startswith("rp"):
        return ["--repetition-penalty", name.removeprefix("rp")]
    return DECODINGS[name]


TARGET = {"bleu-4": 7.0, "rouge-l": 25.0}


# The finetune commands alone, as `rolecast` registers them (a training host needs no bot deps).
RUNNER = (
    "import typer; from finetune.cli import register; app = typer.Typer(); register(app); app()"
)


def sh(*args: str) -> None:
    cmd = [sys.executable, "-c", RUNNER, *args]
    print("+ rolecast " + shlex.join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def prepare(data_dir: Path, work: Path, persona: str) -> None:
    """Clean and split once; the split depends only on the ids and the seed."""
    clean = work / f"{persona}.clean.jsonl"
    if clean.exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    sh(
        "data",
        "clean",
        str(data_dir / f"{persona}.jsonl"),
        "-o",
        str(clean),
        "--max-length",
        "4096",
    )
    sh("data", "split", str(clean), "-o", str(work), "--validation", "0.1", "--seed", "42")


def mixed_data(train: Path, work: Path, persona: str, others: list[str]) -> Path:
    """`train` followed by the training portions of the other personas, as one file."""
    out = train.with_name(train.stem + ".mix.jsonl")
    parts = [train, *(work / f"{o}.clean_train.jsonl" for o in others if o != persona)]
    out.write_text("".join(p.read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    return out


# Evaluations that may generate at once (`--eval-parallel`), whatever the trainings do: a
# 64-sample evaluation of 8 prompts holds about 10 GB of cache, and six generating processes
# beside trainings ran an H100 out of memory.
GENERATING = threading.BoundedSemaphore(2)


def predict(val: Path, run: Path, decodings: tuple[str, ...], base_replies: bool) -> None:
    for name in decodings:
        if (run / f"eval-{name}" / "predictions.jsonl").exists():
            continue  # resumable: made by an earlier, interrupted sweep
        with GENERATING:
            sh(
                "eval", "--data", str(val), "--adapter", str(run),
                "--output", str(run / f"eval-{name}"), *decoding_flags(name), "--no-score",
                *([] if base_replies else ["--no-base-replies"]),
            )  # fmt: skip


def train_and_predict(
    train: Path, val: Path, persona: str, run: Path, flags: list[str], decodings: tuple[str, ...],
    base_replies: bool,
) -> None:  # fmt: skip
    if not (run / "rolecast.json").exists():
        sh(
            "train", "--data", str(train), "--validation_data", str(val), "--persona", persona,
            "--output", str(run), *flags, *(["--resume", "true"] if any(run.glob("checkpoints/*")) else []),
        )  # fmt: skip
    predict(val, run, decodings, base_replies)


def seeded(run: Path, flags: list[str], seeds: list[int]) -> list[tuple[Path, list[str]]]:
    """`run` with its own flags, then one run per extra seed (`<run>-s<seed>`)."""
    return [(run, flags)] + [
        (run.with_name(f"{run.name}-s{s}"), [*flags, "--seed", str(s)]) for s in seeds
    ]


def soup_of(runs: list[Path]) -> Path:
    """The directory of the average of `runs` (the first run's name, `-soup<K>`)."""
    return runs[0].with_name(f"{runs[0].name}-soup{len(runs)}")


def make_soup(runs: list[Path], val: Path, decodings: tuple[str, ...], base_replies: bool) -> Path:
    out = soup_of(runs)
    if not (out / "rolecast.json").exists():
        sh("soup", *map(str, runs), "--output", str(out))
    predict(val, out, decodings, base_replies)
    return out


WORKERS = 3  # trainings side by side on one GPU (eight ran out of memory on an H100)


def parallel(jobs: list[tuple], workers: int = WORKERS) -> None:
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        for future in [pool.submit(train_and_predict, *job) for job in jobs]:
            future.result()


def score(predictions: Path) -> dict[str, dict[str, float]]:
    from finetune.evaluate import read_predictions, write_report

    return write_report(read_predictions(predictions), predictions.parent, predictions.parent.name)


def select_split(work: Path, persona: str) -> tuple[Path, Path]:
    """The selection split: the persona's training portion split again (train, validation)."""
    sel = work / "select"
    sh(
        "data", "split", str(work / f"{persona}.clean_train.jsonl"), "-o", str(sel),
        "--validation", "0.1", "--seed", "42",
    )  # fmt: skip
    return (
        sel / f"{persona}.clean_train_train.jsonl",
        sel / f"{persona}.clean_train_validation.jsonl",
    )


def select(
    work: Path, persona: str, names: list[str], decodings: tuple[str, ...], others: list[str],
    workers: int = WORKERS, seeds: list[int] | None = None, soup: bool = False,
    extra: list[str] | None = None,
) -> tuple[str, str]:  # fmt: skip
    """Train every candidate on part of the training portion; pick on the carved validation.

    With `seeds`, each candidate is also trained once per extra seed, and with `soup` those
    runs are averaged into one more adapter; every run is a row of the table.
    """
    sel = work / "select"
    train, val = select_split(work, persona)
    runs = {
        name: seeded(sel / name, [*CANDIDATES[name], *(extra or [])], seeds or []) for name in names
    }
    parallel(
        [(*data_for(name, train, val, work, persona, others), persona, run, flags, decodings,
          False)
         for name in names for run, flags in runs[name]],  # resumable: done steps are skipped
        workers,
    )  # fmt: skip
    dirs = [run for name in names for run, _ in runs[name]]
    if soup and seeds:
        dirs += [make_soup([r for r, _ in runs[name]], val, decodings, False) for name in names]
    from formats.manifest import read_manifest

    table = []
    for run in dirs:
        manifest = read_manifest(run).to_json()
        for decoding in decodings:
            scores = score(run / f"eval-{decoding}" / "predictions.jsonl")["adapter"]
            merit = min(scores[m] / t for m, t in TARGET.items())
            table.append(
                {"candidate": run.name, "decoding": decoding, "merit": round(merit, 4), **scores,
                 "validation_loss": manifest["metrics"].get("validation_loss")}
            )  # fmt: skip
    best = max(table, key=lambda row: row["merit"])
    (sel / "selection.json").write_text(json.dumps({"best": best, "table": table}, indent=2) + "\n")
    for row in table:
        print(json.dumps(row), flush=True)
    print(json.dumps({"selected": best}), flush=True)
    return best["candidate"], best["decoding"]


def _bigrams(messages: list) -> set[str]:
    text = " ".join(m["content"] for m in messages if m["role"] != "system")
    return {text[i : i + 2] for i in range(len(text) - 1)}


def _nearest(key: set[str], pool: list, k: int, skip: str | None = None) -> list:
    """The k pool entries (id, bigrams, ...) most similar to `key` (Jaccard), `skip` excepted."""
    scored = [(len(key & p[1]) / (1 + len(key | p[1])), n, p) for n, p in enumerate(pool)]
    scored = [x for x in scored if x[2][0] != skip]
    return [p for _, _, p in sorted(scored, key=lambda x: (-x[0], x[1]))[:k]]


def split_items(path: Path) -> list:
    """The scored items of a split file: each dialogue's context and last reply."""
    from finetune.data import load_dialogues
    from finetune.evaluate import eval_items

    return eval_items(load_dialogues(path))


def nearest_reply_baseline(train: list, val: list) -> dict[str, float]:
    """Scores of a model-free baseline: for each scored reply, copy the last reply of the
    training dialogue whose context shares the most character bigrams (Jaccard) with its own.
    It shows how much of a score the data's near-repeats give away without any model."""
    from finetune.metrics import score_corpus

    pool = [(i.row_id, _bigrams(i.context), i.reference) for i in train]
    copied = [_nearest(_bigrams(i.context), pool, 1)[0][2] for i in val]
    return score_corpus(copied, [i.reference for i in val])


def typical_reply_baseline(train: list, val: list) -> tuple[str, dict[str, float]]:
    """The training portion's most typical reply (highest mean ROUGE-L against all its other
    replies: `consensus`) and its scores as the answer to every scored dialogue. It shows how
    much of a score the persona's stock phrases give without looking at the dialogue at all."""
    from finetune.metrics import consensus, score_corpus

    pool = [i.reference for i in train]
    typical = pool[consensus(pool)]
    references = [i.reference for i in val]
    return typical, score_corpus([typical] * len(references), references)


def with_examples(path: Path, bank: Path, k: int = RETRIEVED_K) -> Path:
    """`path` with the k most similar exchanges of `bank` appended to each system prompt.

    The key is the dialogue's context before its last reply (what a served request has); a
    dialogue never retrieves itself. Each example is the bank dialogue's last user turn and
    reply.
    """
    from finetune.data import load_dialogues, to_sharegpt
    from finetune.evaluate import eval_items

    pool = [
        (i.row_id, _bigrams(i.context), i.context[-1]["content"], i.reference)
        for i in eval_items(load_dialogues(bank))
    ]
    out = path.with_name(path.stem + f".rag{k}.jsonl")
    rows = []
    dialogues = load_dialogues(path)  # every one ends on a reply: one eval item each
    for dialogue, item in zip(dialogues, eval_items(dialogues), strict=True):
        found = _nearest(_bigrams(item.context), pool, k, skip=dialogue.row_id)
        lines = "\n###\n".join(f"{user}\n你: {reply}" for _, _, user, reply in found)
        messages = [dict(m) for m in dialogue.messages]
        note = f"以下是你在相似情境中说过的话，可以参考：\n###\n{lines}\n###"
        if messages[0]["role"] == "system":
            messages[0]["content"] = messages[0]["content"] + "\n\n" + note
        else:
            messages.insert(0, {"role": "system", "content": note})
        row = to_sharegpt(type(dialogue)(dialogue.row_id, messages))
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    out.write_text("".join(rows), encoding="utf-8")
    return out


def data_for(name: str, train: Path, val: Path, work: Path, persona: str, mix_with: list[str]):
    """The (training, scored) files candidate `name` uses."""
    if name in RETRIEVED:
        return with_examples(train, train), with_examples(val, train)
    if name in MIXED:
        return mixed_data(train, work, persona, mix_with), val
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/roleplay",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--personas", nargs="+", default=["haruhi", "atri", "xin"])
    parser.add_argument(
        "--mix-with", nargs="+", default=["haruhi", "atri", "xin"],
        help="Personas whose training portions the -mix candidates add.",
    )  # fmt: skip
    parser.add_argument("--no-score", action="store_true")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument(
        "--select", action="store_true", help="Choose the settings first (see the module doc)."
    )
    parser.add_argument(
        "--candidate", default="r32-lr3e-4-e5", choices=sorted(CANDIDATES),
        help="Settings to train with when not selecting.",
    )  # fmt: skip
    parser.add_argument("--repetition-penalty", default="1.0")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(CANDIDATES), help="With --select: these candidates."
    )
    parser.add_argument(
        "--penalties", nargs="+", default=list(REPETITION_PENALTIES),
        help="With --select: repetition penalties to score each candidate at.",
    )  # fmt: skip
    parser.add_argument(
        "--decodings", nargs="+", default=[], choices=sorted(DECODINGS),
        help="Decodings scored besides greedy at the repetition penalties (all stages).",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[],
        help="Train each run again with these seeds (directories <run>-s<seed>).",
    )  # fmt: skip
    parser.add_argument(
        "--soup", action="store_true", help="With --seeds: average each run's seeds into one."
    )
    parser.add_argument(
        "--no-base", action="store_true", help="Skip the base model's replies (known already)."
    )
    parser.add_argument("--parallel", type=int, default=WORKERS, help="Trainings side by side.")
    parser.add_argument(
        "--eval-parallel", type=int, default=2,
        help="Evaluations generating at once (1 for many-sample decodings).",
    )  # fmt: skip
    parser.add_argument(
        "--select-only", action="store_true", help="Stop after --select has chosen (a sweep)."
    )
    parser.add_argument(
        "--extra", default="", help="Extra `rolecast train` flags for every run, e.g. '--epochs 3'."
    )
    parser.add_argument("--tag", default="", help="Suffix of the run directories (for ablations).")
    parser.add_argument(
        "--model-free", action="store_true",
        help="Only score the model-free baselines (nearest and typical reply) on both splits.",
    )  # fmt: skip
    args = parser.parse_args()

    global GENERATING
    GENERATING = threading.BoundedSemaphore(args.eval_parallel)
    work = args.work
    name, soup = args.candidate, args.soup and bool(args.seeds)
    decodings = (f"rp{args.repetition_penalty}", *args.decodings)
    if args.model_free:
        for persona in args.personas:
            prepare(args.data_dir, work, persona)
            for split, (train, val) in {
                "selection validation": select_split(work, persona),
                "held-out": (
                    work / f"{persona}.clean_train.jsonl",
                    work / f"{persona}.clean_validation.jsonl",
                ),
            }.items():
                train_items, val_items = split_items(train), split_items(val)
                typical, typical_scores = typical_reply_baseline(train_items, val_items)
                row = {
                    "persona": persona,
                    "split": split,
                    "nearest_reply": nearest_reply_baseline(train_items, val_items),
                    "typical_reply": {"text": typical, **typical_scores},
                }
                print(json.dumps(row, ensure_ascii=False), flush=True)
        return
    if not args.score_only:
        for persona in dict.fromkeys([*args.personas, *args.mix_with]):
            prepare(args.data_dir, work, persona)
        if args.select:
            chosen, decoding = select(
                work, args.personas[0], args.only or SELECTED,
                (*(f"rp{p}" for p in args.penalties), *args.decodings), args.mix_with,
                args.parallel, args.seeds, args.soup, shlex.split(args.extra),
            )  # fmt: skip
            if args.select_only:
                return
            # a seed's run has its candidate's settings; a soup's is that candidate, averaged
            name = re.sub(r"-(s\d+|soup\d+)$", "", chosen)
            soup, decodings = soup or "-soup" in chosen, (decoding,)
        flags = [*CANDIDATES[name], *shlex.split(args.extra)]
        seeds = args.seeds
        runs = {p: seeded(work / f"{p}{args.tag}", flags, seeds) for p in args.personas}
        data = {
            p: data_for(name, work / f"{p}.clean_train.jsonl", work / f"{p}.clean_validation.jsonl",
                        work, p, args.mix_with)
            for p in args.personas
        }  # fmt: skip
        base = not (soup or args.no_base)  # base replies once per persona: its first run or soup
        parallel(
            [(*data[p], p, run, run_flags, decodings, base and run == runs[p][0][0])
             for p in args.personas for run, run_flags in runs[p]],
            args.parallel,
        )  # fmt: skip
        if soup:
            for p in args.personas:
                make_soup([r for r, _ in runs[p]], data[p][1], decodings, not args.no_base)
        (work / "final.json").write_text(
            json.dumps(
                {
                    "candidate": name,
                    "flags": flags,
                    "decodings": decodings,
                    "seeds": seeds,
                    "soup": soup,
                }
            )
            + "\n"
        )
    if args.no_score:
        return
    from formats.manifest import read_manifest

    for persona in args.personas:
        run = work / f"{persona}{args.tag}"
        if soup:
            run = soup_of([r for r, _ in seeded(run, [], args.seeds)])
        manifest = read_manifest(run).to_json()
        for evaluated in sorted(run.glob("eval-*/predictions.jsonl")):
            print(
                json.dumps(
                    {
                        "persona": persona + args.tag,
                        "run": run.name,
                        **score(evaluated),
                        "decoding": evaluated.parent.name.removeprefix("eval-"),
                        "train": manifest["metrics"],
                        "tokens_per_s": manifest.get("tokens_per_s"),
                        "train_time_s": manifest["train_time_s"],
                    }
                )
            )


if __name__ == "__main__":
    main()
