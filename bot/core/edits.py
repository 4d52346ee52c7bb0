"""Members' edited and deleted messages: the persona remembers what the channel shows.

A member who deletes a message takes back what they said; one who edits it means the new words.
Memory follows, each change in one transaction (`Memory.erase_messages`,
`Memory.rewrite_message`); the Discord listener (`bot.discord.cogs.chat.changes`) feeds it
Discord's raw events, so a message sent before a restart counts too.

**Deleted**, a message leaves memory as forget-me takes a member's messages, for that message:

- its turn;
- the persona replies that answered it: the first reply after it of the persona it was addressed
  to, and in a scene every reply written for it and the chain it began. They leave memory but
  stay visible on Discord. They leave memory because a reply restates, paraphrases or answers
  the message: kept, it would carry the deleted words into every later prompt, summary and
  training file, and the persona would remember answering something nobody said any more.
  They stay on Discord because the member's right is to take back their own words; the reply
  is the bot's text, which others have read and may have answered, and deleting posts in a
  channel is its moderators' call. Its reactions no longer count: it is no longer a reply
  Rolecast remembers;
- the ratings of those replies, and the approved training dialogues that hold the message or
  one of those replies;
- the channel's rolling summaries that cover it (rebuilt from the turns left as the
  conversation goes on).

Later replies that merely quote it, and other members' messages, stay: searching the whole
server for quotes of a member is what `/memory forget-me` does.

**Edited**, the turn takes the new text, cleaned as a new message is; its cached token count
goes (it counted the old text) and the channel's summaries that cover it are dropped, to be
rebuilt. The persona reply that answered the old text stays: it was the answer to what was said
then, members saw both, and `/retry` is the way to have it written again. An approved dialogue
that holds the old text is deleted, not rewritten: its approvers approved the reply as the
answer to the old words, and with the new ones put in the pair may no longer fit (a reply to a
question no longer asked would teach the persona to answer what was not said), while keeping
the old words would keep in training data, the copy that ends up in adapter weights, what the
member took back. The reply can be approved again, with the edited text; its ratings stay (they
rate the reply, which did not change), so a reply that reactions approved is approved again at
its next reaction, from the turns as they are then.

**Re-posted by a proxy bot** (PluralKit, Tupperbox: `bot.core.proxies` says how it is told
apart), a deleted message is no take-back: its turn stays and follows the re-post, whose id,
text (the proxy tags cut) and name (the character's) it takes; the author id stays the
member's, so forget-me still finds it. Its summaries and approved dialogues go as for an edit;
the replies to it stay, since the words they answered are still said.

An edit that leaves no text (an attachment only) is a deletion. An edit that changes nothing
stored (a link preview loading, a pin, text that cleans to what is stored) writes nothing.

Only members' messages are followed, and proxy bots' re-posts of them: the bot's own posts (persona replies, split over several
messages and edited while they stream; notices) are its text, which `/retry` and `/memory
reset` change.

A reply being written while a message it answers is deleted is not kept
(`ChatService.respond`), nor is an approval taken while one of its turns is deleted or edited
(`Memory.add_dialogue`), nor a summary written while one of its turns is deleted
(`Memory.set_summary`); on Discord an edit waits for the channel's reply in progress, so nothing
is written from the old text after the edit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bot.core.memory import Erased, Memory, Rewritten
from bot.core.proxies import Post
from bot.core.text import blank

log = logging.getLogger(__name__)


async def messages_deleted(
    memory: Memory, guild_id: str, channel_id: str, message_ids: Iterable[str]
) -> Erased:
    """Members deleted these messages of a channel: forget them and what was written from
    them. Messages memory does not hold as a member's turn of that channel change nothing."""
    gone = await memory.erase_messages(guild_id, channel_id, message_ids)
    if gone.turns:
        log.info(
            "channel %s: deleted messages forgotten: turns %s, replies %s, %d dialogues, "
            "%d ratings, %d summaries",
            channel_id,
            [t.id for t in gone.turns],
            [t.id for t in gone.replies],
            gone.dialogues,
            gone.ratings,
            gone.summaries,
        )
    return gone


async def message_edited(
    memory: Memory, guild_id: str, channel_id: str, message_id: str, text: str
) -> Erased | Rewritten | None:
    """A member edited a message of a channel; `text` is its new text as a new message would
    be stored. Without text left it is a deletion (Erased); otherwise the turn is rewritten
    (Rewritten, `changed` False when the text was what memory holds). None when memory holds
    no member's turn for it there."""
    if blank(text):
        return await messages_deleted(memory, guild_id, channel_id, [message_id])
    rewritten = await memory.rewrite_message(guild_id, channel_id, message_id, text)
    if rewritten is not None and rewritten.changed:
        log.info(
            "channel %s: turn %d edited; %d dialogues and %d summaries that held it dropped",
            channel_id,
            rewritten.after.id,
            rewritten.dialogues,
            rewritten.summaries,
        )
    return rewritten


async def message_proxied(
    memory: Memory, guild_id: str, channel_id: str, message_id: str, post: Post
) -> Rewritten | None:
    """A member's message of a channel was deleted by a proxy bot that re-posted it as `post`:
    the turn follows the re-post. None when memory holds no member's turn for it there."""
    moved = await memory.repoint_message(
        guild_id,
        channel_id,
        message_id,
        to_message_id=post.message_id,
        content=post.text,
        author_name=post.name,
    )
    if moved is not None:
        log.info(
            "channel %s: turn %d re-posted by a proxy as message %s (%d dialogues and %d "
            "summaries that held it dropped)",
            channel_id,
            moved.after.id,
            post.message_id,
            moved.dialogues,
            moved.summaries,
        )
    return moved
