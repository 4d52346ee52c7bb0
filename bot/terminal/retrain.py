"""`rolecast retrain`: the same retrain job as `/retrain`, from a terminal, with a progress bar;
`--data FILE` trains on a dialogue file instead of the approved dialogues.

Only typer, rich and the retrain loop's progress line at module level: the job itself imports
the bot core inside the command.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from bot.retrain.progress import describe, replay_note

if TYPE_CHECKING:
    from bot.retrain.jobs import Job
    from bot.settings import BotSettings

console = Console(highlight=False, soft_wrap=True)  # a state line stays one line in a log


class TerminalProgress:
    """The job listener for a terminal: a line per state, a progress bar while training (a
    line every few seconds when the output is not a terminal)."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=out,
            transient=True,
        )
        self.tasks: dict[int, TaskID] = {}
        self.states: dict[int, str] = {}
        self.printed_at = 0.0

    async def __call__(self, job: Job) -> None:
        if self.states.get(job.id) != job.state:
            self.states[job.id] = job.state
            stamp = datetime.now().strftime("%H:%M:%S")
            reason = f" — {job.reason}" if job.terminal and job.reason else ""
            if job.state == "training":  # the export step has said what it replayed
                note = replay_note((job.metrics or {}).get("replay"))
                reason = f" — {note}" if note else ""
            self.out.print(f"{stamp} job #{job.id} {job.persona}: {job.state}{escape(reason)}")
        if job.state != "training" or job.step is None:
            if job.id in self.tasks:
                self.bar.remove_task(self.tasks.pop(job.id))
                if not self.tasks:
                    self.bar.stop()
            return
        if not self.out.is_terminal:
            if time.monotonic() - self.printed_at >= 5:
                self.printed_at = time.monotonic()
                self.out.print(describe(job))
            return
        detail = describe(job).split(", ", 2)[-1] if job.loss is not None else ""
        if job.id not in self.tasks:
            self.bar.start()
            self.tasks[job.id] = self.bar.add_task(f"#{job.id} train", total=None, detail="")
        self.bar.update(
            self.tasks[job.id], completed=job.step, total=job.total_steps, detail=detail
        )


def retrain(
    persona: str | None = typer.Option(None, "--persona", "-p", help="Persona to retrain."),
    db: Path | None = typer.Option(None, help="SQLite file (default: <home>/rolecast.db)."),
    server: str | None = typer.Option(
        None,
        help="Model server to publish to; default: the configured one (ROLECAST_SERVER_URL), "
        "else a running `rolecast serve` of this registry, else only the registry changes (a "
        "server started later loads the new current version).",
    ),
    adapters_dir: Path | None = typer.Option(
        None,
        help="Adapter registry shared with the model server "
        "(default: $ROLECAST_ADAPTERS_DIR, else <home>/adapters).",
    ),
    min_approved: int | None = typer.Option(
        None, help="Approved dialogues needed (default: the retrain.min_approved setting)."
    ),
    guild: str | None = typer.Option(None, help="Use only this Discord guild's dialogues."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Train on this dialogue file (ShareGPT or OpenAI JSONL) instead of the approved "
        "dialogues; a row without a system prompt gets the persona's. The other personas' "
        "approved dialogues are still replayed, and the file's held-out split gates the result.",
    ),
    status: bool = typer.Option(False, "--status", help="List recent jobs and exit."),
    resume: bool = typer.Option(
        False, "--resume", help="Pick up unfinished jobs (after a crash) and run them to the end."
    ),
) -> None:
    """Retrain a persona from its approved dialogues (or a dialogue file): export, train, gate,
    publish."""
    from bot.errors import RolecastError
    from bot.terminal.console import fail, load_settings

    settings = load_settings(db_path=db, server_url=server, adapters_dir=adapters_dir)
    if not status and not resume and not persona:
        raise fail("give --persona (or --status, --resume)")
    if data is not None and (status or resume):
        raise fail("--data starts a job: not with --status or --resume")
    try:
        code = asyncio.run(_run(settings, persona, min_approved, guild, status, resume, data))
    except RolecastError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        console.print("stopped following; a training process keeps running: --resume follows it")
        code = 130
    raise typer.Exit(code)


async def _run(
    settings: BotSettings,
    persona: str | None,
    min_approved: int | None,
    guild: str | None,
    status: bool,
    resume: bool,
    data: Path | None = None,
) -> int:
    from bot.core.memory import Memory
    from bot.core.personas import PersonaRegistry
    from bot.retrain.jobs import JobActive
    from bot.retrain.runner import RetrainService

    async with Memory.open(settings.database) as memory:
        personas = PersonaRegistry(settings.user_personas).load()
        listener = TerminalProgress(console)
        service = RetrainService(
            memory, personas, settings, server_url=settings.server_url, listener=listener
        )
        if status:
            print_jobs(await service.store.recent(persona))
            return 0
        try:
            if resume:
                jobs = await service.resume_jobs()
                if not jobs:
                    console.print("no unfinished retrain job")
                    return 0
            else:
                assert persona is not None
                user = f"terminal:{getpass.getuser()}"
                try:
                    jobs = [
                        await service.start(
                            persona,
                            requested_by=user,
                            min_approved=min_approved,
                            guild_id=guild,
                            data=data,
                        )
                    ]
                except JobActive as exc:
                    console.print(
                        f"[yellow]{escape(str(exc))}[/]; `rolecast retrain --resume` follows it"
                    )
                    return 2
            finished = [await service.wait(job.id) for job in jobs]
        finally:
            await service.aclose()
        listener.bar.stop()
        for job in finished:
            if job.metrics and job.metrics.get("scores"):
                print_scores(job.metrics)
        return 0 if all(j.state == "done" for j in finished) else 1


def print_scores(metrics: dict[str, object]) -> None:
    scores = metrics["scores"]
    assert isinstance(scores, dict)
    names = list(next(iter(scores.values())))
    table = Table("model", *names, title=f"gate against {metrics.get('against')}")
    for model, values in scores.items():
        table.add_row(model, *(f"{values[m]:.2f}" for m in names))
    console.print(table)


def print_jobs(jobs: list[Job]) -> None:
    if not jobs:
        console.print("no retrain jobs")
        return
    table = Table(
        "job", "persona", "state", "since", "step", "loss", "dialogues", "version", "reason"
    )
    for job in jobs:
        step = f"{job.step}/{job.total_steps or '?'}" if job.step is not None else ""
        version = f"{job.old_version or 'base'} → {job.new_version}" if job.new_version else ""
        table.add_row(
            f"#{job.id}",
            job.persona,
            job.state,
            datetime.fromtimestamp(job.since).strftime("%Y-%m-%d %H:%M:%S"),
            step,
            f"{job.loss:.4f}" if job.loss is not None else "",
            str(job.dialogues or ""),
            version,
            escape((job.reason or "").splitlines()[0] if job.reason else ""),
        )
    console.print(table)
