"""Retrain jobs in SQLite: the state machine's rows (`retrain_jobs`, migration m003).

    queued -> exporting -> training -> evaluating -> publishing -> done
                 |             |            |             |
                 +-------------+------------+-------------+--> rejected | failed

`rejected`: the job ran as designed and decided not to publish (too few dialogues, the gate).
`failed`: something broke (training exited non-zero, the server refused the adapter); the
reason says what. At most one job per persona is not terminal (a partial unique index).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiosqlite

from bot.core import sql
from bot.errors import RolecastError

State = Literal[
    "queued", "exporting", "training", "evaluating", "publishing", "done", "rejected", "failed"
]
STEPS: tuple[State, ...] = ("queued", "exporting", "training", "evaluating", "publishing")
TERMINAL: tuple[State, ...] = ("done", "rejected", "failed")


@dataclass(frozen=True)
class Job:
    id: int
    persona: str
    state: State
    reason: str | None
    requested_by: str | None
    guild_id: str | None
    channel_id: str | None
    message_id: str | None
    min_approved: int
    workdir: str | None
    pid: int | None
    attempts: int
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    dialogues: int | None
    metrics: dict[str, Any] | None
    old_version: str | None
    new_version: str | None
    created_at: float
    exporting_at: float | None
    training_at: float | None
    evaluating_at: float | None
    publishing_at: float | None
    finished_at: float | None
    updated_at: float
    pid_started: float | None  # the training process's start time (psutil), with `pid`
    source: str | None = None  # a dialogue file to train on; None = the approved dialogues

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Job:
        values = list(row)
        values[18] = json.loads(str(values[18])) if values[18] else None
        return cls(*values)  # type: ignore[arg-type]

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def since(self) -> float:
        """When the job entered its current state."""
        at = {
            "queued": self.created_at,
            "exporting": self.exporting_at,
            "training": self.training_at,
            "evaluating": self.evaluating_at,
            "publishing": self.publishing_at,
        }.get(self.state, self.finished_at)
        return at or self.updated_at


class JobActive(RolecastError):
    """A persona already has a job that is not finished."""

    def __init__(self, job: Job) -> None:
        self.job = job
        since = datetime.fromtimestamp(job.since).strftime("%Y-%m-%d %H:%M:%S")
        super().__init__(f"job #{job.id} for {job.persona} is {job.state} since {since}")


class JobStore:
    """The job rows, on the connection the entry point opened (`Memory.db`)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def create(
        self,
        persona: str,
        *,
        min_approved: int,
        requested_by: str | None,
        guild_id: str | None = None,
        channel_id: str | None = None,
        message_id: str | None = None,
        source: str | None = None,
    ) -> Job:
        """A queued job, or JobActive naming the persona's unfinished one."""
        now = time.time()
        try:
            cursor = await self.db.execute(
                sql.INSERT_RETRAIN_JOB,
                (
                    persona, requested_by, guild_id, channel_id, message_id, min_approved,
                    source, now, now,
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            active = await self.active(persona)
            if active is None:  # finished in between: try once more
                return await self.create(
                    persona,
                    min_approved=min_approved,
                    requested_by=requested_by,
                    guild_id=guild_id,
                    channel_id=channel_id,
                    message_id=message_id,
                    source=source,
                )
            raise JobActive(active) from None
        await self.db.commit()
        assert cursor.lastrowid is not None
        return await self.get(cursor.lastrowid)

    async def get(self, job_id: int) -> Job:
        async with self.db.execute(sql.SELECT_RETRAIN_JOB, (job_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise RolecastError(f"there is no retrain job #{job_id}")
        return Job.from_row(row)

    async def active(self, persona: str) -> Job | None:
        async with self.db.execute(sql.SELECT_ACTIVE_RETRAIN_JOB, (persona,)) as cursor:
            row = await cursor.fetchone()
        return Job.from_row(row) if row else None

    async def unfinished(self) -> list[Job]:
        rows = await self.db.execute_fetchall(sql.SELECT_ACTIVE_RETRAIN_JOBS)
        return [Job.from_row(r) for r in rows]

    async def recent(self, persona: str | None = None, limit: int = 20) -> list[Job]:
        rows = await self.db.execute_fetchall(
            sql.SELECT_RECENT_RETRAIN_JOBS, (persona, persona, limit)
        )
        return [Job.from_row(r) for r in rows]

    async def _write(self, statement: str, values: Sequence[object], job_id: int) -> Job:
        await self.db.execute(statement, (*values, time.time(), job_id))
        await self.db.commit()
        return await self.get(job_id)

    async def move(self, job: Job, state: State, reason: str | None = None) -> Job:
        if job.terminal:
            raise RolecastError(f"job #{job.id} is {job.state} already")
        await self.db.execute(sql.UPDATE_RETRAIN_JOB_STATE, (state, reason, time.time(), job.id))
        await self.db.commit()
        return await self.get(job.id)

    async def set_message(self, job: Job, channel_id: str, message_id: str) -> Job:
        return await self._write(sql.UPDATE_RETRAIN_JOB_MESSAGE, (channel_id, message_id), job.id)

    async def set_export(
        self, job: Job, workdir: str, dialogues: int, old_version: str | None
    ) -> Job:
        return await self._write(
            sql.UPDATE_RETRAIN_JOB_EXPORT, (workdir, dialogues, old_version), job.id
        )

    async def set_pid(
        self, job: Job, pid: int | None, started: float | None, *, launched: bool = False
    ) -> Job:
        """The training process (pid and start time) now followed; None when none runs."""
        return await self._write(sql.UPDATE_RETRAIN_JOB_PID, (pid, started, int(launched)), job.id)

    async def set_progress(
        self,
        job: Job,
        step: int,
        total_steps: int | None,
        loss: float | None,
        tokens_per_s: float | None,
        eta_s: float | None,
    ) -> Job:
        return await self._write(
            sql.UPDATE_RETRAIN_JOB_PROGRESS, (step, total_steps, loss, tokens_per_s, eta_s), job.id
        )

    async def set_result(
        self, job: Job, *, metrics: dict[str, Any] | None = None, new_version: str | None = None
    ) -> Job:
        raw = json.dumps(metrics, ensure_ascii=False) if metrics is not None else None
        return await self._write(sql.UPDATE_RETRAIN_JOB_RESULT, (raw, new_version), job.id)
