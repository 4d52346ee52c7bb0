"""The Discord bot: a `commands.Bot` that owns nothing global.

The entry point (`run_bot`) opens the database, the model-server client and the bot with
`async with` and passes them in; `setup_hook` loads one cog per feature from `bot/discord/cogs/`.
It logs in before it starts the embedded model server, so a missing or refused token and an
unreachable Discord are told at once, each as one `StartError` with the exit code that says
which (`EXIT_*`). `command_tree` builds the same bot offline (no token, no connection) for
`rolecast bot --check`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.core.approvals import Approvals
from bot.core.chat import ChatService
from bot.core.client import ModelClient
from bot.core.memory import ChannelSettings, Memory
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import PromptBuilder
from bot.core.queue import ChannelQueue, Cooldown
from bot.core.scene import Scene
from bot.core.sidecar import embedded_server
from bot.core.summary import Summarizer
from bot.core.text import clean_text
from bot.discord import limits
from bot.discord.webhooks import NO_MENTIONS, Identity, WebhookCache
from bot.errors import RolecastError
from bot.settings import BotSettings, SamplingSettings, stored_sampling

log = logging.getLogger(__name__)

# Exit codes of `rolecast bot` (sysexits.h's where one fits), so a supervisor can tell a setting
# to fix from a network to wait for.
EXIT_CONFIG = 2  # no token, or invalid settings (what the CLI gives any bad setting)
EXIT_UNAVAILABLE = 69  # Discord could not be reached: try again later
EXIT_NOPERM = 77  # Discord refused the token
EXIT_INTENTS = 78  # the Message Content intent is not enabled for the application

EXTENSIONS: Sequence[str] = (
    "bot.discord.cogs.chat",
    "bot.discord.cogs.personas",
    "bot.discord.cogs.scene",
    "bot.discord.cogs.memory",
    "bot.discord.cogs.feedback",
    "bot.discord.cogs.admin",
    "bot.discord.cogs.status",
    "bot.discord.cogs.retrain",
)


def channel_key(channel: discord.abc.Snowflake) -> str:
    """The memory key of a Discord channel or thread."""
    return f"discord:{channel.id}"


def default_intents() -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = True  # privileged: enable it for the application in Discord
    return intents


async def send_ephemeral(interaction: discord.Interaction[Any], text: str, **kwargs: Any) -> None:
    """Answer privately, whether or not the interaction was deferred already."""
    text = limits.message(text)
    if interaction.response.is_done():
        await interaction.followup.send(
            text, ephemeral=True, allowed_mentions=NO_MENTIONS, **kwargs
        )
    else:
        await interaction.response.send_message(
            text, ephemeral=True, allowed_mentions=NO_MENTIONS, **kwargs
        )


def permission_message(reason: str, where: str) -> str:
    return (
        f"I don't have the permissions I need in {where} ({reason})."
        " A server admin can give me View Channel, Send Messages, Read Message History and "
        "Manage Webhooks there."
    )


class RolecastTree(app_commands.CommandTree["RolecastBot"]):
    """Turns command errors into one private message to the person who asked."""

    async def on_error(
        self, interaction: discord.Interaction[RolecastBot], error: app_commands.AppCommandError
    ) -> None:
        original = getattr(error, "original", error)
        name = interaction.command.qualified_name if interaction.command else "?"
        if isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You cannot use this command here."
        elif isinstance(original, RolecastError):
            message = str(original)
        elif isinstance(original, discord.Forbidden):
            where = getattr(interaction.channel, "mention", "this channel")
            log.warning("missing permissions for /%s in %s: %s", name, where, original.text)
            message = permission_message(original.text or "forbidden", where)
        else:
            log.error("/%s failed", name, exc_info=original)
            message = "Something went wrong on my side; the error was logged."
        try:
            await send_ephemeral(interaction, message)
        except discord.HTTPException:
            log.warning("could not tell the user about the error in /%s", name)


class StartError(RolecastError):
    """The bot could not start; the message says what to do, `exit_code` which case it is."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RolecastBot(commands.Bot):
    def __init__(
        self,
        *,
        memory: Memory,
        client: ModelClient,
        personas: PersonaRegistry,
        settings: BotSettings,
        intents: discord.Intents | None = None,
        extensions: Sequence[str] = EXTENSIONS,
    ) -> None:
        # the bot never joins voice: no warning about the voice libraries it does not need
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents or default_intents(),
            tree_cls=RolecastTree,
            allowed_mentions=NO_MENTIONS,
            help_command=None,
        )
        self.memory = memory
        self.client = client
        self.personas = personas
        self.settings = settings
        self.extension_names = list(extensions)
        prompts = PromptBuilder(
            memory,
            client,
            speaker_names=True,
            summaries=settings.prompt.summaries,
            lore_budget=settings.prompt.lore_budget_tokens,
            lore_scan_depth=settings.prompt.lore_scan_depth,
        )
        self.chat = ChatService(memory, personas, client, prompts=prompts)
        self.approvals = Approvals(
            memory,
            context_turns=settings.discord.dialogue_turns,
            threshold=settings.discord.approval_threshold,
            personas=personas,
        )
        self.summarizer = Summarizer(memory, client, max_tokens=settings.prompt.summary_max_tokens)
        self.queue = ChannelQueue()
        self.cooldown = Cooldown(settings.discord.cooldown_s)
        self.webhooks = WebhookCache(settings.discord.webhook_name)
        self.down_notified: set[str] = set()  # channels told that the model server is down

    async def setup_hook(self) -> None:
        await self.load_cogs()
        discord_settings = self.settings.discord
        if discord_settings.sync_commands:
            if discord_settings.sync_guild_id is not None:
                guild = discord.Object(discord_settings.sync_guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
            else:
                synced = await self.tree.sync()
            log.info("synced %d application commands", len(synced))

    async def close(self) -> None:
        await super().close()
        await self.chat.aclose()  # background token counts, before the client closes

    async def load_cogs(self) -> None:
        for name in self.extension_names:
            await self.load_extension(name)

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: the chat cog listens to messages, commands are slash commands."""

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("connected as %s (%s) to %d guilds", self.user, self.user.id, len(self.guilds))

    # -- helpers the cogs share ------------------------------------------------------------

    def persona_choices(
        self, current: str, guild_id: int | str | None
    ) -> list[app_commands.Choice[str]]:
        """Autocomplete for a persona argument: the personas this server sees (the shared ones
        and its own) whose key or name contains what was typed."""
        needle = current.strip().lower()
        choices = []
        for p in self.personas.visible(str(guild_id) if guild_id is not None else None):
            key = p.short_key
            if not needle or needle in key or needle in p.name.lower():
                # The key stays readable when a long name is cut.
                label = f"{limits.one_line(p.name, limits.CHOICE_CHARS - len(key) - 3)} ({key})"
                choices.append(limits.choice(label, key))
                if len(choices) == limits.CHOICES:
                    break
        return choices

    def persona_for(self, interaction: discord.Interaction[Any], name: str) -> Persona:
        """The persona a command's caller means by `name`: the shared ones and those of the
        caller's server only (`PersonaRegistry.resolve`)."""
        guild = interaction.guild_id
        return self.personas.resolve(name, str(guild) if guild is not None else None)

    async def scene(self, interaction: discord.Interaction[Any]) -> Scene:
        """The cast of the channel a command was used in: the personas that server sees."""
        assert interaction.channel is not None
        guild = str(interaction.guild_id) if interaction.guild_id is not None else None
        return await self.chat.scene(
            channel_key(interaction.channel),
            allowed=lambda p: p.guild_id is None or p.guild_id == guild,
        )

    def sampling_for(self, channel: ChannelSettings) -> SamplingSettings:
        """The configured sampling with the channel's overrides applied."""
        if not channel.sampling:
            return self.settings.sampling
        return stored_sampling(self.settings.sampling, channel.sampling)

    def identity(self, persona: Persona) -> Identity:
        return Identity(persona.name, avatar_url(persona))


def avatar_url(persona: Persona) -> str | None:
    """An http(s) avatar for the webhook: a V3 card's `icon` asset, or
    `extensions.avatar_url` (a URL that the card author or an admin set)."""
    data = persona.card.data
    for asset in data.assets or []:
        if asset.type == "icon" and (url := limits.avatar_url(asset.uri)) is not None:
            return url
    return limits.avatar_url(data.extensions.get("avatar_url"))


# -- entry points ------------------------------------------------------------------------


async def run_bot(settings: BotSettings) -> None:
    """Connect to Discord and serve until stopped; StartError when it cannot start."""
    if settings.discord_token is None:
        raise StartError(
            "No Discord token: set ROLECAST_DISCORD_TOKEN to the bot token from the Discord "
            "developer portal (Bot → Reset Token).",
            EXIT_CONFIG,
        )
    personas = PersonaRegistry(settings.user_personas).load()
    async with AsyncExitStack() as stack:
        server = embedded_server(settings) if settings.server_url is None else None
        url = server.base_url if server is not None else settings.server_url
        assert url is not None
        memory = await stack.enter_async_context(Memory.open(settings.database))
        client = await stack.enter_async_context(ModelClient.from_settings(settings, url))
        bot = RolecastBot(memory=memory, client=client, personas=personas, settings=settings)
        await stack.enter_async_context(bot)
        await log_in(bot, settings.discord_token.get_secret_value())
        if server is not None:
            log.info("starting the embedded model server on %s", server.url)
            await stack.enter_async_context(server)
        stack.push_async_callback(bot.close)  # the bot stops before the server it talks to
        try:
            await bot.connect()
        except discord.PrivilegedIntentsRequired:
            raise StartError(
                "Enable the Message Content intent for this application in the Discord "
                "developer portal (Bot → Privileged Gateway Intents).",
                EXIT_INTENTS,
            ) from None


async def log_in(bot: RolecastBot, token: str) -> None:
    """Log in (and run `setup_hook`), or StartError saying why not."""
    try:
        await bot.login(token)
    except discord.LoginFailure:
        raise StartError(
            "Discord rejected the token in ROLECAST_DISCORD_TOKEN; reset it in the developer "
            "portal and set the new one.",
            EXIT_NOPERM,
        ) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise StartError(
            f"Cannot reach Discord ({type(exc).__name__}: {exc}); check the network, then "
            "start the bot again.",
            EXIT_UNAVAILABLE,
        ) from None
    except discord.HTTPException as exc:
        if exc.status < 500:
            raise
        raise StartError(
            f"Discord is not answering (HTTP {exc.status}); start the bot again later.",
            EXIT_UNAVAILABLE,
        ) from None


async def command_tree(settings: BotSettings) -> dict[str, object]:
    """Validate settings and cards and describe the slash-command tree, offline."""
    personas = PersonaRegistry(settings.user_personas).load()
    async with Memory.open(":memory:") as memory, ModelClient("http://127.0.0.1:9") as client:
        offline = settings.model_copy(
            update={"discord": settings.discord.model_copy(update={"sync_commands": False})}
        )
        bot = RolecastBot(memory=memory, client=client, personas=personas, settings=offline)
        async with bot:  # set up as for a run (no login), and its cogs unloaded on the way out
            await bot.load_cogs()
            commands_json = [cmd.to_dict(bot.tree) for cmd in bot.tree.get_commands()]
    return {
        "ok": not personas.problems and settings.discord_token is not None,
        "discord_token": "set" if settings.discord_token is not None else "missing",
        "server_url": settings.server_url or "embedded",
        "database": str(settings.database),
        "personas": [
            {
                "key": p.key,
                "name": p.name,
                "source": "shipped" if p.builtin else clean_text(str(p.path)),
                "guild": p.guild_id,
            }
            for p in personas.all()
        ],
        "problems": [{"source": e.source, "problems": e.problems} for e in personas.problems],
        "commands": commands_json,
    }
