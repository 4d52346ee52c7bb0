"""Proxy bots: a member's message deleted because it was re-posted is not taken back.

Role-play servers often run a proxy bot (PluralKit, Tupperbox). A member writes with proxy tags
(`[Aria: hello there]`, `aria: hello there`); within a second or two the proxy bot posts the
text again, tags cut, through a webhook under the character's name and avatar, and deletes the
member's message. That deletion is no take-back: the member's words are still in the channel,
now spoken by the character. So when a member's stored message is deleted, a webhook post of
another bot in the same channel shortly before or after it (`window_s`) whose text is the
message's with something cut around it (`is_proxy_of`) makes it a proxy: memory keeps the turn
and points it at the re-post (`bot.core.edits.message_proxied`), whose own edits and deletion
are then followed like a member's.

`ProxyWatch` is the short memory of other bots' webhook posts this needs: each channel's posts
of the last `window_s` seconds, at most `per_channel` of them per channel and `most` in all (the
oldest go first), and the deletions waiting for a re-post. A deletion with no re-post by the
end of the window is a take-back, done `window_s` late. The clock and the sleep are the
caller's to give, so that the window can be played through without waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# A re-post shorter than this matches only a message it is the whole of: "ok" or "yes" posted
# by some webhook must not save every deleted message that contains those letters.
MIN_PROXIED_CHARS = 8


def _squeezed(text: str) -> str:
    return " ".join(text.split())


def is_proxy_of(stored: str, posted: str) -> bool:
    """Whether `posted` (a webhook post's text, cleaned as a member's message is) can be the
    proxy bot's re-post of a member's message stored as `stored`: the same text, or a part of
    it at least `MIN_PROXIED_CHARS` long (the proxy tags are what is cut), compared with runs of
    whitespace as one space (a proxy bot trims what is left around its tags)."""
    stored, posted = _squeezed(stored), _squeezed(posted)
    if not posted:
        return False
    return posted == stored or (len(posted) >= MIN_PROXIED_CHARS and posted in stored)


@dataclass(frozen=True)
class Post:
    """A webhook post of another bot: what a member's deleted message may have become."""

    message_id: str
    text: str  # cleaned as a member's message is stored
    name: str  # the name it was posted under: the character speaking
    at: float = 0.0  # when it was seen, on the watch's clock


@dataclass
class _Waiting:
    """A deleted message waiting for its re-post."""

    text: str
    found: asyncio.Future[Post]


class ProxyWatch:
    """Other bots' recent webhook posts, per channel, and the deletions waiting for one."""

    def __init__(
        self,
        window_s: float,
        *,
        per_channel: int = 16,
        most: int = 256,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.window_s = window_s
        self.per_channel = per_channel
        self.most = most
        self.clock = clock
        self.sleep = sleep
        # channel -> its posts, oldest first; channels in the order they last had a post
        self._posts: OrderedDict[str, deque[Post]] = OrderedDict()
        self._waiting: dict[str, list[_Waiting]] = {}

    @property
    def on(self) -> bool:
        """A window of 0 turns proxy matching off: every deletion is a take-back, at once."""
        return self.window_s > 0

    def __len__(self) -> int:
        """How many posts are kept, all channels together."""
        return sum(len(posts) for posts in self._posts.values())

    def posted(self, channel: str, post: Post) -> None:
        """Another bot's webhook posted in a channel: a deletion waiting there that it is the
        re-post of (the one waiting longest) takes it; otherwise it is kept for a deletion
        that comes later in the window."""
        if not self.on:
            return
        for waiting in self._waiting.get(channel, []):
            if not waiting.found.done() and is_proxy_of(waiting.text, post.text):
                waiting.found.set_result(post)
                return
        self._expire()
        posts = self._posts.pop(channel, None) or deque(maxlen=self.per_channel)
        posts.append(post)
        self._posts[channel] = posts  # now the channel with the newest post
        while len(self) > self.most:
            oldest = next(iter(self._posts))
            self._posts[oldest].popleft()
            if not self._posts[oldest]:
                del self._posts[oldest]

    async def reposted(self, channel: str, text: str) -> Post | None:
        """The re-post of a member's message of a channel, stored as `text`, that was just
        deleted: one posted in the window before now, or the first to come in the window
        after (waited for). None when there is none: the deletion is a take-back. A post is
        the re-post of one deleted message at most."""
        if not self.on:
            return None
        self._expire()
        posts = self._posts.get(channel, deque())
        for post in posts:
            if is_proxy_of(text, post.text):
                posts.remove(post)
                if not posts:
                    del self._posts[channel]
                return post
        waiting = _Waiting(text, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(channel, []).append(waiting)
        timer = asyncio.ensure_future(self.sleep(self.window_s))
        either: set[asyncio.Future[Any]] = {waiting.found, timer}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            others = [w for w in self._waiting[channel] if w is not waiting]
            if others:
                self._waiting[channel] = others
            else:
                del self._waiting[channel]
        return waiting.found.result() if waiting.found.done() else None

    def _expire(self) -> None:
        """Forget posts older than the window: no deletion can be their message's any more."""
        since = self.clock() - self.window_s
        for channel in list(self._posts):
            posts = self._posts[channel]
            while posts and posts[0].at < since:
                posts.popleft()
            if not posts:
                del self._posts[channel]
