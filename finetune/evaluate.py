"""Base model against adapter: predict the last assistant turn, score, tabulate, chart.

Each dialogue is cut before its last assistant turn; the model continues from the template's
generation prompt and its reply is scored against that turn (`finetune.metrics`). One model
is loaded: base predictions are made with the adapter disabled. Decoding is greedy by default,
so runs are reproducible and the two models are compared under the same decoding; beam search
(`num_beams`) and consensus decoding (`samples`: sample several replies, keep the one that agrees
most with the others by ROUGE-L, i.e. minimum-Bayes-risk decoding) are settings of the same call.
Given a classifier of the personas' voices (`finetune.consistency`), the report adds each model's
persona consistency (`recognised`, `own_probability`) beside BLEU and ROUGE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from finetune import harmony, models
from finetune.consistency import Learnt
from finetune.data import (
    ASSISTANT,
    SYSTEM,
    Dialogue,
    Line,
    Message,
    read_jsonl,
    read_rows,
    trim_trailing_user,
    writing,
)
from finetune.errors import ConfigError, DataError, ModelNotFoundError
from finetune.metrics import METRICS, consensus, score_corpus
from finetune.template import end_of_turn_ids, prompt_ids
from formats.manifest import Manifest, read_manifest
from formats.sharegpt import jsonl_line

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
BASE, BASELINE, TUNED = "base", "baseline", "adapter"
MODELS = (BASE, BASELINE, TUNED)  # the columns of replies in a predictions file
SAMPLES_SUFFIX = "_samples"  # `adapter_samples`: every sampled reply behind `adapter`
CONSISTENCY = ("recognised", "own_probability")  # `finetune.consistency`'s two figures, 0-100


@dataclass(frozen=True)
class EvalItem:
    row_id: str
    context: list[Message]
    reference: str


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 32
    repetition_penalty: float = 1.0
    num_beams: int = 1
    samples: int = 1  # > 1: sample this many replies and keep the consensus one
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    sample: bool = False  # sample one reply (as a chat server does) instead of greedy

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be at least 1")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be positive (1.0 = none)")
        if self.num_beams < 1 or self.samples < 1:
            raise ConfigError("num_beams and samples must be at least 1")
        if self.num_beams > 1 and self.sampling:
            raise ConfigError("choose beam search or sampling, not both")
        if self.sampling and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("sampling needs temperature > 0 and 0 < top_p <= 1")

    @property
    def sampling(self) -> bool:
        """Whether replies are drawn at random: one (`sample`) or several for a consensus."""
        return self.sample or self.samples > 1

    def generate_kwargs(self) -> dict[str, Any]:
        """The `generate` arguments beyond the prompt, eos and padding."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.sampling,
        }
        if self.num_beams > 1:
            kwargs.update(num_beams=self.num_beams, early_stopping=True)
        if self.sampling:
            kwargs.update(
                num_return_sequences=self.samples, temperature=self.temperature, top_p=self.top_p
            )
        else:  # greedy or beam: no sampling parameters, so generate does not warn about them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def eval_items(dialogues: Sequence[Dialogue]) -> list[EvalItem]:
    """Each dialogue up to (not including) its last assistant turn, and that turn."""
    items = []
    for d in dialogues:
        last = max((i for i, m in enumerate(d.messages) if m["role"] == ASSISTANT), default=None)
        if last is None or last == 0:
            continue
        items.append(EvalItem(d.row_id, d.messages[:last], d.messages[last]["content"]))
    return items


def read_eval_dialogues(path: str | Path) -> list[Dialogue]:
    """Well-formed dialogues of `path`; rows ending on a user turn are cut back to their last reply."""
    from finetune.data import structure_problems

    out, skipped = [], 0
    for row in read_rows(path):
        if row.problems or not row.messages:
            skipped += 1
            continue
        messages = trim_trailing_user(row.messages)
        if structure_problems(messages):
            skipped += 1
            continue
        out.append(Dialogue(row.row_id, messages))
    if skipped:
        log.warning("%s: %d malformed rows left out of the evaluation", path, skipped)
    if not out:
        raise DataError(f"{path} has no dialogue to evaluate")
    return out


def load_for_eval(base: str, adapter: str | Path | None) -> tuple[Any, Any]:
    """The model (with the adapter attached if given) and tokenizer, on the best device."""
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    tokenizer = models.load_tokenizer(base)
    tokenizer.padding_side = "left"
    model = models.load_model(base, dtype=dtype, attn_implementation="sdpa")
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{adapter} is not an adapter directory (no adapter_config.json)"
            )
        model = PeftModel.from_pretrained(model, str(adapter))
    model.to("cuda" if gpu else "cpu").eval()
    return model, tokenizer


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token and every eos the tokenizer
    and the model's generation config name, as vLLM and LLaMA-Factory stop on a template's stop
    words. Stopping on a document-level eos (`<|endoftext|>`) alone lets a model that has closed
    its turn go on into the template's separator, which then lands in the reply.
    """
    ids: set[int] = set(end_of_turn_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The generated ids before the first stop token."""
    out = []
    for token in ids:
        if token in stops:
            break
        out.append(int(token))
    return out


def reply_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """A generated reply as text: for a harmony model, its final channel alone."""
    if harmony.is_harmony(tokenizer):
        return harmony.split_channels(tokenizer, ids).final
    text: str = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text


@torch.no_grad()
def candidates(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[Sequence[Message]],
    settings: GenerationSettings,
    share_prefill: bool = True,
    on_done: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """The replies `settings` makes to each context (`settings.samples` of them, else one),
    batched by similar length, in input order; `on_done(n)` hears of each batch of n contexts
    answered.

    Generation stops at the end of the assistant turn; a reply is the text before it. Samples
    of one prompt start from one prefill (`shared_prefill`) unless `share_prefill` is false.
    """
    device = next(model.parameters()).device
    if settings.sampling:
        torch.manual_seed(settings.seed)
    n = settings.samples
    stops = stop_token_ids(tokenizer, model)
    prompts = [prompt_ids(tokenizer, c) for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[list[str]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), settings.batch_size):
        chunk = order[start : start + settings.batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        ids, mask, kwargs = ids.to(device), mask.to(device), settings.generate_kwargs()
        if share_prefill and n > 1 and width > 1:
            ids, mask, kwargs = shared_prefill(model, ids, mask, kwargs, n)
        out = model.generate(
            input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=stops, **kwargs
        )
        for row, i in enumerate(chunk):  # the n sequences of a prompt are consecutive rows
            replies[i] = [
                reply_text(tokenizer, cut_at_stop(seq[width:].tolist(), stops))
                for seq in out[row * n : (row + 1) * n]
            ]
        if on_done is not None:
            on_done(len(chunk))
    return replies


def shared_prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any], n: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Inputs for `generate` that sample `n` replies to each prompt from one prefill.

    `generate(num_return_sequences=n)` copies every prompt n times before its first forward
    pass, so a prompt's prefill is computed n times and its attention held n times at once.
    Here the prompts but their last token are run once, the cache is copied n times, and
    `generate` starts from it on the last token, the same computation as far as each sample
    is concerned. Left padding is kept out of the positions as `generate` keeps it out.
    """
    positions = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
    cache = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    ).past_key_values
    cache.batch_repeat_interleave(n)
    kwargs = {**kwargs, "num_return_sequences": 1, "past_key_values": cache}
    return ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), kwargs


def choose(samples: Sequence[str]) -> str:
    """The reply kept from one context's samples: their consensus (`finetune.metrics.consensus`)."""
    return samples[consensus(samples)] if len(samples) > 1 else samples[0]


def generate(
    model: Any, tokenizer: Any, contexts: Sequence[Sequence[Message]], settings: GenerationSettings
) -> list[str]:
    """One reply to each context under `settings`: with `settings.samples > 1`, the consensus of
    that many sampled replies."""
    return [choose(c) for c in candidates(model, tokenizer, contexts, settings)]


def predict(
    data: str | Path,
    adapter: str | Path | None,
    base: str,
    settings: GenerationSettings,
    limit: int | None = None,
    include_base: bool = True,
    baseline: str | Path | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Prediction records: id, reference, and the base and/or adapter replies.

    `include_base=False` (with an adapter) skips the base model's replies, e.g. when several
    adapters are compared on one split whose base replies are already known. `baseline`, a
    second adapter on the same base (the version being served), is compared instead of the
    base model: its replies go in a `baseline` column and the base model's are skipped.
    With sampled consensus every sample is kept beside the chosen reply (`adapter_samples`...),
    so other selections can be scored without generating again.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"the limit of dialogues to evaluate must be at least 1, got {limit}")
    items = eval_items(read_eval_dialogues(data))[:limit]
    model, tokenizer = load_for_eval(base, adapter)
    contexts = [it.context for it in items]
    replies: dict[str, list[list[str]]] = {}  # column -> each context's candidates
    columns = (
        [BASELINE, TUNED]
        if baseline is not None
        else ([BASE, TUNED] if include_base else [TUNED])
        if adapter is not None
        else [BASE]
    )
    report = progress or NoProgress()
    report.start(len(items) * len(columns))
    on_done = report.advance
    if baseline is not None:
        if adapter is None:
            raise DataError("a baseline adapter is compared against an --adapter; give one")
        if not (Path(baseline) / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{baseline} is not an adapter directory (no adapter_config.json)"
            )
        model.load_adapter(str(baseline), adapter_name=BASELINE)
        model.set_adapter(BASELINE)
        replies[BASELINE] = candidates(model, tokenizer, contexts, settings, on_done=on_done)
        model.set_adapter("default")
        include_base = False
    if adapter is not None:
        if include_base:
            with model.disable_adapter():
                replies[BASE] = candidates(model, tokenizer, contexts, settings, on_done=on_done)
        replies[TUNED] = candidates(model, tokenizer, contexts, settings, on_done=on_done)
    else:
        replies[BASE] = candidates(model, tokenizer, contexts, settings, on_done=on_done)
    report.stop()
    records = []
    for k, it in enumerate(items):
        rec: dict[str, Any] = {
            "id": it.row_id,
            "prompt": it.context[-1]["content"],
            "reference": it.reference,
        }
        for column in (BASE, BASELINE, TUNED):
            if column in replies:
                rec[column] = choose(replies[column][k])
                if settings.samples > 1:  # kept, so other selections can be tried later
                    rec[f"{column}{SAMPLES_SUFFIX}"] = replies[column][k]
        records.append(rec)
    return records


class Progress(Protocol):
    """Hears how many of how many replies are made (`rolecast eval` shows a bar)."""

    def start(self, total: int) -> None: ...

    def advance(self, done: int) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    """Reports nothing."""

    def start(self, total: int) -> None:
        return None

    def advance(self, done: int) -> None:
        return None

    def stop(self) -> None:
        return None


def score_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    refs = [r["reference"] for r in records]
    result = {}
    for column in MODELS:
        if records and column in records[0]:
            result[column] = score_corpus([r[column] for r in records], refs)
    return result


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    first = next(iter(results.values()), {})
    names = [m for m in (*METRICS, *CONSISTENCY) if m in first]
    lines = ["| model | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for model, scores in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{scores[m]:.2f}" for m in names) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ConsistencyCheck:
    """Whose replies the predictions are, and the classifier of the personas' voices."""

    persona: str
    learnt: Learnt


def score_consistency(
    records: Sequence[dict[str, Any]],
    results: dict[str, dict[str, float]],
    check: ConsistencyCheck,
) -> dict[str, Any]:
    """Add each model's persona consistency to its scores; what the report says about it,
    with the references' own figures as the ceiling."""
    for column, scores in results.items():
        found = check.learnt.classifier.score(check.persona, [r[column] for r in records])
        scores.update({m: round(getattr(found, m), 2) for m in CONSISTENCY})
    refs = check.learnt.classifier.score(check.persona, [r["reference"] for r in records])
    return {
        "persona": check.persona,
        **check.learnt.to_json(),
        "references": {m: round(getattr(refs, m), 2) for m in CONSISTENCY},
    }


def write_report(
    records: Sequence[dict[str, Any]],
    output: str | Path,
    title: str,
    consistency: ConsistencyCheck | None = None,
) -> dict[str, dict[str, float]]:
    """Score `records` and write metrics.json, metrics.md and metrics.png beside the predictions."""
    from finetune.plots import plot_metrics

    output = Path(output)
    results = score_records(records)
    if not results:
        raise DataError("no predictions to score")
    report: dict[str, Any] = {"dialogues": len(records), "scores": results}
    if consistency is not None:
        report["consistency"] = score_consistency(records, results, consistency)
    with writing(output / "metrics.json") as fh:
        fh.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    with writing(output / "metrics.md") as fh:
        fh.write(f"# {title}\n\n{len(records)} dialogues\n\n{metrics_table(results)}\n")
    plot_metrics(results, output / "metrics.png", title)
    return results


def write_predictions(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with writing(path) as fh:
        fh.writelines(jsonl_line(r) for r in records)
    return path


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions file, each checked to be scorable: a JSON object with a text
    `reference` and the same model columns (base, baseline, adapter) as the first, each text.
    DataError, with the lines that are not, otherwise (a part of a file scores as a whole)."""
    lines = read_jsonl(path)
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    columns: list[str] | None = None
    for line in lines:
        wrong = _unscorable(line, columns)
        if isinstance(line.value, dict) and wrong is None:
            records.append(line.value)
            columns = columns or [c for c in MODELS if c in line.value]
        problems += [] if wrong is None else [f"line {line.number}: {wrong}"]
    if problems:
        raise DataError(f"{path}: {len(problems)} of {len(lines)} lines cannot be scored", problems)
    if not records:
        raise DataError(f"{path} holds no predictions")
    return records


def _unscorable(line: Line, columns: list[str] | None) -> str | None:
    """Why a line of a predictions file cannot be scored beside lines with `columns`, or None."""
    if line.code is not None:
        return f"{line.code}: {line.message}"
    if not isinstance(line.value, dict):
        return "not a JSON object"
    models = [c for c in MODELS if c in line.value]
    if not models:
        return f"no replies to score (no {', '.join(MODELS)} column)"
    if columns is not None and models != columns:
        return f"replies of {models}, where the lines before have {columns}"
    untyped = [k for k in ("reference", *models) if not isinstance(line.value.get(k), str)]
    return f"{', '.join(untyped)} not text" if untyped else None


def adapter_manifest(adapter: str | Path | None) -> Manifest:
    """The adapter's `rolecast.json` (empty without an adapter, or for one that has none)."""
    return Manifest() if adapter is None else read_manifest(Path(adapter))


def base_for(adapter: str | Path | None, base: str | None) -> str:
    """`base` if given, else the base the adapter was trained on, else the default model."""
    if base:
        return base
    return str(adapter_manifest(adapter).settings.get("base", models.DEFAULT_BASE))


def compare(
    adapter: str | Path,
    prompts: Sequence[str],
    base: str | None,
    system: str | None,
    settings: GenerationSettings,
) -> list[tuple[str, str, str]]:
    """(prompt, base reply, adapter reply) for each prompt, under the persona's system prompt."""
    manifest = adapter_manifest(adapter)
    system = system if system is not None else manifest.system_prompt
    contexts = [
        ([{"role": SYSTEM, "content": system}] if system else []) + [{"role": "user", "content": p}]
        for p in prompts
    ]
    model, tokenizer = load_for_eval(base_for(adapter, base), adapter)
    with model.disable_adapter():
        base_replies = generate(model, tokenizer, contexts, settings)
    tuned = generate(model, tokenizer, contexts, settings)
    return list(zip(prompts, base_replies, tuned, strict=True))
