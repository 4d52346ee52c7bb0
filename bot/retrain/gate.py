"""The last two steps: the gate and publishing.

The gate evaluates the new adapter on the held-out dialogues (`rolecast eval`) against what
users get now: the live version; for a shipped persona that has none, on the default model, the
adapter that ships for it; else the base model. It passes when
the new adapter loses no more than `retrain.tolerance` points of BLEU-4 and ROUGE-L, and no more
than `retrain.consistency_tolerance` points of persona consistency (`retrain.consistency_metric`:
how much its replies sound like the persona, by a classifier learnt from the job's training
file: the persona's own replies, the replayed personas' and the users' turns, as
`finetune.consistency` describes); its scores go into the adapter's manifest
(`formats.manifest`) so the registry lists them. Publishing is
`rolecast adapters publish --json`, which hot-loads the new version into the model server,
switches the registry's pointer and retires the old version after its requests drain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from bot.retrain.children import Failed, RolecastCommands, json_result
from bot.retrain.jobs import Job, JobStore
from bot.retrain.workdir import Paths
from bot.settings import BotSettings
from formats import basemodel, jsonfile
from formats.errors import RegistryError
from formats.manifest import EvalInfo, Manifest, read_manifest, write_manifest
from formats.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger(__name__)

GATE_METRICS = ("bleu-4", "rouge-l")


class Rejected(Exception):
    """The job decided not to publish; the message says why."""


def gate(
    scores: dict[str, dict[str, float]],
    against: str,
    tolerance: float,
    consistency: tuple[str, float] | None = None,
) -> tuple[bool, list[str]]:
    """Whether the new adapter is not worse than `against` beyond `tolerance` points on
    BLEU-4 and ROUGE-L, nor beyond the tolerance of `consistency` (a persona-consistency
    figure and its tolerance in points), and the lines that say so."""
    new, old = scores["adapter"], scores[against]
    checks = [(metric, tolerance) for metric in GATE_METRICS]
    if consistency is not None:
        checks.append(consistency)
    ok, lines = True, []
    for metric, allowed in checks:
        delta = new[metric] - old[metric]
        passed = delta >= -allowed
        ok = ok and passed
        lines.append(
            f"{metric}: {new[metric]:.2f} vs {old[metric]:.2f} ({delta:+.2f}, may lose "
            f"{allowed:g}) {'ok' if passed else 'worse'}"
        )
    return ok, lines


def score_table(scores: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(scores.values())))
    rows = [" | ".join(["model", *metrics])]
    rows += [" | ".join([name, *(f"{s[m]:.2f}" for m in metrics)]) for name, s in scores.items()]
    return "\n".join(rows)


def record_eval(paths: Paths, job_id: int, scores: dict[str, float], against: str) -> None:
    """Put the gate's scores into the adapter's rolecast.json, so the registry lists them."""
    manifest = read_manifest(paths.adapter)
    manifest.metrics = {**manifest.metrics, **{k: round(v, 2) for k, v in scores.items()}}
    manifest.eval = EvalInfo(against=against, scores=scores)
    manifest.retrain_job = job_id
    write_manifest(paths.adapter, manifest)


class Report(BaseModel):
    """The part of `rolecast eval`'s `metrics.json` the gate reads."""

    scores: dict[str, dict[str, float]]
    dialogues: int | None = None
    consistency: dict[str, Any] = Field(default_factory=dict)


def read_report(path: Path, models: Sequence[str], metrics: Sequence[str]) -> Report:
    """The evaluation's report, with a score of each of `metrics` for each of `models`; Failed,
    saying what is wrong, when the evaluation wrote none or another file."""
    try:
        data = jsonfile.read_object(path)
        if data is None:
            raise ValueError("it is not there")
        report = Report.model_validate(data)
    except (ValueError, ValidationError) as exc:  # a ValidationError is a ValueError too
        why = str(exc).replace("\n", " ")[:300]
        raise Failed(f"the evaluation's {path} cannot be used: {why}") from None
    missing = [
        f"{m} of {model}"
        for model in models
        for m in metrics
        if m not in report.scores.get(model, {})
    ]
    if missing:
        raise Failed(f"the evaluation's {path} has no {', '.join(missing)}")
    return report


def published_by(live: Manifest, job: Job, paths: Paths) -> bool:
    """Whether the live version is this job's adapter (a publish done before a restart): its
    job number and its training's timestamp both match; job numbers alone repeat across the
    databases of bots that share one registry."""
    return live.retrain_job == job.id and live.created == read_manifest(paths.adapter).created


class GateAndPublish:
    """The evaluating and publishing steps of a job."""

    def __init__(
        self,
        store: JobStore,
        settings: BotSettings,
        commands: RolecastCommands,
        server_url: str | None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.config = settings.retrain
        self.commands = commands
        self.server_url = server_url
        self.registry = AdapterRegistry(settings.adapters)

    def _current(self, persona: str) -> AdapterVersion | None:
        """The persona's current version; None, logged, when its pointer cannot be read (a
        pointer that is not JSON, or names a missing version): the bot then speaks as if it
        had none, and a publish writes a fresh one."""
        try:
            return self.registry.current(persona)
        except RegistryError as exc:
            log.warning("%s; taken as no published version", exc)
            return None

    def live(self, persona: str, *, shipped: bool) -> tuple[Path, str] | None:
        """What the persona speaks through now, as (adapter folder, name), or None for the base
        model: its current version, else for a `shipped` persona (one of the cards that ship) on
        the default model, the adapter that ships for it."""
        current = self._current(persona)
        if current is not None:
            return current.path, current.served_name
        if shipped and basemodel.shipped_adapter(self.config.base):
            if persona in basemodel.shipped_personas():
                return basemodel.SHIPPED_DIR, basemodel.SHIPPED_NAME
        return None

    async def evaluate(self, job: Job, paths: Paths, *, shipped: bool = False) -> Job:
        live = self.live(job.persona, shipped=shipped)
        args = [
            "eval", "--data", str(paths.validation), "--adapter", str(paths.adapter),
            "--base", self.config.base, "--output", str(paths.eval_dir),
            "--max-new-tokens", str(self.config.eval_max_new_tokens),
            "--persona", job.persona, *self.consistency_args(job, paths),
        ]  # fmt: skip
        if live is not None:
            args += ["--baseline", str(live[0])]
        await self.commands.check("evaluation", args, paths.steps_log)
        against = "baseline" if live is not None else "base"
        label = live[1] if live is not None else "the base model"
        config = self.config
        consistency = (config.consistency_metric, config.consistency_tolerance)
        metrics_file = paths.eval_dir / "metrics.json"
        report = read_report(metrics_file, ("adapter", against), (*GATE_METRICS, consistency[0]))
        scores = report.scores
        passed, lines = gate(scores, against, config.tolerance, consistency)
        named = {
            (label if k == against else "new" if k == "adapter" else k): v
            for k, v in scores.items()
        }
        metrics: dict[str, Any] = {
            **(job.metrics or {}),  # what the export step said (the replay)
            "against": label,
            "dialogues": report.dialogues,
            "scores": named,
            "tolerance": config.tolerance,
            "consistency": {
                "metric": config.consistency_metric,
                "tolerance": config.consistency_tolerance,
                **report.consistency,
            },
            "checks": lines,
            "passed": passed,
        }
        job = await self.store.set_result(job, metrics=metrics)
        if not passed:
            raise Rejected(
                f"the new adapter is worse than {label} beyond the tolerance (BLEU-4 and ROUGE-L "
                f"{config.tolerance:g} points, {config.consistency_metric} "
                f"{config.consistency_tolerance:g}); nothing changed.\n"
                + "\n".join(line for line in lines if line.endswith("worse"))
                + "\n\n"
                + score_table(named)
            )
        record_eval(paths, job.id, scores["adapter"], label)
        return await self.store.move(job, "publishing")

    @staticmethod
    def consistency_args(job: Job, paths: Paths) -> list[str]:
        """`rolecast eval` options that learn the personas' voices from the job's training
        file: the persona's own training split and each replayed persona's dialogues."""
        args = ["--consistency-data", str(paths.own_train)]
        if not paths.replay_report.exists():  # exported before the replay existed
            return args
        replay = json.loads(paths.replay_report.read_text(encoding="utf-8"))
        for other, count in sorted(replay.get("replayed", {}).items()):
            if count:
                args += ["--consistency-data", f"{other}={paths.replayed(other)}"]
        return args

    def _published(self, job: Job, paths: Paths) -> AdapterVersion | None:
        """The persona's current version when it is this job's adapter, else None."""
        live = self._current(job.persona)
        return live if live is not None and published_by(live.manifest, job, paths) else None

    async def publish(self, job: Job, paths: Paths) -> Job:
        live = self._published(job, paths)
        if live is None:  # not done before
            args = [
                "adapters", "publish", str(paths.adapter), "--persona", job.persona,
                "--adapters-dir", str(self.registry.root), "--json",
            ]  # fmt: skip
            if self.server_url:
                args += ["--server", self.server_url]
            try:
                output = await self.commands.check("publishing", args, paths.steps_log)
                if json_result(output) is None:
                    raise Failed(f"publishing printed no result:\n{output[-2000:]}")
            except Failed:
                # the command may have died after the switch, which is the publish: the
                # registry, not its exit status, says what users get now
                if self._published(job, paths) is None:
                    raise
                log.warning("job #%d: publishing failed after it took effect", job.id)
            live = self._current(job.persona)
        if live is None:
            raise Failed(
                f"the registry at {self.registry.root} has no current version after publishing"
            )
        job = await self.store.set_result(job, new_version=live.served_name)
        was = job.old_version or "the base model"
        return await self.store.move(
            job, "done", f"{job.persona} now speaks through {live.served_name} (was {was})"
        )
