"""The retrain job runner: each state's step, run in order until the job ends.

Every step is idempotent, so a job picked up again after a restart simply redoes the step it
was in; training is the exception, because it is long: a training process that is still running
is followed, and one that died is launched again with `--resume` (its last checkpoint).

Steps run the other packages' command lines as child processes (`sys.executable -m rolecast
...`). Training is launched with `subprocess.Popen` in its own session, not as an asyncio
subprocess: asyncio kills a child whose transport is closed, and a training run has to outlive
the bot that started it. Its output goes to `<workdir>/train.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.core.export import Names, export_dialogues
from bot.core.memory import Dialogue, Memory
from bot.core.personas import PersonaRegistry
from bot.errors import RolecastError
from bot.retrain import adapters
from bot.retrain.jobs import Job, JobStore, State
from bot.retrain.progress import LossLogReader, planned_steps
from bot.settings import BotSettings

log = logging.getLogger(__name__)

Listener = Callable[[Job], Awaitable[None]]
NamesFor = Callable[[Job, Sequence[Dialogue]], Names]

GATE_METRICS = ("bleu-4", "rouge-l")
ADAPTER, LOSS_LOG, LOSS_PNG, EVAL_PNG = "adapter", "loss.jsonl", "loss.png", "metrics.png"


class Rejected(Exception):
    """The job decided not to publish; the message says why."""


class Failed(Exception):
    """A step could not be done; the message says what broke."""


@dataclass(frozen=True)
class Paths:
    """Where a job's files are, under its work directory."""

    workdir: Path
    persona: str

    @property
    def export(self) -> Path:
        return self.workdir / "export" / f"{self.persona}.jsonl"

    @property
    def clean(self) -> Path:
        return self.workdir / "data" / f"{self.persona}.jsonl"

    @property
    def train(self) -> Path:
        return self.workdir / "data" / f"{self.persona}_train.jsonl"

    @property
    def validation(self) -> Path:
        return self.workdir / "data" / f"{self.persona}_validation.jsonl"

    @property
    def adapter(self) -> Path:
        return self.workdir / ADAPTER

    @property
    def eval_dir(self) -> Path:
        return self.workdir / "eval"

    @property
    def train_log(self) -> Path:
        return self.workdir / "train.log"

    @property
    def steps_log(self) -> Path:
        return self.workdir / "steps.log"

    @property
    def loss_png(self) -> Path:
        return self.adapter / LOSS_PNG

    @property
    def eval_png(self) -> Path:
        return self.eval_dir / EVAL_PNG

    def trained(self) -> bool:
        return (self.adapter / "rolecast.json").is_file() and (
            self.adapter / "adapter_model.safetensors"
        ).is_file()

    def has_checkpoint(self) -> bool:
        """A finished checkpoint (the trainer writes its state.json last) to resume from."""
        return any(self.adapter.glob("checkpoints/step-*/state.json"))


def gate(
    scores: dict[str, dict[str, float]], against: str, tolerance: float
) -> tuple[bool, list[str]]:
    """Whether the new adapter is not worse than `against` beyond `tolerance` points on
    BLEU-4 and ROUGE-L, and the lines that say so."""
    new, old = scores["adapter"], scores[against]
    ok, lines = True, []
    for metric in GATE_METRICS:
        delta = new[metric] - old[metric]
        passed = delta >= -tolerance
        ok = ok and passed
        lines.append(
            f"{metric}: {new[metric]:.2f} vs {old[metric]:.2f} ({delta:+.2f}) "
            f"{'ok' if passed else 'worse'}"
        )
    return ok, lines


def score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(scores.values())))
    rows = [" | ".join(["model", *metrics])]
    rows += [" | ".join([name, *(f"{s[m]:.2f}" for m in metrics)]) for name, s in scores.items()]
    return "\n".join(rows)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


def process_alive(pid: int, marker: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, where /proc tells, is the process whose command
    line holds `marker` (a recycled pid is not mistaken for the training run)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if marker is not None:
            return marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False
    return True


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
        python: str = sys.executable,
    ) -> None:
        self.memory = memory
        self.personas = personas
        self.settings = settings
        self.config = settings.retrain
        self.server_url = server_url
        self.listener = listener
        self.names_for = names_for
        self.python = python
        self.store = JobStore(memory.db)
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
    ) -> Job:
        """Queue a job and run it in the background; JobActive if one is unfinished."""
        key = self.personas.get(persona).key
        job = await self.store.create(
            key,
            min_approved=min_approved or self.config.min_approved,
            requested_by=requested_by,
            guild_id=guild_id,
            channel_id=channel_id,
            message_id=message_id,
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

    def versions(self, persona: str) -> tuple[list[adapters.Version], str | None]:
        """The persona's versions and the live served name (None: the base model)."""
        root = self.settings.adapters
        return adapters.versions(root, persona), adapters.current_served_name(root, persona)

    async def rollback(self, persona: str) -> str:
        """Return the persona to its previous version on the server; the CLI's answer."""
        key = self.personas.get(persona).key
        args = ["adapters", "rollback", key, "--adapters-dir", str(self.settings.adapters)]
        if self.server_url:
            args += ["--server", self.server_url]
        code, output = await self._cli(args, None)
        if code != 0:
            raise RolecastError(output.strip().removeprefix("error: ") or "rollback failed")
        return output.strip().splitlines()[-1]

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
        except (Failed, RolecastError) as exc:
            job = await self._end(job, "failed", str(exc))
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
        persona = self.personas.get(job.persona)
        paths = Paths(self.workdir_for(job), job.persona)
        paths.export.parent.mkdir(parents=True, exist_ok=True)
        dialogues = await self.memory.dialogues(job.persona, guild_id=job.guild_id)
        names = self.names_for(job, dialogues) if self.names_for else author_names(dialogues)
        exported = export_dialogues(job.persona, persona.card, dialogues, names)
        needed = job.min_approved
        if exported.records < needed:
            raise Rejected(
                f"{persona.name} has {exported.records} approved dialogues"
                f"{' in this server' if job.guild_id else ''}; a retrain needs {needed}: "
                f"approve {needed - exported.records} more."
            )
        paths.export.write_bytes(exported.jsonl)
        (paths.export.parent / "dataset_info.json").write_bytes(exported.dataset_info)
        cfg = self.config
        await self._check(
            "cleaning",
            [
                "data", "clean", str(paths.export), "--output", str(paths.clean),
                "--base", cfg.base, "--max-length", str(cfg.max_length),
            ],
            paths.steps_log,
        )  # fmt: skip
        kept = _count_lines(paths.clean)
        if kept < needed:
            raise Rejected(
                f"{kept} of {exported.records} approved dialogues of {persona.name} are usable "
                f"after cleaning (malformed, too long or near-duplicates dropped); a retrain "
                f"needs {needed}: approve {needed - kept} more."
            )
        await self._check(
            "splitting",
            [
                "data", "split", str(paths.clean), "--output-dir", str(paths.clean.parent),
                "--validation", str(cfg.validation), "--seed", str(cfg.seed),
            ],
            paths.steps_log,
        )  # fmt: skip
        live = adapters.current_served_name(self.settings.adapters, job.persona)
        job = await self.store.set_export(job, str(paths.workdir), kept, live)
        return await self.store.move(job, "training")

    # -- training -------------------------------------------------------------------------

    def train_command(self, job: Job, *, resume: bool) -> list[str]:
        paths = self.paths(job)
        fields = {
            "python": self.python,
            "train": str(paths.train),
            "validation": str(paths.validation),
            "persona": job.persona,
            "base": self.config.base,
            "output": str(paths.adapter),
            "workdir": str(paths.workdir),
        }
        try:
            argv = [part.format(**fields) for part in shlex.split(self.config.launch)]
        except (KeyError, IndexError, ValueError) as exc:
            raise Failed(f"the training launch template is invalid ({exc!r})") from None
        # the trainer refuses dialogues over its --max_length (2048 unless given): give it the
        # length cleaning kept, so one setting governs both; train_args may still override it
        argv += ["--max_length", str(self.config.max_length), *self.config.train_args]
        argv.append("--no_progress")
        if resume:
            argv.append("--resume")
        return argv

    async def _train(self, job: Job) -> Job:
        paths = self.paths(job)
        max_steps, epochs = planned_steps(list(self.config.train_args))
        while not paths.trained():
            proc: subprocess.Popen[bytes] | None = None
            marker = str(paths.adapter)
            if job.pid is not None and process_alive(job.pid, marker):
                log.warning("job #%d: following training process %d", job.id, job.pid)
                pid = job.pid
            else:
                if job.attempts >= self.config.max_attempts:
                    raise Failed(
                        f"training stopped {job.attempts} times without finishing; "
                        f"last lines of {paths.train_log}:\n{_tail(paths.train_log)}"
                    )
                proc = self._launch(job, paths, resume=paths.has_checkpoint())
                pid = proc.pid
                job = await self.store.set_pid(job, pid, launched=True)
            reader = LossLogReader(paths.adapter / LOSS_LOG, max_steps=max_steps, epochs=epochs)
            job = await self._follow(job, reader, proc, pid, marker)
            if proc is not None and not paths.trained():
                code = proc.returncode
                why = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
                raise Failed(
                    f"training failed ({why}); last lines of {paths.train_log}:\n"
                    f"{_tail(paths.train_log)}"
                )
            # a followed process that ended without an adapter died: resume it
        job = await self.store.set_pid(job, None)
        return await self.store.move(job, "evaluating")

    def _launch(self, job: Job, paths: Paths, *, resume: bool) -> subprocess.Popen[bytes]:
        argv = self.train_command(job, resume=resume)
        paths.workdir.mkdir(parents=True, exist_ok=True)
        with paths.train_log.open("ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the bot; a Ctrl-C there does not reach it
                )
            except OSError as exc:
                raise Failed(f"could not start the training command {argv[0]!r}: {exc}") from exc
        log.warning("job #%d: training started (pid %d): %s", job.id, proc.pid, shlex.join(argv))
        return proc

    async def _follow(
        self,
        job: Job,
        reader: LossLogReader,
        proc: subprocess.Popen[bytes] | None,
        pid: int,
        marker: str,
    ) -> Job:
        while True:
            running = proc.poll() is None if proc is not None else process_alive(pid, marker)
            progress = reader.poll()
            if progress is not None:
                job = await self.store.set_progress(
                    job,
                    progress.step,
                    progress.total_steps,
                    progress.loss,
                    progress.tokens_per_s,
                    progress.eta_s,
                )
                await self._notify(job)
            if not running:
                return job
            await asyncio.sleep(self.config.poll_s)

    # -- gate and publish -----------------------------------------------------------------

    async def _evaluate(self, job: Job) -> Job:
        paths = self.paths(job)
        live = adapters.current(self.settings.adapters, job.persona)
        args = [
            "eval", "--data", str(paths.validation), "--adapter", str(paths.adapter),
            "--base", self.config.base, "--output", str(paths.eval_dir),
            "--max-new-tokens", str(self.config.eval_max_new_tokens),
        ]  # fmt: skip
        if live is not None:
            args += ["--baseline", str(live.path)]
        await self._check("evaluation", args, paths.steps_log)
        report = json.loads((paths.eval_dir / "metrics.json").read_text(encoding="utf-8"))
        scores: dict[str, dict[str, float]] = report["scores"]
        against = "baseline" if live is not None else "base"
        label = live.served_name if live is not None else "the base model"
        passed, lines = gate(scores, against, self.config.tolerance)
        named = {
            (label if k == against else "new" if k == "adapter" else k): v
            for k, v in scores.items()
        }
        metrics: dict[str, Any] = {
            "against": label,
            "dialogues": report.get("dialogues"),
            "scores": named,
            "tolerance": self.config.tolerance,
            "passed": passed,
        }
        job = await self.store.set_result(job, metrics=metrics)
        if not passed:
            raise Rejected(
                f"the new adapter is worse than {label} beyond the tolerance of "
                f"{self.config.tolerance:g} points; nothing changed.\n"
                + "\n".join(lines)
                + "\n\n"
                + score_table(named)
            )
        _record_eval(paths.adapter, job.id, scores["adapter"], label)
        return await self.store.move(job, "publishing")

    async def _publish(self, job: Job) -> Job:
        paths = self.paths(job)
        root = self.settings.adapters
        live = adapters.current(root, job.persona)
        if live is None or live.manifest.get("retrain_job") != job.id:  # not done before
            args = [
                "adapters", "publish", str(paths.adapter), "--persona", job.persona,
                "--adapters-dir", str(root),
            ]  # fmt: skip
            if self.server_url:
                args += ["--server", self.server_url]
            await self._check("publishing", args, paths.steps_log)
            live = adapters.current(root, job.persona)
        if live is None:
            raise Failed(f"the registry at {root} has no current version after publishing")
        job = await self.store.set_result(job, new_version=live.served_name)
        was = job.old_version or "the base model"
        return await self.store.move(
            job, "done", f"{job.persona} now speaks through {live.served_name} (was {was})"
        )

    # -- child processes ------------------------------------------------------------------

    async def _cli(self, args: list[str], log_path: Path | None) -> tuple[int, str]:
        """`python -m rolecast ARGS`; returns the exit code and its output."""
        argv = [self.python, "-m", "rolecast", *args]
        log.info("running %s", shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            raise
        text = out.decode(errors="replace")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a", encoding="utf-8") as f:
                f.write(f"$ {shlex.join(argv)}\n{text}[exit {proc.returncode}]\n")
        return int(proc.returncode or 0), text

    async def _check(self, what: str, args: list[str], log_path: Path) -> str:
        started = time.monotonic()
        code, text = await self._cli(args, log_path)
        if code != 0:
            tail = "\n".join([line for line in text.splitlines() if line.strip()][-8:])
            raise Failed(f"{what} failed (exit code {code}):\n{tail}")
        log.info("%s took %.1f s", what, time.monotonic() - started)
        return text


def author_names(dialogues: Sequence[Dialogue]) -> Names:
    """Display names known from the dialogues themselves (the terminal has no guild)."""
    users = {
        str(m["author_id"]): str(m["author_name"])
        for d in dialogues
        for m in d.messages
        if m.get("author_id") and m.get("author_name")
    }
    return Names(users=users, roles={}, channels={})


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _record_eval(adapter: Path, job_id: int, scores: dict[str, float], against: str) -> None:
    """Put the gate's scores into the adapter's rolecast.json, so the registry lists them."""
    path = adapter / "rolecast.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.setdefault("metrics", {}).update({k: round(v, 2) for k, v in scores.items()})
    manifest["eval"] = {"against": against, "scores": scores}
    manifest["retrain_job"] = job_id
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
