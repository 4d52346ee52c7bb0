"""The closed retrain loop end to end, timed phase by phase: export -> clean/split -> train ->
eval/gate -> publish -> the first reply on the new version.

Everything is the real thing, started the way the bot starts it:

1. A fresh SQLite database. N dialogues of the persona file (ShareGPT JSONL, the shared haruhi
   dialogues by default) are stored as turns in one channel of one guild, the way the chat
   core stores them (`Memory.add_turn`; a human turn `Name: text` becomes that member's turn),
   and each dialogue's last reply is approved the way members approve it (`Approvals`: even
   dialogues through "Approve for training", odd ones through a thumbs-up reaction).
2. The embedded model server (`rolecast serve --adapters-dir`) on a free loopback port, with
   an empty adapter registry: haruhi speaks through the base model.
3. A retrain job for haruhi, run by `RetrainService` (the runner behind `/retrain` and
   `rolecast retrain`): `data clean` / `data split` / `rolecast train` in its own process /
   `rolecast eval` against what is served / `rolecast adapters publish` onto the server.
4. One message through `ChatService` and `ModelClient`; the reply must come from `haruhi@v1`.

The phases are timed from the job's own state timestamps; the only addition to the runner is
a subclass that notes when each of its child commands starts (to tell export from clean/split).
Starting the server and seeding the database are reported apart: they are not part of the loop.

Prints JSON lines (progress goes to stderr):
- `setup`: dialogues stored and approved, server start time, device, model;
- `loop`: seconds per phase (export, clean_split, train, eval_gate, publish, first_reply) and
  the total from the job's start to the end of the first reply, the job's outcome and versions;
- `train`: from the trainer's rolecast.json: dialogues, tokens (one pass), tokens trained,
  steps, epochs, train and process seconds, tokens/s, device;
- `gate`: the held-out dialogues and the BLEU-4 / ROUGE scores the gate compared;
- `reply`: the served name that answered, tokens, and the reply's first characters.

Run from the repository root, e.g. a short CPU run on a subset:

    .venv/bin/python benchmarks/retrain_loop.py --dialogues 40 --max-steps 24 \\
        --train-args "--batch_tokens 2048" --validation 0.1 --eval-max-new-tokens 16 --device cpu

and the full case on a GPU (the trainer's default 3 epochs over every dialogue):

    .venv/bin/python benchmarks/retrain_loop.py --device cuda

The exit status is 0 only when the job ended `done` and the reply came from the new version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.core.approvals import Approvals  # noqa: E402
from bot.core.chat import ChatService, Reply, Speaker  # noqa: E402
from bot.core.client import ModelClient  # noqa: E402
from bot.core.memory import Memory  # noqa: E402
from bot.core.personas import PersonaRegistry  # noqa: E402
from bot.core.sidecar import EmbeddedServer  # noqa: E402
from bot.retrain.jobs import Job  # noqa: E402
from bot.retrain.runner import RetrainService  # noqa: E402
from bot.settings import BotSettings, SamplingSettings  # noqa: E402
from formats.manifest import read_manifest  # noqa: E402
from formats.registry import AdapterRegistry  # noqa: E402

log = logging.getLogger("retrain_loop")

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "roleplay" / "haruhi.jsonl"
PERSONA = "haruhi"
GUILD = "880000000000000001"
CHANNEL = "discord:880000000000000002"
REPLY_CHANNEL = "discord:880000000000000003"
ADMIN = "880000000000000009"
SPEAKER = re.compile(r"^([^:：\n]{1,24})[:：]\s*(.+)$", re.S)
PHASES = ("export", "clean_split", "train", "eval_gate", "publish", "first_reply")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def member_id(name: str) -> str:
    """A stable Discord-like id for a speaker name."""
    return str(770000000000000000 + zlib.crc32(name.encode("utf-8")))


def read_dialogues(path: Path, n: int) -> list[list[dict[str, str]]]:
    """The first `n` dialogues' turns (system prompts dropped: the card gives the persona's)."""
    dialogues = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            turns = [t for t in json.loads(line)["conversations"] if t["from"] != "system"]
            if any(t["from"] == "gpt" for t in turns):
                dialogues.append(turns)
            if len(dialogues) == n:
                break
    return dialogues


async def store_and_approve(
    memory: Memory, dialogues: list[list[dict[str, str]]], persona: str = PERSONA
) -> int:
    """Members chat with `persona` in one channel; each dialogue's last reply is approved.
    Returns how many dialogues were approved."""
    await memory.set_persona(CHANNEL, persona)
    await memory.set_channel_guild(CHANNEL, GUILD)
    approved = 0
    for i, turns in enumerate(dialogues):
        stored = []
        for t in turns:
            if t["from"] == "human":
                m = SPEAKER.match(t["value"].strip())
                name, text = (m.group(1).strip(), m.group(2)) if m else ("member", t["value"])
                turn = await memory.add_turn(
                    CHANNEL, persona=persona, role="user", content=text,
                    author_id=member_id(name), author_name=name,
                )  # fmt: skip
            else:
                turn = await memory.add_turn(
                    CHANNEL, persona=persona, role="assistant", content=t["value"], model=persona
                )
            stored.append(turn)
        last = max(j for j, t in enumerate(stored) if t.role == "assistant")
        # the snapshot reaches back to this dialogue's first turn, not into the one before
        approvals = Approvals(memory, context_turns=max(last, 1))
        if i % 2 == 0:
            await approvals.approve(stored[last], by=member_id("member"), guild_id=GUILD)
        else:
            await approvals.react(stored[last], member_id("member"), 1, added=True, guild_id=GUILD)
        approved += 1
    return approved


class TimedRetrainService(RetrainService):
    """The bot's runner, noting when each child command (cleaning, evaluation, ...) starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: dict[str, float] = {}
        check = self.commands.check  # the steps' commands (the gate shares this object)

        async def timed(what: str, args: list[str], log_path: Path) -> str:
            self.started.setdefault(what, time.time())
            return await check(what, args, log_path)

        self.commands.check = timed  # type: ignore[method-assign]


def phase_seconds(job: Job, started: dict[str, float], reply_done: float) -> dict[str, float]:
    """Seconds per phase from the job's state timestamps (wall clock, `time.time()`)."""
    cleaning = started.get("cleaning", job.training_at or job.finished_at or reply_done)
    marks = [
        ("export", job.exporting_at, cleaning),
        ("clean_split", cleaning, job.training_at),
        ("train", job.training_at, job.evaluating_at),
        ("eval_gate", job.evaluating_at, job.publishing_at or job.finished_at),
        ("publish", job.publishing_at, job.finished_at),
        ("first_reply", job.finished_at, reply_done),
    ]
    return {name: round(end - begin, 3) for name, begin, end in marks if begin and end}


async def first_reply(
    memory: Memory,
    personas: PersonaRegistry,
    settings: BotSettings,
    base_url: str,
    max_tokens: int,
    persona: str = PERSONA,
) -> tuple[Reply, float]:
    """A member's message to `persona`'s channel, answered through the chat core."""
    async with ModelClient.from_settings(settings, base_url) as client:
        chat = ChatService(memory, personas, client)
        try:
            await chat.set_persona(REPLY_CHANNEL, persona, user_name="阿虚")
            await memory.set_channel_guild(REPLY_CHANNEL, GUILD)
            reply = None
            sampling = SamplingSettings(max_tokens=max_tokens, seed=42)
            speaker = Speaker(member_id("阿虚"), "阿虚")
            async for event in chat.send(REPLY_CHANNEL, "「今天SOS团做什么？」", speaker, sampling):
                if isinstance(event, Reply):
                    reply = event
            assert reply is not None
            return reply, time.time()
        finally:
            await chat.aclose()


def train_args(args: argparse.Namespace) -> list[str]:
    extra = shlex.split(args.train_args)
    if args.max_steps is not None:
        extra += ["--max_steps", str(args.max_steps)]
    if args.epochs is not None:
        extra += ["--epochs", str(args.epochs)]
    return extra


def server_args(args: argparse.Namespace, adapters_dir: Path) -> list[str]:
    serve = ["--adapters-dir", str(adapters_dir)]
    if args.model:
        serve += ["--model", args.model]
    if args.device != "auto":
        serve += ["--device", args.device]
    return serve


async def run(args: argparse.Namespace, work: Path) -> bool:
    dialogues = read_dialogues(args.data, args.dialogues)
    adapters_dir = work / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    if AdapterRegistry(adapters_dir).current(PERSONA) is not None:
        raise SystemExit(f"{adapters_dir} already has a {PERSONA} version; use a fresh --work")
    retrain: dict[str, Any] = {
        "min_approved": min(args.min_approved, len(dialogues)),
        "max_length": args.max_length,
        "validation": args.validation,
        "tolerance": args.tolerance,
        "eval_max_new_tokens": args.eval_max_new_tokens,
        "train_args": train_args(args),
        "poll_s": 0.5,
        "workdir": work / "retrain",
    }
    if args.model:
        retrain["base"] = args.model

    db = work / "rolecast.db"
    if db.exists():
        raise SystemExit(f"{db} exists; use a fresh --work")
    async with Memory.open(db) as memory:
        t0 = time.monotonic()
        approved = await store_and_approve(memory, dialogues)
        seed_s = time.monotonic() - t0
        print(f"{approved} dialogues approved in {seed_s:.1f} s", file=sys.stderr, flush=True)

        server = EmbeddedServer(
            server_args(args, adapters_dir),
            log_path=work / "server.log",
            startup_timeout=args.server_timeout,
        )
        t0 = time.monotonic()
        async with server:
            start_s = time.monotonic() - t0
            emit(
                {
                    "event": "setup",
                    "dialogues_read": len(dialogues),
                    "dialogues_approved": await memory.count_dialogues(PERSONA),
                    "seed_s": round(seed_s, 2),
                    "server_start_s": round(start_s, 2),
                    "model": args.model or "default",
                    "device": args.device,
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "train_args": retrain["train_args"],
                    "work": str(work),
                }
            )
            settings = BotSettings(
                home=work / "home",
                server_url=server.url,
                adapters_dir=adapters_dir,
                retrain=retrain,  # type: ignore[arg-type]
            )
            personas = PersonaRegistry(settings.user_personas).load()

            async def listener(job: Job) -> None:
                detail = f" step {job.step}/{job.total_steps}" if job.step else ""
                loss = f" loss {job.loss:.3f}" if job.loss is not None else ""
                print(f"job #{job.id}: {job.state}{detail}{loss}", file=sys.stderr, flush=True)

            service = TimedRetrainService(
                memory, personas, settings, server_url=server.url, listener=listener
            )
            try:
                job = await service.start(PERSONA, requested_by=ADMIN, guild_id=GUILD)
                job = await service.wait(job.id)
            finally:
                await service.aclose()
            reply: Reply | None = None
            reply_done = time.time()
            if job.state == "done":
                reply, reply_done = await first_reply(
                    memory, personas, settings, server.base_url, args.reply_max_tokens
                )

    phases = phase_seconds(job, service.started, reply_done)
    ok = job.state == "done" and reply is not None
    ok = ok and reply.completion.model == f"{PERSONA}@v1" == job.new_version  # type: ignore[union-attr]
    emit(
        {
            "event": "loop",
            "state": job.state,
            "reason": job.reason,
            "old_version": job.old_version,
            "new_version": job.new_version,
            "phases_s": phases,
            "total_s": round(reply_done - (job.exporting_at or job.created_at), 2),
            "ok": ok,
        }
    )
    workdir = service.paths(job).workdir
    if (workdir / "adapter" / "rolecast.json").is_file():
        manifest = read_manifest(workdir / "adapter").to_json()
        data, settings_used = manifest["data"], manifest["settings"]
        emit(
            {
                "event": "train",
                "dialogues": data["dialogues"],
                "tokens": data["tokens"],
                "assistant_tokens": data["assistant_tokens"],
                "tokens_trained": round(manifest["tokens_per_s"] * manifest["train_time_s"]),
                "steps": manifest["metrics"]["steps"],
                "epochs": settings_used["epochs"],
                "max_steps": settings_used["max_steps"],
                "batch_tokens": settings_used["batch_tokens"],
                "train_time_s": manifest["train_time_s"],
                "process_wall_s": manifest["wall_time_s"],
                "tokens_per_s": manifest["tokens_per_s"],
                "final_train_loss": manifest["metrics"].get("final_train_loss"),
                "device": manifest["device"],
                "dtype": settings_used["dtype"],
            }
        )
    if job.metrics is not None:
        emit(
            {
                "event": "gate",
                "held_out": job.metrics.get("dialogues"),
                "against": job.metrics.get("against"),
                "tolerance": job.metrics.get("tolerance"),
                "passed": job.metrics.get("passed"),
                "scores": job.metrics.get("scores"),
            }
        )
    if reply is not None:
        emit(
            {
                "event": "reply",
                "model": reply.completion.model,
                "prompt_tokens": reply.completion.prompt_tokens,
                "completion_tokens": reply.completion.completion_tokens,
                "text": reply.turn.content[:80],
            }
        )
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the retrain loop end to end (export to the first reply on the new "
        "version) with the real runner, trainer and embedded server. Prints JSON lines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="persona dialogues (ShareGPT)")
    p.add_argument(
        "--dialogues", type=int, default=1000, help="first N dialogues of --data to approve"
    )
    p.add_argument("--model", help="base model for the server and the trainer [default: theirs]")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the server and the trainer take CUDA when present; cpu hides the GPUs",
    )
    p.add_argument("--max-steps", type=int, help="rolecast train --max_steps")
    p.add_argument("--epochs", type=float, help="rolecast train --epochs [trainer default: 3]")
    p.add_argument(
        "--train-args", default="", help='more rolecast train flags, e.g. "--batch_tokens 2048"'
    )
    p.add_argument("--validation", type=float, default=0.1, help="held-out fraction for the gate")
    p.add_argument("--max-length", type=int, default=2048, help="longest dialogue kept, tokens")
    p.add_argument("--eval-max-new-tokens", type=int, default=128, help="gate reply length")
    p.add_argument(
        "--tolerance", type=float, default=1.0, help="BLEU-4/ROUGE-L points the gate allows lost"
    )
    p.add_argument("--min-approved", type=int, default=20, help="dialogues a retrain needs")
    p.add_argument("--reply-max-tokens", type=int, default=64, help="length of the first reply")
    p.add_argument("--server-timeout", type=float, default=900.0, help="server start limit, s")
    p.add_argument("--work", type=Path, help="working directory (kept) [default: a temp dir]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.data.is_file():
        raise SystemExit(f"no dialogues at {args.data} (see --data)")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer and eval children inherit it
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return 0 if asyncio.run(run(args, args.work.resolve())) else 1
    with tempfile.TemporaryDirectory(prefix="rolecast-retrain-") as tmp:
        return 0 if asyncio.run(run(args, Path(tmp))) else 1


if __name__ == "__main__":
    sys.exit(main())
