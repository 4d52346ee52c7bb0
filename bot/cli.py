"""`rolecast chat`, `rolecast bot`, `rolecast retrain` and `rolecast persona ...`: the bot side's
commands, each a thin entry into its front end (`bot.terminal`, `bot.discord`).

Only light imports here: the bot process is an HTTP client and never loads torch.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bot.core.text import for_terminal
from bot.errors import RolecastError
from bot.terminal.console import err, fail, load_settings
from bot.terminal.retrain import retrain

persona_app = typer.Typer(
    help="List, inspect, validate, import and remove character cards.", no_args_is_help=True
)


def chat(
    persona: list[str] | None = typer.Option(
        None,
        "--persona",
        "-p",
        help="Persona key (haruhi, atri, xin, ...); several make a scene; default: the "
        "session's last.",
    ),
    session: str = typer.Option(
        "default", help="Session name: its history is kept as 'terminal:<name>'."
    ),
    user: str = typer.Option("User", help="Your name, as the persona sees it ({{user}} in cards)."),
    db: Path | None = typer.Option(None, help="SQLite file (default: <home>/rolecast.db)."),
    server: str | None = typer.Option(
        None,
        help="Model server base URL (vLLM or `rolecast serve`); default: start the embedded one.",
    ),
    temperature: float | None = typer.Option(None, help="Sampling temperature (0 = greedy)."),
    top_p: float | None = typer.Option(None, help="Nucleus sampling mass."),
    max_tokens: int | None = typer.Option(None, help="Reply length limit in tokens."),
    repetition_penalty: float | None = typer.Option(
        None, help="Penalty for repeated tokens (1 = none)."
    ),
    seed: int | None = typer.Option(None, help="Seed for reproducible replies."),
) -> None:
    """Chat with a persona in the terminal. Pipe lines in to script it: one reply per line."""
    from pydantic import ValidationError

    from bot.settings import SamplingSettings
    from bot.terminal.chat import ChatOptions, run_chat

    settings = load_settings(db_path=db, server_url=server)
    overrides = {
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        sampling = SamplingSettings.model_validate({**settings.sampling.model_dump(), **given})
    except ValidationError as exc:  # only a flag can be wrong: the settings were valid
        raise fail(
            "; ".join(
                f"--{str(e['loc'][0]).replace('_', '-')}={e['input']}: {e['msg']}"
                for e in exc.errors()
            )
        ) from None
    try:
        options = ChatOptions(
            persona=persona[0] if persona else None,
            session=session,
            user_name=user,
            sampling=sampling,
            cast=tuple(persona or ()),
        )
        code = asyncio.run(run_chat(settings, options))
    except ValueError as exc:
        raise fail(str(exc)) from None
    except RolecastError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


@persona_app.command("list")
def persona_list() -> None:
    """The personas this installation knows (shipped and imported)."""
    from bot.core.personas import PersonaRegistry

    registry = PersonaRegistry(load_settings().user_personas).load()
    table = Table("key", "name", "source", "greeting")
    for p in registry.all():
        # Text objects: a card's text is shown as it is, never read as rich markup.
        source = "shipped" if p.builtin else str(p.path)
        if p.guild_id is not None:
            source = f"Discord server {p.guild_id}: {source}"
        cells = (p.name, source, p.card.data.first_mes[:40])
        table.add_row(p.key, *(Text(for_terminal(c)) for c in cells))
    Console().print(table)
    for problem in registry.problems:
        err.print(f"[yellow]warning:[/] {escape(for_terminal(str(problem)))}")


@persona_app.command("show")
def persona_show(key: str) -> None:
    """Print a persona's card as JSON."""
    from bot.core.personas import PersonaRegistry

    try:
        persona = PersonaRegistry(load_settings().user_personas).load().get(key)
    except RolecastError as exc:
        raise fail(str(exc)) from None
    print(persona.card.to_json())


@persona_app.command("check")
def persona_check(files: list[Path]) -> None:
    """Validate character card files (JSON or PNG); list every problem by field."""
    from bot.core.cards import load_card

    bad = 0
    for path in files:
        try:
            card = load_card(path)
            print(for_terminal(f"ok      {path}: {card.name} ({card.spec})"))
        except RolecastError as exc:
            bad += 1
            err.print(escape(for_terminal(str(exc))))
    raise typer.Exit(1 if bad else 0)


@persona_app.command("import")
def persona_import(
    file: Path,
    key: str | None = typer.Option(None, help="Registry key (default: from the file name)."),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Replace the persona of the same key. A shipped persona replaced this way is "
        "yours: it no longer speaks through the adapter that ships for the shipped one.",
    ),
) -> None:
    """Validate a card and add it to the personas directory, shared by every Discord server
    (read-only there). An existing key is kept unless --replace is given."""
    from bot.core.cards import load_card
    from bot.core.personas import PersonaRegistry, persona_key

    try:
        card = load_card(file)
        short = persona_key(key or file.stem)
        registry = PersonaRegistry(load_settings().user_personas).load()
        before = registry.get(short) if short in registry else None
        persona = registry.add(short, card, replace=replace)
    except RolecastError as exc:
        raise fail(str(exc)) from None
    replaced = None
    if before is not None:
        replaced = "shipped" if before.builtin else "imported"
    print(
        json.dumps(
            {
                "key": persona.key,
                "name": persona.name,
                "path": str(persona.path),
                "replaced": replaced,
            },
            ensure_ascii=False,
        )
    )


@persona_app.command("remove")
def persona_remove(
    key: str,
    db: Path | None = typer.Option(None, help="SQLite file (default: <home>/rolecast.db)."),
) -> None:
    """Remove an imported card (shared, or a Discord server's by its g<server>-<key> key).
    Channels that used it lose their persona, as /persona remove does; a shipped persona that
    the card had replaced comes back instead. Shipped cards cannot be removed."""
    from bot.core.memory import Memory
    from bot.core.personas import PersonaRegistry

    async def unset_channels(database: Path, persona: str) -> int:
        async with Memory.open(database) as memory:
            return await memory.clear_persona_everywhere(persona)

    settings = load_settings(db_path=db)
    try:
        registry = PersonaRegistry(settings.user_personas).load()
        persona = registry.get(key)
        now = registry.remove(persona.key)
    except RolecastError as exc:
        raise fail(str(exc)) from None
    unset = 0
    if now is None and settings.database.exists():
        unset = asyncio.run(unset_channels(settings.database, persona.key))
    result = {
        "key": persona.key,
        "name": persona.name,
        "removed": str(persona.path),
        "guild": persona.guild_id,
        # the key may still name a persona: the shipped one the card had replaced, whom the
        # channels that had the key now hear
        "now": None if now is None else "shipped" if now.builtin else str(now.path),
        "channels_unset": unset,
    }
    print(json.dumps(result, ensure_ascii=False))


def discord_bot(
    check: bool = typer.Option(
        False,
        "--check",
        help="Validate settings and cards and print the slash-command tree as JSON; "
        "do not connect.",
    ),
    db: Path | None = typer.Option(None, help="SQLite file (default: <home>/rolecast.db)."),
    server: str | None = typer.Option(
        None, help="Model server base URL; default: start the embedded one."
    ),
) -> None:
    """Run the Discord bot (token from ROLECAST_DISCORD_TOKEN).

    Exit codes: 0 stopped; 1 a card is invalid (--check); 2 no token or a bad setting; 69
    Discord cannot be reached; 77 Discord refused the token; 78 the Message Content intent is
    not enabled; 130 interrupted.
    """
    from bot.discord.bot import EXIT_CONFIG, StartError, command_tree, run_bot

    settings = load_settings(db_path=db, server_url=server)
    if check:
        report = asyncio.run(command_tree(settings))
        print(json.dumps(report, ensure_ascii=False, indent=2))
        problems = report["problems"]
        assert isinstance(problems, list)
        if problems:
            err.print(f'[red]error:[/] {len(problems)} invalid card(s): see "problems" above')
            raise typer.Exit(1)
        if settings.discord_token is None:
            raise fail(
                "no Discord token: set ROLECAST_DISCORD_TOKEN (settings and cards are valid)",
                EXIT_CONFIG,
            )
        personas, commands = report["personas"], report["commands"]
        assert isinstance(personas, list) and isinstance(commands, list)
        err.print(
            f"ok: {len(personas)} personas, {len(commands)} commands, token set, model server "
            f"{report['server_url']}",
            markup=False,
        )
        raise typer.Exit(0)
    try:
        asyncio.run(run_bot(settings))
    except StartError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except RolecastError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    """Add the bot commands to the root app."""
    app.command("chat")(chat)
    app.command("bot")(discord_bot)
    app.command("retrain")(retrain)
    app.add_typer(persona_app, name="persona")
