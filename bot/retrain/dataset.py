"""A job's export step: the files training and the gate read.

1. The persona's dialogues: its approved dialogues (of the job's guild when it has one), or the
   dialogue file given to `rolecast retrain --data` (ShareGPT or OpenAI JSONL; a row without a
   system prompt gets the persona card's), exported as ShareGPT.
2. `rolecast data clean`, then `rolecast data split`: the held-out split is the gate's, and only
   ever the persona's own dialogues.
3. Replay, as the training recipe does: the other personas' approved dialogues of the same scope
   (the same guild's for a guild's job, and for a persona a guild owns whoever runs the job;
   never a persona another guild owns), each with its own persona's system prompt, cleaned, and
   at most `retrain.replay` times as many as the persona's own training dialogues, are added to
   the training file, never to the held-out split. Which ones, when there are more, is a seeded
   draw. `replay/replay.json` says how many were there and how many were replayed, by persona, and
   the job's status says it in one line (`bot.retrain.progress.replay_note`), "no replay"
   included.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bot.core.export import Names, export_dialogues
from bot.core.memory import Dialogue, Memory
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import render_system
from bot.retrain.children import Failed, RolecastCommands
from bot.retrain.gate import Rejected
from bot.retrain.jobs import Job
from bot.retrain.progress import replay_note
from bot.retrain.workdir import Paths, count_lines
from bot.settings import RetrainSettings
from formats import jsonfile, sharegpt
from formats.errors import FormatError

NamesFor = Callable[[Job, Sequence[Dialogue]], Names]


class Datasets:
    """Builds a job's training and held-out files."""

    def __init__(
        self,
        memory: Memory,
        personas: PersonaRegistry,
        config: RetrainSettings,
        commands: RolecastCommands,
        names_for: NamesFor,
    ) -> None:
        self.memory = memory
        self.personas = personas
        self.config = config
        self.commands = commands
        self.names_for = names_for

    async def build(self, job: Job, paths: Paths) -> tuple[int, dict[str, Any]]:
        """Write the job's files; returns the persona's usable dialogues and the replay report.
        Rejected when there are too few dialogues."""
        persona = self.personas.get(job.persona)
        paths.export.parent.mkdir(parents=True, exist_ok=True)
        records, problems = await self._export_own(job, persona, paths)
        needed = job.min_approved
        where = f"{job.source} has" if job.source else f"{persona.name} has"
        scope = " in this server" if job.guild_id and not job.source else ""
        what = "usable dialogues" if job.source else "approved dialogues"
        if records < needed:
            more = "" if job.source else f": approve {needed - records} more"
            raise Rejected(
                f"{where} {records} {what}{scope}; a retrain needs {needed}{more}."
                + problem_lines(problems, paths)
            )
        await self._clean(paths.export, paths.clean, paths)
        kept = count_lines(paths.clean)
        if kept < needed:
            more = "" if job.source else f": approve {needed - kept} more"
            raise Rejected(
                f"{kept} of {records} {what} of {persona.name} are usable after cleaning "
                f"(malformed, too long or near-duplicates dropped); a retrain needs {needed}{more}."
            )
        cfg = self.config
        await self.commands.check(
            "splitting",
            [
                "data", "split", str(paths.clean), "--output-dir", str(paths.clean.parent),
                "--validation", str(cfg.validation), "--seed", str(cfg.seed),
            ],
            paths.steps_log,
        )  # fmt: skip
        replay = await self._replay(job, paths)
        with paths.steps_log.open("a", encoding="utf-8") as log:
            log.write(f"{replay_note(replay)}\n")
        return kept, replay

    async def _export_own(self, job: Job, persona: Persona, paths: Paths) -> tuple[int, list[str]]:
        """The persona's dialogues as ShareGPT in `paths.export`; how many rows it has, and the
        lines of a dialogue file that are not dialogues (written to the steps log)."""
        problems: list[str] = []
        if job.source:
            rows, problems = await asyncio.to_thread(file_rows, Path(job.source), persona)
            paths.export.write_text("".join(map(sharegpt.jsonl_line, rows)), encoding="utf-8")
            records = len(rows)
            if problems:
                with paths.steps_log.open("a", encoding="utf-8") as log:
                    log.write(f"{len(problems)} lines of {job.source} are left out:\n")
                    log.writelines(f"  {problem}\n" for problem in problems)
        else:
            dialogues = await self.memory.dialogues(job.persona, guild_id=job.guild_id)
            exported = export_dialogues(
                job.persona, persona.card, dialogues, self.names_for(job, dialogues)
            )
            paths.export.write_bytes(exported.jsonl)
            records = exported.records
        (paths.export.parent / sharegpt.DATASET_INFO).write_bytes(
            sharegpt.dataset_info_bytes({f"rolecast_{job.persona}": paths.export.name})
        )
        return records, problems

    async def _clean(self, source: Path, output: Path, paths: Paths) -> None:
        cfg = self.config
        await self.commands.check(
            "cleaning",
            [
                "data", "clean", str(source), "--output", str(output),
                "--base", cfg.base, "--max-length", str(cfg.max_length),
            ],
            paths.steps_log,
        )  # fmt: skip

    async def _replay(self, job: Job, paths: Paths) -> dict[str, Any]:
        """Write the training file: the own training split, then the replayed dialogues."""
        own_lines = read_lines(paths.own_train)
        cap = math.floor(self.config.replay * len(own_lines))
        report: dict[str, Any] = {"own": len(own_lines), "cap": cap, "available": {}}
        pool = await self._others(job, paths) if cap > 0 else {}
        report["available"] = {name: len(lines) for name, lines in pool.items()}
        drawn = draw(pool, cap, self.config.seed)
        report["replayed"] = {name: len(lines) for name, lines in drawn.items()}
        paths.replay_dir.mkdir(parents=True, exist_ok=True)
        for name, lines in drawn.items():
            paths.replayed(name).write_text("".join(lines), encoding="utf-8")
        if cap == 0:
            report["why"] = "retrain.replay is 0" if self.config.replay == 0 else "no own dialogue"
        elif not drawn:
            scope = "in this server" if job.guild_id else "here"
            report["why"] = f"no other persona has usable approved dialogues {scope}"
        extra = [line for name in sorted(drawn) for line in drawn[name]]
        paths.train.write_text("".join(own_lines + extra), encoding="utf-8")
        paths.replay_report.write_text(json.dumps(report, ensure_ascii=False) + "\n")
        return report

    async def _others(self, job: Job, paths: Paths) -> dict[str, list[str]]:
        """The other personas' approved dialogues of the job's scope, cleaned: persona -> JSONL
        lines."""
        owner: dict[str, str] = {}  # row id -> persona
        lines: list[bytes] = []
        # A server's persona is trained within its server, also when the operator runs the job:
        # no other server's words may end up in its adapter (forget-me could not take them out).
        # Personas another server owns are never replayed.
        scope = job.guild_id or self.personas.get(job.persona).guild_id
        for other in self.personas.all():
            if other.key == job.persona or other.guild_id not in (None, scope):
                continue
            dialogues = await self.memory.dialogues(other.key, guild_id=scope)
            if not dialogues:
                continue
            exported = export_dialogues(
                other.key, other.card, dialogues, self.names_for(job, dialogues)
            )
            for line in exported.jsonl.splitlines(keepends=True):
                owner[str(json.loads(line)["id"])] = other.key
                lines.append(line)
        if not lines:
            return {}
        paths.replay_dir.mkdir(parents=True, exist_ok=True)
        raw, clean = paths.replay_dir / "others.jsonl", paths.replay_dir / "others_clean.jsonl"
        raw.write_bytes(b"".join(lines))
        await self._clean(raw, clean, paths)
        pool: dict[str, list[str]] = {}
        for row in read_lines(clean):
            name = owner.get(str(json.loads(row)["id"]))
            if name is None:
                raise Failed(f"cleaning {raw} gave a row it was not given: {row[:200]}")
            pool.setdefault(name, []).append(row)
        return pool


def problem_lines(problems: Sequence[str], paths: Paths, shown: int = 5) -> str:
    """The first lines of a dialogue file that are not dialogues, said under a rejection."""
    if not problems:
        return ""
    more = len(problems) - shown
    tail = f"\n  ... and {more} more in {paths.steps_log}" if more > 0 else ""
    listed = "".join(f"\n  {problem[:300]}" for problem in problems[:shown])
    return f"\n{len(problems)} lines are not usable dialogues:{listed}{tail}"


def draw(pool: dict[str, list[str]], cap: int, seed: int) -> dict[str, list[str]]:
    """At most `cap` lines of the pool, all when they fit, else a seeded draw (the same pool and
    seed draw the same lines); persona -> its lines drawn, in pool order."""
    items = [(name, i) for name in sorted(pool) for i in range(len(pool[name]))]
    if len(items) > cap:
        items = sorted(random.Random(seed).sample(items, cap))
    drawn: dict[str, list[str]] = {}
    for name, i in items:
        drawn.setdefault(name, []).append(pool[name][i])
    return drawn


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a JSONL file, each ending in a newline. Lines end at "\\n" only
    (JSONL): a JSON string may hold U+2028, U+0085 or a form feed raw."""
    with path.open("rb") as f:
        return [raw.decode("utf-8").rstrip("\r\n") + "\n" for raw in f if raw.strip()]


def file_rows(path: Path, persona: Persona) -> tuple[list[dict[str, Any]], list[str]]:
    """The dialogues of a ShareGPT or OpenAI JSONL file as ShareGPT rows, and what is wrong
    with each line that is not one (`line N: code: why`). A row without a system prompt gets
    the persona card's. A row is taken whole or not at all: one with a turn that cannot be
    read is a problem of its line, not a shorter dialogue; `rolecast data clean` then checks
    the rows taken."""
    try:
        lines = jsonfile.read_jsonl(path)
    except FormatError as exc:
        raise Failed(f"cannot read the dialogue file: {exc}") from None
    system = render_system(persona.card, user="User")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for line in lines:
        if line.code is not None:
            problems.append(f"line {line.number}: {line.code}: {line.message}")
            continue
        messages, wrong = sharegpt.read_messages(line.value)
        if not wrong and not messages:
            wrong = [("bad_format", "has no turns")]
        if wrong or not messages:
            problems.append(f"line {line.number}: " + "; ".join(f"{c}: {m}" for c, m in wrong))
            continue
        if messages[0]["role"] != sharegpt.SYSTEM:
            messages = [{"role": sharegpt.SYSTEM, "content": system}, *messages]
        row_id = sharegpt.row_id(line.value, f"{path.stem}:{line.number}")
        row = sharegpt.sharegpt_row(row_id, messages)
        try:
            sharegpt.jsonl_line(row).encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON escapes can carry lone surrogates ("\ud800")
            problems.append(
                f"line {line.number}: bad_text: {exc.object[exc.start : exc.end]!r} at character "
                f"{exc.start} cannot be encoded"
            )
            continue
        rows.append(row)
    return rows, problems
