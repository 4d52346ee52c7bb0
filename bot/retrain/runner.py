"""The retrain job runner: the job's state machine, each state's step run in order until the job
ends.

    queued -> exporting -> training -> evaluating -> publishing -> done | rejected | failed

Every step is idempotent, so a job picked up again after a restart simply redoes the step it
was in; training is the exception, because it is long: a training process that is still running
is followed, and one that died is launched again with `--resume` (`bot.retrain.training`). The
export step (the persona's dialogues, the held-out split, the replayed dialogues of the other
personas) is `bot.retrain.dataset`, training `bot.retrain.training`, the gate and publishing
`bot.retrain.gate`, and every step runs the other packages' commands as child processes
(`bot.retrain.children`), so nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from bot.core.export import Names
from bot.core.memory import Dialogue, Memory
from bot.core.personas import PersonaRegistry
from bot.errors import RolecastError
from bot.retrain.children import Failed, RolecastCommands, json_result
from bot.retrain.dataset import Datasets
from bot.retrain.gate import GateAndPublish, Rejected
from bot.retrain.jobs import Job, JobStore, State
from bot.retrain.training import TrainingSupervisor
from bot.retrain.workdir import Paths
from bot.settings import BotSettings
from formats.errors import FormatError
from formats.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)

#: The fewest dialogues a job may ask for: one to train on and one held out for the gate.
MIN_DIALOGUES = 2

Listener = Callable[[Job], Awaitable[None]]
NamesFor = Callable[[Job, Sequence[Dialogue]], Names]


class RetrainService:
    """Starts, runs and resumes retrain jobs; one per process, opened by the entry point."""

    def __init__(
        self,
        memory: Memory,
        personas: PersonaRegistry,
        settings: BotSettings,
        *,
        server_url: str | None,
        listener: Listener | None = None,
        names_for: NamesFor | None = None,
        python: str | None = None,
    ) -> None:
        self.memory = memory
        self.personas = personas
        self.settings = settings
        self.config = settings.retrain
        self.server_url = server_url
        self.listener = listener
        self.names_for = names_for
        python = python or self.config.python or sys.executable
        self.python = python
        self.store = JobStore(memory.db)
        self.registry = AdapterRegistry(settings.adapters)
        self.commands = RolecastCommands(python)
        self.training = TrainingSupervisor(self.store, self.config, python, self._notify)
        self.gate = GateAndPublish(self.store, settings, self.commands, server_url)
        self.datasets = Datasets(
            memory, personas, self.config, self.commands, names_for or _author_names_for
        )
        self._tasks: dict[int, asyncio.Task[Job]] = {}

    # -- public ---------------------------------------------------------------------------

    async def start(
        self,
        persona: str,
        *,
        requested_by: str | None,
        min_approved: int | None = None,
        guild_id: str | None = None,
        channel_id: str | None = None,
        message_id: str | None = None,
        data: Path | None = None,
    ) -> Job:
        """Queue a job and run it in the background; JobActive if one is unfinished. With
        `data`, the job trains on that dialogue file instead of the approved dialogues."""
        key = self.personas.get(persona).key
        needed = self.config.min_approved if min_approved is None else min_approved
        if needed < MIN_DIALOGUES:
            raise RolecastError(
                f"a retrain needs at least {MIN_DIALOGUES} dialogues (one to train on, one held "
                f"out for the gate), not {needed}"
            )
        source = await asyncio.to_thread(dialogue_file, data) if data is not None else None
        job = await self.store.create(
            key,
            min_approved=needed,
            requested_by=requested_by,
            guild_id=guild_id,
            channel_id=channel_id,
            message_id=message_id,
            source=source,
        )
        self._spawn(job)
        return job

    async def resume_jobs(self) -> list[Job]:
        """Pick up every unfinished job (after a restart); returns them."""
        jobs = [j for j in await self.store.unfinished() if j.id not in self._tasks]
        for job in jobs:
            log.warning("resuming retrain job #%d for %s (%s)", job.id, job.persona, job.state)
            self._spawn(job)
        return jobs

    async def wait(self, job_id: int) -> Job:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return await self.store.get(job_id)

    def running(self) -> list[int]:
        return sorted(self._tasks)

    async def aclose(self) -> None:
        """Stop following jobs; training processes keep running and are picked up again by
        the next `resume_jobs`."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def paths(self, job: Job) -> Paths:
        workdir = Path(job.workdir) if job.workdir else self.workdir_for(job)
        return Paths(workdir, job.persona)

    def workdir_for(self, job: Job) -> Path:
        return self.settings.retrain_dir / f"{job.persona}-{job.id}"

    def versions(self, persona: str) -> tuple[list[AdapterVersion], str | None]:
        """The persona's versions and the live served name (None: the base model)."""
        return self.registry.versions(persona), self.registry.current_served_name(persona)

    def train_command(self, job: Job, *, resume: bool) -> list[str]:
        """The command line that trains `job` (the `retrain.launch` template, filled in)."""
        return self.training.command(job, self.paths(job), resume=resume)

    async def rollback(self, persona: str) -> str:
        """Return the persona to its previous version (from its first: the base model) on the
        server; the CLI's answer."""
        key = self.personas.get(persona).key
        args = ["adapters", "rollback", key, "--adapters-dir", str(self.registry.root), "--json"]
        if self.server_url:
            args += ["--server", self.server_url]
        code, output = await self.commands.run(args, None)
        result = json_result(output) if code == 0 else None
        if result is None:
            lines = output.strip().splitlines()
            starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
            # the last error with the lines under it (a refusal lists its reasons there)
            said = "\n".join(lines[starts[-1] :]).removeprefix("error: ") if starts else ""
            raise RolecastError(said or output.strip() or "rollback failed")
        return str(result["message"])

    # -- the state machine ----------------------------------------------------------------

    def _spawn(self, job: Job) -> None:
        task = asyncio.create_task(self.run(job), name=f"retrain-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

    async def run(self, job: Job) -> Job:
        """Run the job's steps from its current state to the end."""
        steps: dict[State, Callable[[Job], Awaitable[Job]]] = {
            "queued": self._begin,
            "exporting": self._export,
            "training": self._train,
            "evaluating": self._evaluate,
            "publishing": self._publish,
        }
        await self._notify(job)
        try:
            while not job.terminal:
                job = await steps[job.state](job)
                await self._notify(job)
        except Rejected as exc:
            job = await self._end(job, "rejected", str(exc))
        except (Failed, RolecastError, FormatError) as exc:
            job = await self._end(job, "failed", str(exc))
        except OSError as exc:  # a work directory that cannot be written, a full disk...
            log.warning("retrain job #%d: %s", job.id, exc)
            job = await self._end(
                job, "failed", f"{job.state} stopped: {file_error(exc, self.paths(job).workdir)}"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("retrain job #%d broke", job.id)
            job = await self._end(job, "failed", f"unexpected error: {exc!r}")
        return job

    async def _end(self, job: Job, state: State, reason: str) -> Job:
        job = await self.store.move(await self.store.get(job.id), state, reason)
        log.warning("retrain job #%d for %s %s: %s", job.id, job.persona, state, reason)
        await self._notify(job)
        return job

    async def _notify(self, job: Job) -> None:
        if self.listener is None:
            return
        try:
            await self.listener(job)
        except Exception:
            log.exception("retrain job #%d: the progress listener failed", job.id)

    async def _begin(self, job: Job) -> Job:
        return await self.store.move(job, "exporting")

    async def _export(self, job: Job) -> Job:
        paths = Paths(self.workdir_for(job), job.persona)
        kept, replay = await self.datasets.build(job, paths)
        live = self.registry.current_served_name(job.persona)
        job = await self.store.set_export(job, str(paths.workdir), kept, live)
        job = await self.store.set_result(job, metrics={"replay": replay})
        return await self.store.move(job, "training")

    async def _train(self, job: Job) -> Job:
        job = await self.training.run(job, self.paths(job))
        return await self.store.move(job, "evaluating")

    async def _evaluate(self, job: Job) -> Job:
        shipped = self.personas.get(job.persona).builtin
        return await self.gate.evaluate(job, self.paths(job), shipped=shipped)

    async def _publish(self, job: Job) -> Job:
        return await self.gate.publish(job, self.paths(job))


def file_error(exc: OSError, workdir: Path) -> str:
    """An OSError in one line, with the file it is about (`Not a directory: PATH`), or for one
    that names none (a write to a full disk), the job's work directory."""
    what = exc.strerror or str(exc) or type(exc).__name__
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(files)}" if files else f"{what} (in {workdir})"


def dialogue_file(path: Path) -> str:
    """The absolute path of a dialogue file a job is to train on; RolecastError if none."""
    if not path.is_file():
        raise RolecastError(f"no dialogue file at {path}")
    return str(path.resolve())


def _author_names_for(job: Job, dialogues: Sequence[Dialogue]) -> Names:
    return author_names(dialogues)


def author_names(dialogues: Sequence[Dialogue]) -> Names:
    """Display names known from the dialogues themselves (the terminal has no guild)."""
    users = {
        str(m["author_id"]): str(m["author_name"])
        for d in dialogues
        for m in d.messages
        if m.get("author_id") and m.get("author_name")
    }
    return Names(users=users, roles={}, channels={})
