"""Discord's servers, the one part a test cannot have, answered in-process.

dpytest fakes the gateway and the bot's REST calls. It has no webhooks and no interaction
responses, which go through discord.py's webhook adapter; `FakeDiscordAPI` subclasses that
adapter and answers its routes (`POST /webhooks/{id}/{token}`, edits, interaction callbacks and
follow-ups) against dpytest's state, so the whole of discord.py above the HTTP layer runs for
real. It also adds the channel-webhook REST calls to dpytest's `FakeHttp`.

Interactions are built from payloads shaped like the ones Discord sends (as discord.py's own
tests/test_app_commands_invoke.py does) and passed to the bot's command tree.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.ext.test as dpytest
import discord.interactions
import discord.webhook.async_ as webhook_async
from discord.ext.test import backend
from discord.ext.test import factories as facts

_ids = itertools.count(1_100_000_000_000_000_000)


def snowflake() -> int:
    return next(_ids)


@dataclass
class Post:
    """A message the bot made through a webhook (a persona reply)."""

    message_id: int
    webhook_id: int
    channel_id: int
    username: str | None
    avatar_url: str | None
    allowed_mentions: dict[str, Any] | None
    contents: list[tuple[float, str]] = field(default_factory=list)  # every version, timed

    @property
    def content(self) -> str:
        return self.contents[-1][1]


@dataclass
class Response:
    """An interaction callback or follow-up."""

    kind: str  # "callback" | "followup" | "edit_original"
    type: int | None  # callback type (4 message, 5 deferred, ...)
    content: str | None
    ephemeral: bool
    files: dict[str, bytes]
    embeds: list[dict[str, Any]]
    at: float


class FakeDiscordAPI(webhook_async.AsyncWebhookAdapter):
    def __init__(self, client: discord.Client) -> None:
        super().__init__()
        self.client = client
        self.hooks: dict[int, dict[str, Any]] = {}  # live webhooks by id
        self.posts: dict[int, Post] = {}
        self.responses: list[Response] = []
        self.refuse_webhooks = False  # create_webhook answers 403

    # -- install --------------------------------------------------------------------------

    def install(self, monkeypatch: Any) -> None:
        ctx = webhook_async.async_context.__class__("fake_webhook_context", default=self)
        monkeypatch.setattr(webhook_async, "async_context", ctx)
        monkeypatch.setattr(discord.interactions, "async_context", ctx)
        http = self.client.http
        monkeypatch.setattr(http, "channel_webhooks", self._channel_webhooks, raising=False)
        monkeypatch.setattr(http, "create_webhook", self._create_webhook, raising=False)
        monkeypatch.setattr(http, "add_reaction", self._bot_reaction, raising=False)

    async def _bot_reaction(self, channel_id: int, message_id: int, emoji: str) -> None:
        message = self.client._connection._get_message(message_id)
        assert message is not None and self.client.user is not None
        react(message, self.client.user, emoji)

    # -- REST calls on the bot's HTTP client --------------------------------------------------

    async def _channel_webhooks(self, channel_id: int) -> list[dict[str, Any]]:
        return [h for h in self.hooks.values() if int(h["channel_id"]) == channel_id]

    async def _create_webhook(
        self, channel_id: int, *, name: str, avatar: bytes | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        if self.refuse_webhooks:
            raise discord.Forbidden(backend.FakeRequest(403, "Forbidden"), "Missing Permissions")
        hook_id = snowflake()
        assert self.client.user is not None
        self.hooks[hook_id] = {
            "id": hook_id,
            "type": 1,
            "channel_id": channel_id,
            "guild_id": self._channel(channel_id).guild.id,
            "name": name,
            "avatar": None,
            "token": f"token-{hook_id}",
            "application_id": None,
            "user": facts.dict_from_user(self.client.user),
        }
        return self.hooks[hook_id]

    def delete_webhook_now(self, hook_id: int) -> None:
        """As if someone deleted the webhook in the server settings."""
        del self.hooks[hook_id]

    def _channel(self, channel_id: int) -> Any:
        channel = self.client.get_channel(channel_id)
        assert channel is not None, channel_id
        return channel

    # -- the adapter's one HTTP entry ---------------------------------------------------------

    async def request(  # type: ignore[override]
        self,
        route: Any,
        session: Any,
        *,
        payload: dict[str, Any] | None = None,
        multipart: list[dict[str, Any]] | None = None,
        files: Any = None,
        params: dict[str, Any] | None = None,
        **_: Any,
    ) -> Any:
        if multipart:
            for part in multipart:
                if part.get("name") == "payload_json":
                    payload = json.loads(part["value"])
        payload = payload or {}
        received = {f.filename: _read(f) for f in files or []}
        method, path = route.method, route.url
        if route.path.startswith("/interactions/"):
            return self._callback(route, payload, received)
        hook_id = int(route.webhook_id)
        if hook_id == self.client.application_id:
            return self._followup(method, path, payload, received)
        if hook_id not in self.hooks:
            raise discord.NotFound(backend.FakeRequest(404, "Not Found"), "Unknown Webhook")
        if method == "POST":
            return self._execute(hook_id, payload)
        if method == "PATCH":
            return self._edit(int(path.rsplit("/", 1)[1]), payload)
        raise NotImplementedError(f"{method} {path}")

    def _execute(self, hook_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        hook = self.hooks[hook_id]
        channel = self._channel(int(hook["channel_id"]))
        assert self.client.user is not None
        data = facts.make_message_dict(channel, self.client.user, content=payload.get("content"))
        data["webhook_id"] = hook_id
        data["author"] = {
            "id": hook_id,
            "username": payload.get("username") or hook["name"],
            "discriminator": "0000",
            "avatar": None,
            "bot": True,
        }
        data.pop("member", None)
        state = backend.get_state()
        state.parse_message_create(data)
        backend._cur_config.messages.setdefault(channel.id, []).append(data)
        post = Post(
            int(data["id"]),
            hook_id,
            channel.id,
            payload.get("username"),
            payload.get("avatar_url"),
            payload.get("allowed_mentions"),
        )
        post.contents.append((time.monotonic(), data["content"]))
        self.posts[post.message_id] = post
        return data

    def _edit(self, message_id: int, payload: dict[str, Any]) -> dict[str, Any]:
        post = self.posts[message_id]
        post.contents.append((time.monotonic(), payload.get("content", post.content)))
        for data in backend._cur_config.messages.get(post.channel_id, []):
            if int(data["id"]) == message_id:
                data["content"] = post.content
                return data
        raise AssertionError("edited an unknown message")

    def _callback(
        self, route: Any, payload: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        kind = int(payload["type"])
        data = payload.get("data") or {}
        ephemeral = bool(int(data.get("flags", 0)) & 64)
        self.responses.append(
            Response(
                "callback",
                kind,
                data.get("content"),
                ephemeral,
                files,
                data.get("embeds") or [],
                time.monotonic(),
            )
        )
        return {
            "interaction": {
                "id": str(route.webhook_id),
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": ephemeral,
            },
            "resource": {"type": kind},
        }

    def _followup(
        self, method: str, path: str, payload: dict[str, Any], files: dict[str, bytes]
    ) -> dict[str, Any]:
        kind = "edit_original" if path.endswith("@original") else "followup"
        ephemeral = bool(int(payload.get("flags", 0) or 0) & 64)
        self.responses.append(
            Response(
                kind,
                None,
                payload.get("content"),
                ephemeral,
                files,
                payload.get("embeds") or [],
                time.monotonic(),
            )
        )
        channel = dpytest.get_config().channels[0]
        assert self.client.user is not None
        return facts.make_message_dict(channel, self.client.user, content=payload.get("content"))

    # -- reading what happened ----------------------------------------------------------------

    def texts(self) -> list[str]:
        """Every interaction answer's text (callbacks, follow-ups), in order."""
        out = []
        for r in self.responses:
            if r.content:
                out.append(r.content)
            for embed in r.embeds:
                out.append(json.dumps(embed, ensure_ascii=False))
        return out

    def posts_in(self, channel_id: int) -> list[Post]:
        return [p for p in self.posts.values() if p.channel_id == channel_id]


def _read(file: discord.File) -> bytes:
    file.reset()
    return file.fp.read()


# -- interactions from payloads ---------------------------------------------------------------


def member_payload(member: discord.Member, *, permissions: discord.Permissions) -> dict[str, Any]:
    return {
        "user": facts.dict_from_user(member._user),
        "roles": [str(r.id) for r in member.roles if r != member.guild.default_role],
        "joined_at": "2024-01-01T00:00:00+00:00",
        "deaf": False,
        "mute": False,
        "flags": 0,
        "nick": member.nick,
        "permissions": str(permissions.value),
    }


def interaction_payload(
    client: discord.Client,
    channel: discord.abc.GuildChannel,
    member: discord.Member,
    data: dict[str, Any],
    *,
    permissions: discord.Permissions | None = None,
    kind: int = 2,
) -> dict[str, Any]:
    perms = permissions if permissions is not None else discord.Permissions.none()
    perms = perms | discord.Permissions(send_messages=True, view_channel=True)
    return {
        "id": str(snowflake()),
        "application_id": str(client.application_id),
        "type": kind,
        "token": f"interaction-token-{snowflake()}",
        "version": 1,
        "guild_id": str(channel.guild.id),
        "channel_id": str(channel.id),
        "channel": {
            "id": str(channel.id),
            "type": channel.type.value,
            "guild_id": str(channel.guild.id),
            "name": channel.name,
        },
        "member": member_payload(member, permissions=perms),
        "app_permissions": str(discord.Permissions.all().value),
        "locale": "en-US",
        "guild_locale": "en-US",
        "attachment_size_limit": 26_214_400,
        "data": data,
    }


def slash_data(
    tree: discord.app_commands.CommandTree[Any],
    path: str,
    options: dict[str, Any] | None = None,
    *,
    resolved: dict[str, Any] | None = None,
    focused: str | None = None,
) -> dict[str, Any]:
    """`data` of a chat-input interaction for `path` ("persona set"), typed from the tree."""
    names = path.split()
    command: Any = tree.get_command(names[0])
    assert command is not None, path
    for name in names[1:]:
        command = command.get_command(name)
        assert command is not None, path
    params = {p.name: p for p in command.parameters}
    leaf = []
    for name, value in (options or {}).items():
        option: dict[str, Any] = {"name": name, "type": params[name].type.value, "value": value}
        if name == focused:
            option["focused"] = True
        leaf.append(option)
    opts: list[dict[str, Any]] = leaf
    for depth in range(len(names) - 1, 0, -1):
        opts = [{"name": names[depth], "type": 1, "options": opts}]
    data: dict[str, Any] = {
        "id": str(snowflake()),
        "name": names[0],
        "type": 1,
        "options": opts,
    }
    if resolved:
        data["resolved"] = resolved
    return data


async def invoke(
    client: discord.Client,
    channel: discord.abc.GuildChannel,
    member: discord.Member,
    data: dict[str, Any],
    *,
    permissions: discord.Permissions | None = None,
    kind: int = 2,
) -> discord.Interaction[Any]:
    payload = interaction_payload(client, channel, member, data, permissions=permissions, kind=kind)
    interaction = discord.Interaction(data=payload, state=client._connection)  # type: ignore[arg-type]
    tree = client.tree  # type: ignore[attr-defined]
    await tree._call(interaction)
    return interaction


def find_button(client: discord.Client, label: str) -> tuple[int | None, str]:
    """The message id a view of the bot waits under and the custom id of its button `label`
    (the view store keys views by the id Discord gave their message)."""
    return next(
        (entity, item.custom_id)  # type: ignore[attr-defined]
        for entity, items in client._connection._view_store._views.items()  # type: ignore[attr-defined]
        for item in items.values()
        if getattr(item, "label", "") == label
    )


async def press(
    client: discord.Client,
    channel: discord.abc.GuildChannel,
    member: discord.Member,
    custom_id: str,
    message_id: int | None,
) -> None:
    """Press a button of a view the bot sent (a component interaction) and wait for the
    view's callback to finish."""
    payload = interaction_payload(
        client, channel, member, {"custom_id": custom_id, "component_type": 2}, kind=3
    )
    payload["message"] = facts.make_message_dict(
        channel, client.user, id_num=message_id or snowflake()
    )
    interaction = discord.Interaction(data=payload, state=client._connection)  # type: ignore[arg-type]
    client._connection._view_store.dispatch_view(2, custom_id, interaction)
    running = [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("discord-ui-view-dispatch") and not t.done()
    ]
    await asyncio.gather(*running)


def deliver(
    channel: discord.abc.GuildChannel,
    author: discord.abc.User,
    content: str,
    *,
    reply_to: int | None = None,
    webhook_id: int | None = None,
) -> discord.Message:
    """A MESSAGE_CREATE from the gateway, without waiting for the bot's handlers (dpytest's
    `message` waits); with a reply reference or a webhook author when asked."""
    mentions = backend.find_user_mentions(content, channel.guild)
    data = facts.make_message_dict(
        channel, author, content=content, mentions=mentions, guild_id=channel.guild.id
    )
    if reply_to is not None:
        data["message_reference"] = {
            "message_id": str(reply_to),
            "channel_id": str(channel.id),
            "guild_id": str(channel.guild.id),
        }
    if webhook_id is not None:
        data["webhook_id"] = str(webhook_id)
    state = backend.get_state()
    state.parse_message_create(data)
    backend._cur_config.messages.setdefault(channel.id, []).append(data)
    message = state._get_message(data["id"])
    assert message is not None
    return message


def message_command_data(message: discord.Message, name: str) -> dict[str, Any]:
    """`data` of a message context-menu interaction targeting `message`."""
    raw = next(
        d for d in backend._cur_config.messages[message.channel.id] if int(d["id"]) == message.id
    )
    return {
        "id": str(snowflake()),
        "name": name,
        "type": 3,
        "target_id": str(message.id),
        "resolved": {"messages": {str(message.id): raw}},
    }


def react(
    message: discord.Message, user: discord.abc.User, emoji: str, *, remove: bool = False
) -> None:
    """A MESSAGE_REACTION_ADD (or _REMOVE) from the gateway, in discord.py 2.7's shape."""
    data: dict[str, Any] = {
        "message_id": str(message.id),
        "channel_id": str(message.channel.id),
        "user_id": str(user.id),
        "emoji": {"id": None, "name": emoji},
        "type": 0,
        "burst": False,
        "burst_colors": [],
    }
    if message.guild is not None:
        data["guild_id"] = str(message.guild.id)
    if isinstance(user, discord.Member) and not remove:
        data["member"] = facts.dict_from_member(user)
    state = backend.get_state()
    if remove:
        state.parse_message_reaction_remove(data)
    else:
        state.parse_message_reaction_add(data)


def channel_texts(channel: discord.abc.Messageable, author: Any) -> list[str]:
    """The current text (edits applied) of every message `author` posted in the channel."""
    channel_id = channel.id  # type: ignore[attr-defined]
    return [
        str(d["content"])
        for d in backend._cur_config.messages.get(channel_id, [])
        if int(d["author"]["id"]) == author.id and not d.get("webhook_id")
    ]


# -- members editing and deleting messages: the gateway events, in Discord's documented shapes --


def user_object(user: discord.abc.User) -> dict[str, Any]:
    """A user object as the gateway sends it (`author`, and each of `mentions`)."""
    return {
        "id": str(user.id),
        "username": user.name,
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "public_flags": 0,
        **({"bot": True} if user.bot else {}),
    }


def message_update(
    message: discord.Message,
    content: str,
    *,
    edited: bool = True,
    embeds: list[dict[str, Any]] | None = None,
    channel_id: int | None = None,
    guild_id: int | None = None,
) -> dict[str, Any]:
    """A MESSAGE_UPDATE: the whole message again, as Discord sends it now (discord.py 2.5+
    builds a `Message` from it), with its `content` and `edited_timestamp` (set when its
    author edited it; a link preview loading leaves it null and adds `embeds`). In a guild it
    carries its author's partial `member`, and each mentioned user theirs."""
    channel = message.channel
    guild = message.guild
    mentioned = backend.find_user_mentions(content, guild) if guild is not None else []
    data: dict[str, Any] = {
        "type": 0,
        "tts": False,
        "timestamp": message.created_at.isoformat(),
        "edited_timestamp": discord.utils.utcnow().isoformat() if edited else None,
        "pinned": False,
        "mention_everyone": False,
        "mentions": [
            {**user_object(u), "member": {"roles": [], "joined_at": "2024-01-01T00:00:00+00:00"}}
            for u in mentioned
        ],
        "mention_roles": [],
        "attachments": [],
        "embeds": embeds or [],
        "components": [],
        "flags": 0,
        "id": str(message.id),
        "channel_id": str(channel_id or channel.id),
        "author": user_object(message.author),
        "content": content,
    }
    if message.webhook_id is not None:
        data["webhook_id"] = str(message.webhook_id)
    elif guild is not None:
        data["member"] = {
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": getattr(message.author, "nick", None),
        }
    where = guild_id or (guild.id if guild is not None else None)
    if where is not None:
        data["guild_id"] = str(where)
    return data


def message_delete(message_id: int, channel_id: int, guild_id: int | None) -> dict[str, Any]:
    """A MESSAGE_DELETE: the message's id, its channel's and its guild's (none in a DM)."""
    data = {"id": str(message_id), "channel_id": str(channel_id)}
    if guild_id is not None:
        data["guild_id"] = str(guild_id)
    return data


def message_delete_bulk(ids: list[int], channel_id: int, guild_id: int) -> dict[str, Any]:
    """A MESSAGE_DELETE_BULK: a moderator's purge of one channel's messages."""
    return {"ids": [str(i) for i in ids], "channel_id": str(channel_id), "guild_id": str(guild_id)}


def webhook_message(
    channel: discord.abc.GuildChannel, webhook_id: int, name: str, content: str
) -> dict[str, Any]:
    """A MESSAGE_CREATE of a post through a webhook, such as a proxy bot's (PluralKit,
    Tupperbox) re-posting a member's message under a character's name: `webhook_id` set, the
    author the webhook itself (its id, the name it posted under, `bot`), no `member`."""
    mentioned = backend.find_user_mentions(content, channel.guild)
    data = facts.make_message_dict(channel, mentioned[0] if mentioned else channel.guild.me)
    data.update(
        {
            "id": str(snowflake()),
            "channel_id": str(channel.id),
            "guild_id": str(channel.guild.id),
            "content": content,
            "webhook_id": str(webhook_id),
            "author": {
                "id": str(webhook_id),
                "username": name,
                "discriminator": "0000",
                "avatar": None,
                "bot": True,
            },
            "mentions": [user_object(u) for u in mentioned],
        }
    )
    data.pop("member", None)
    backend._cur_config.messages.setdefault(channel.id, []).append(data)
    return data


def gateway(event: str, data: dict[str, Any]) -> list[asyncio.Task[Any]]:
    """Receive one of those events as the gateway delivers it: discord.py's own parser builds
    the raw event (`RawMessageUpdateEvent`, ...) and dispatches it to the bot's listeners.
    Returns the tasks it started (the listeners), for a test to wait on them alone."""
    parse = {
        "MESSAGE_CREATE": "parse_message_create",
        "MESSAGE_UPDATE": "parse_message_update",
        "MESSAGE_DELETE": "parse_message_delete",
        "MESSAGE_DELETE_BULK": "parse_message_delete_bulk",
    }[event]
    before = asyncio.all_tasks()
    getattr(backend.get_state(), parse)(data)
    return list(asyncio.all_tasks() - before)
