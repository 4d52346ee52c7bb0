"""`rolecast data|train|eval|compare|soup`: the training side's commands.

Only typer is imported at module level: torch, transformers and the metric libraries are
imported inside the commands, so the bot process that loads the root CLI never pulls them in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

data_app = typer.Typer(
    help="Check, clean and split dialogue datasets (ShareGPT / OpenAI JSONL).", no_args_is_help=True
)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _errors() -> tuple[type[Exception], ...]:
    """What a command turns into one error line: the package's errors and bad shared files."""
    from finetune.errors import FinetuneError
    from formats.errors import FormatError

    return (FinetuneError, FormatError)


def _token_counter(base: str | None) -> Any:
    if not base:
        return None
    from finetune.models import load_tokenizer
    from finetune.template import count_tokens

    tokenizer = load_tokenizer(base)
    return lambda messages: count_tokens(tokenizer, messages)


@data_app.command("check")
def data_check(
    files: list[Path] = typer.Argument(..., help="JSONL files to check."),
    base: str = typer.Option(
        "default", help="Model whose tokenizer counts tokens; '' to count characters."
    ),
    max_length: int = typer.Option(
        2048, help="Context length in tokens; longer dialogues are reported."
    ),
    dedup_threshold: float = typer.Option(
        0.85, help="MinHash Jaccard similarity that counts as a near-duplicate."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report, per row id, what makes a row unusable; near-duplicates; length statistics."""
    from finetune.data import check_files
    from formats.jsonfile import require_data_file

    try:
        for file in files:
            require_data_file(file)
        counter = _token_counter(base)
        report = check_files(files, counter, max_length if counter else None, dedup_threshold)
    except _errors() as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report.to_json(), ensure_ascii=False, indent=2))
    else:
        _print_report(report)
    if report.problems:
        raise typer.Exit(code=2)


def _print_report(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    summary = report.to_json()
    console.print(
        f"[bold]{summary['rows']}[/] rows in {len(report.files)} file(s): "
        f"[green]{summary['usable_rows']} usable[/], [red]{summary['rows_with_problems']} with problems[/]"
    )
    for code, n in sorted(summary["problems_by_code"].items(), key=lambda kv: -kv[1]):
        console.print(f"  {code}: {n}")
    if report.problems:
        table = Table("id", "where", "problem", "detail")
        for p in report.problems:
            # Text cells: row ids and details come from the data, never read as rich markup.
            table.add_row(*(Text(str(v)) for v in (p.row_id, p.source, p.code, p.message)))
        console.print(table)
    if report.duplicate_groups:
        console.print(f"[bold]{len(report.duplicate_groups)}[/] near-duplicate groups:")
        for group in report.duplicate_groups:
            console.print("  " + ", ".join(group), markup=False, highlight=False)
    s = report.lengths
    console.print(
        f"lengths in {s.unit}: n={s.count} total={s.total} mean={s.mean} min={s.minimum} "
        f"p50={s.p50} p90={s.p90} p99={s.p99} max={s.maximum}"
    )


@data_app.command("clean")
def data_clean(
    source: Path = typer.Argument(..., help="JSONL file to clean."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Where to write the usable rows (ShareGPT JSONL)."
    ),
    base: str = typer.Option(
        "default", help="Model whose tokenizer measures length; '' to skip the length check."
    ),
    max_length: int = typer.Option(2048, help="Drop dialogues longer than this many tokens."),
    trim: bool = typer.Option(True, help="Cut trailing user turns instead of dropping the row."),
    dedup_threshold: float = typer.Option(
        0.85, help="Near-duplicate threshold; 1.0 keeps only exact-duplicate removal."
    ),
) -> None:
    """Write the usable rows; say what was dropped or trimmed and why."""
    from finetune.data import clean_rows, read_rows, write_jsonl

    try:
        rows = read_rows(source)  # a file that cannot be read says so before a model loads
        counter = _token_counter(base)
        result = clean_rows(rows, counter, max_length if counter else None, trim, dedup_threshold)
        n = write_jsonl(result.kept, output)
    except _errors() as exc:
        _fail(exc)
    for p in result.dropped:
        typer.echo(f"dropped {p}", err=True)
    typer.echo(
        f"{n} dialogues written to {output} ({len(result.trimmed)} trimmed, {len(result.dropped)} dropped)"
    )


@data_app.command("split")
def data_split(
    source: Path = typer.Argument(..., help="Clean JSONL file to split."),
    output_dir: Path = typer.Option(
        ..., "--output-dir", "-o", help="Directory for train/validation JSONL."
    ),
    validation: float = typer.Option(0.1, help="Fraction held out for validation."),
    seed: int = typer.Option(42, help="Seed of the split (same ids + seed = same split)."),
) -> None:
    """A reproducible train/validation split, plus a dataset_info.json LLaMA-Factory can read."""
    from finetune.data import load_dialogues, split_dialogues, write_dataset_info, write_jsonl

    try:
        train, val = split_dialogues(load_dialogues(source), validation, seed)
        stem = source.stem
        write_jsonl(train, output_dir / f"{stem}_train.jsonl")
        write_jsonl(val, output_dir / f"{stem}_validation.jsonl")
        write_dataset_info(output_dir, [f"{stem}_train", f"{stem}_validation"])
    except _errors() as exc:
        _fail(exc)
    typer.echo(f"{len(train)} train, {len(val)} validation dialogues in {output_dir}")


def train(ctx: typer.Context) -> None:
    """LoRA SFT of a persona adapter. Flags: rolecast train --help (--json: JSON lines)."""
    from dataclasses import replace

    from finetune.config import parse_train_command
    from finetune.errors import DataError
    from finetune.progress import JsonLines

    try:
        config, as_json = parse_train_command(list(ctx.args))
    except _errors() as exc:  # flags that contradict each other (argparse says the rest)
        if "--json" in ctx.args:
            JsonLines().error(str(exc), [])
        _fail(exc)
    lines = JsonLines() if as_json else None
    if lines is not None:
        config = replace(config, progress=False)
    try:
        from finetune.trainer import train as run_training

        manifest = run_training(config, lines)
    except _errors() as exc:
        if lines is not None:
            problems = exc.problems if isinstance(exc, DataError) else []
            lines.error(str(exc), problems)
        _fail(exc)
    if lines is not None:
        if manifest:  # the main process of a multi-GPU run
            lines.result(str(config.output), manifest)
    elif manifest:
        m = manifest["metrics"]
        typer.echo(
            f"adapter written to {config.output}: {m['steps']} steps, final loss {m['final_train_loss']:.4f}, "
            f"{manifest['tokens_per_s']:,.0f} tokens/s, {manifest['wall_time_s']:.0f} s"
        )
    from finetune.trainer import exit_if_distributed

    exit_if_distributed()


def evaluate(
    data: Path | None = typer.Option(None, help="Dialogues to evaluate on (held-out JSONL)."),
    adapter: Path | None = typer.Option(
        None, help="Adapter directory; without it only the base model is scored."
    ),
    base: str | None = typer.Option(
        None, help="Base model (default: the adapter's, else the default model)."
    ),
    output: Path = typer.Option(
        Path("runs/eval"), help="Directory for predictions, metrics and chart."
    ),
    predictions: Path | None = typer.Option(
        None, help="Score an existing predictions.jsonl instead of generating."
    ),
    score: bool = typer.Option(
        True, help="Score after generating (--no-score: only save predictions)."
    ),
    limit: int | None = typer.Option(None, min=1, help="Evaluate the first N dialogues only."),
    max_new_tokens: int = typer.Option(256, help="Longest reply to generate."),
    batch_size: int = typer.Option(32, help="Prompts generated together."),
    repetition_penalty: float = typer.Option(
        1.0, help="Generation repetition penalty (1.0 = none)."
    ),
    num_beams: int = typer.Option(1, help="Beam search width (1 = greedy)."),
    samples: int = typer.Option(
        1, help="Sample this many replies per dialogue and keep their consensus (MBR, ROUGE-L)."
    ),
    sample: bool = typer.Option(
        False,
        "--sample",
        help="Sample one reply per dialogue at --temperature/--top-p, as a chat server does "
        "(default: greedy).",
    ),
    temperature: float = typer.Option(
        1.0, help="Sampling temperature (with --sample or --samples)."
    ),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --sample or --samples)."),
    seed: int = typer.Option(0, help="Sampling seed (with --sample or --samples)."),
    base_replies: bool = typer.Option(
        True, help="With --adapter, also predict with the base model (--no-base-replies: skip)."
    ),
    baseline: Path | None = typer.Option(
        None,
        help="With --adapter, compare against this adapter (e.g. the served version) instead "
        "of the base model.",
    ),
    persona: str | None = typer.Option(
        None, help="Whose replies these are, for the persona consistency (with --consistency-data)."
    ),
    consistency_data: list[str] = typer.Option(
        [],
        "--consistency-data",
        help="Dialogues to learn the personas' voices from, for persona consistency "
        "(recognised, own_probability) beside BLEU/ROUGE: FILE for --persona's own (its "
        "training dialogues), NAME=FILE for another persona's (repeatable).",
    ),
) -> None:
    """Predict the last reply of each dialogue with the base and the adapter; BLEU-4, ROUGE-1/2/L,
    and persona consistency with --consistency-data."""
    from finetune import evaluate as ev
    from finetune.errors import DataError

    try:
        check = _consistency_check(persona, consistency_data) if score else None
        if output.exists() and not output.is_dir():  # found out before replies are generated
            raise DataError(f"{output} is a file; --output names a folder")
        if predictions is not None:
            records = ev.read_predictions(predictions)
        elif data is not None:
            settings = ev.GenerationSettings(
                max_new_tokens, batch_size, repetition_penalty, num_beams, samples, temperature,
                top_p, seed, sample,
            )  # fmt: skip
            records = ev.predict(
                data, adapter, ev.base_for(adapter, base), settings, limit, base_replies,
                baseline, progress=_GenerationBar(),
            )  # fmt: skip
            ev.write_predictions(records, output / ev.PREDICTIONS)
            typer.echo(f"{len(records)} predictions written to {output / ev.PREDICTIONS}")
        else:
            raise typer.BadParameter("give --data to generate, or --predictions to score")
        if score:
            against = "baseline" if baseline is not None else "base"
            title = f"{(data or predictions).stem}: {against} vs adapter"  # type: ignore[union-attr]
            results = ev.write_report(records, output, title, check)
            typer.echo(ev.metrics_table(results))
    except _errors() as exc:
        _fail(exc)


class _GenerationBar:
    """`rolecast eval`'s progress bar on stderr while replies are generated."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("replies"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task: Any = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("generate", total=total)

    def advance(self, done: int) -> None:
        self.bar.advance(self.task, done)

    def stop(self) -> None:
        self.bar.stop()


def _consistency_check(persona: str | None, values: list[str]) -> Any:
    """The persona classifier `--consistency-data` describes (None without it)."""
    import re

    from finetune.consistency import learn_from_files
    from finetune.evaluate import ConsistencyCheck

    if not values:
        if persona is not None:
            raise typer.BadParameter(
                "--persona goes with --consistency-data", param_hint="--persona"
            )
        return None
    files: dict[str, list[Path]] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and re.fullmatch(r"[\w.-]+", name) and path:
            files.setdefault(name, []).append(Path(path))
        elif persona is None:
            raise typer.BadParameter(
                f"{value}: give --persona for a file without NAME=", param_hint="--consistency-data"
            )
        else:
            files.setdefault(persona, []).append(Path(value))
    if persona is None:
        raise typer.BadParameter("give --persona: whose replies are scored", param_hint="--persona")
    return ConsistencyCheck(persona, learn_from_files(files))


def compare(
    prompts: list[str] = typer.Argument(..., help="User messages to answer."),
    adapter: Path = typer.Option(..., help="Adapter directory."),
    base: str | None = typer.Option(None, help="Base model (default: the adapter's)."),
    system: str | None = typer.Option(
        None, help="System prompt (default: the persona's, from rolecast.json)."
    ),
    max_new_tokens: int = typer.Option(128, help="Longest reply to generate."),
) -> None:
    """Base and tuned replies side by side."""
    from rich.console import Console
    from rich.table import Table

    from finetune import evaluate as ev

    try:
        rows = ev.compare(
            adapter, prompts, base, system, ev.GenerationSettings(max_new_tokens=max_new_tokens)
        )
    except _errors() as exc:
        _fail(exc)
    table = Table("prompt", "base", "adapter", show_lines=True)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def soup(
    adapters: list[Path] = typer.Argument(..., help="Adapter directories of one base model."),
    output: Path = typer.Option(..., help="Directory for the averaged adapter."),
    rank: int | None = typer.Option(None, help="Rank of the result (default: the inputs')."),
) -> None:
    """Average adapters (e.g. one per seed) into one adapter of the same rank."""
    from finetune.soup import average_adapters

    try:
        manifest = average_adapters(adapters, output, rank)
    except _errors() as exc:
        _fail(exc)
    info = manifest["soup"]
    typer.echo(
        f"{len(adapters)} adapters averaged into {output}: rank {info['rank']}, "
        f"{info['retained_energy']:.2%} of the averaged update kept"
    )


def register(app: typer.Typer) -> None:
    """Add the finetune commands to the root app."""
    app.add_typer(data_app, name="data")
    app.command(
        "train",
        context_settings={
            "allow_extra_args": True,
            "ignore_unknown_options": True,
            "help_option_names": [],
        },
        add_help_option=False,
    )(train)
    app.command("eval")(evaluate)
    app.command("compare")(compare)
    app.command("soup")(soup)
