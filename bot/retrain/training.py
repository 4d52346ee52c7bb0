"""The training step: `rolecast train --json` in its own process, supervised until it is done.

Training is launched with `subprocess.Popen` in its own session, not as an asyncio subprocess:
asyncio kills a child whose transport is closed, and a training run has to outlive the bot that
started it. Its output goes to `<workdir>/train.log`, which the loop follows for the run's JSON
lines (`bot.retrain.progress.TrainLog`). The process is known by its pid and start time
(psutil), kept in the job's row, so a restarted bot follows a run that is still going, and a pid
that the system has given to another process since is not taken for it. A run that died is
launched again with `--resume` when it reported a checkpoint, up to `retrain.max_attempts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

from bot.retrain.children import Failed
from bot.retrain.jobs import Job, JobStore
from bot.retrain.progress import TrainLog
from bot.retrain.workdir import Paths
from bot.settings import RetrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingProcess:
    """A process known by its pid and its start time together."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> TrainingProcess:
        return cls(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        """Whether it still runs: the same process (not a recycled pid), and not a zombie."""
        try:
            process = psutil.Process(self.pid)
            same = abs(process.create_time() - self.started) < 0.01
            return same and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def stop(process: TrainingProcess, grace_s: float = 10.0) -> None:
    """Stop a training run and what it started (its session): SIGTERM, then SIGKILL after
    `grace_s`. Nothing happens when it has ended, or its pid is another process's now."""
    if not process.alive():
        return
    log.warning("stopping training process %d", process.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # launched in its own session: the group is its pid
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(psutil.Error):
                psutil.Process(process.pid).send_signal(sig)
        deadline = time.monotonic() + grace_s
        while process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not process.alive():
            return


class TrainingSupervisor:
    """Launches, follows and relaunches a job's training run."""

    def __init__(
        self,
        store: JobStore,
        config: RetrainSettings,
        python: str,
        notify: Callable[[Job], Awaitable[None]],
    ) -> None:
        self.store = store
        self.config = config
        self.python = python
        self.notify = notify

    def command(self, job: Job, paths: Paths, *, resume: bool) -> list[str]:
        fields = {
            "python": self.python,
            "train": str(paths.training_file()),
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
        argv.append("--json")
        if resume:
            argv.append("--resume")
        return argv

    async def run(self, job: Job, paths: Paths) -> Job:
        """Train until the run reports its result; Failed when it cannot."""
        train_log = TrainLog(paths.train_log)
        train_log.poll()  # what earlier attempts (before a restart) reported
        while train_log.result is None:
            proc: subprocess.Popen[bytes] | None = None
            followed = (
                TrainingProcess(job.pid, job.pid_started)
                if job.pid is not None and job.pid_started is not None
                else None
            )
            if followed is not None and followed.alive():
                log.warning("job #%d: following training process %d", job.id, followed.pid)
                process = followed
            else:
                if job.attempts >= self.config.max_attempts:
                    raise Failed(
                        f"training stopped {job.attempts} times without finishing; "
                        f"last lines of {paths.train_log}:\n{train_log.tail()}"
                    )
                resume = train_log.checkpoint_step is not None
                proc, process = self._launch(job, paths, resume=resume)
                job = await self.store.set_pid(job, process.pid, process.started, launched=True)
            try:
                job = await self._follow(job, train_log, proc, process)
            except Exception:
                # the job is about to fail: its run must not go on unseen, beside the next
                # job's (a cancelled loop, the bot stopping, leaves it running to be resumed)
                await asyncio.to_thread(stop, process)
                raise
            if proc is not None and train_log.result is None:
                code = proc.returncode
                why = f"killed by signal {-code}" if code and code < 0 else f"exit code {code}"
                raise Failed(
                    f"training failed ({why}); last lines of {paths.train_log}:\n{train_log.tail()}"
                )
            # a followed process that ended without a result died: resume it
        return await self.store.set_pid(job, None, None)

    def _launch(
        self, job: Job, paths: Paths, *, resume: bool
    ) -> tuple[subprocess.Popen[bytes], TrainingProcess]:
        argv = self.command(job, paths, resume=resume)
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
        try:
            return proc, TrainingProcess.of(proc.pid)
        except psutil.NoSuchProcess:  # it has ended already: reaped below by proc.poll()
            return proc, TrainingProcess(proc.pid, 0.0)

    async def _follow(
        self,
        job: Job,
        train_log: TrainLog,
        proc: subprocess.Popen[bytes] | None,
        process: TrainingProcess,
    ) -> Job:
        while True:
            running = proc.poll() is None if proc is not None else process.alive()
            progress = train_log.poll()
            if progress is not None:
                job = await self.store.set_progress(
                    job,
                    progress.step,
                    progress.total_steps,
                    progress.loss,
                    progress.tokens_per_s,
                    progress.eta_s,
                )
                await self.notify(job)
            if not running:
                return job
            await asyncio.sleep(self.config.poll_s)
