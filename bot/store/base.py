"""The ``Store`` protocol and the plain records that cross it.

A store keeps everything that must survive a restart or be shared by several instances:
conversation turns, processed-message marks (dedup, with expiry), the durable inbox of messages
awaiting an answer (and, set aside, the ones that could not be read back), the API keys with their
state, usage counters, small preferences (a conversation's persona, a user's model) and the
bot's own sent messages (to read back an answer a user quotes). Implementations:
:mod:`bot.store.sqlite` (embedded default). Every method is a coroutine that never blocks the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
TurnStatus = Literal["complete", "cut"]
"""``complete``: a whole answer (or a user message); ``cut``: an answer whose stream broke after
some text had reached the user, kept so the history shows what the user saw."""
KeyState = Literal["active", "cooling", "disabled"]
KeySource = Literal["config", "env", "donated"]
DisabledBy = Literal["auto", "manual"]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation's history."""

    conversation_id: str
    role: Role
    content: str
    created_at: float
    tokens: int
    status: TurnStatus = "complete"


@dataclass(frozen=True)
class InboxEntry:
    """A message accepted from the chat platform and not answered yet.

    ``payload`` is the gateway's own serialisation of the message and ``delivery`` its record of
    what was already sent for it (the card or message, an answer still waiting to be delivered);
    both are opaque JSON strings the store never reads.
    """

    message_id: str
    conversation_id: str
    payload: str
    received_at: float
    delivery: str | None = None


@dataclass(frozen=True)
class SentMessage:
    """A message the bot sent as (part of) an answer, by its chat platform message id."""

    message_id: str
    conversation_id: str
    content: str
    created_at: float


@dataclass(frozen=True)
class StoredKey:
    """An API key as the pool persists it. ``secret`` never leaves the bot (logs mask it)."""

    key_id: str
    secret: str
    masked: str
    owner: str
    source: KeySource
    state: KeyState = "active"
    reason: str | None = None
    disabled_by: DisabledBy | None = None
    until: float | None = None
    requests: int = 0
    failures: int = 0
    last_used_at: float | None = None
    created_at: float = 0.0

    def __repr__(self) -> str:
        return f"StoredKey(key_id={self.key_id!r}, masked={self.masked!r}, state={self.state!r})"


@dataclass(frozen=True)
class Usage:
    """Requests and tokens counted for one (day, user, key)."""

    day: str
    user_id: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    images: int = 0


@dataclass(frozen=True)
class UsageRecord:
    """One request's tokens (and images drawn), to be counted for (day, user, key) together with
    its answer."""

    day: str
    user_id: str
    key_id: str
    prompt_tokens: int
    completion_tokens: int
    images: int = 0


AttachmentKind = Literal["image", "file"]


@dataclass(frozen=True)
class HeldAttachment:
    """An image or a file's text a user sent alone, waiting for the question that goes with it.

    ``holder`` is where the question will come from (a user in a chat); ``content`` is the
    prepared image (``mime`` ``image/…``) or the file's extracted text in UTF-8
    (``text/plain``). ``attachment_id`` is set by the store.
    """

    holder: str
    kind: AttachmentKind
    name: str
    mime: str
    content: bytes
    created_at: float
    attachment_id: int = 0

    def __repr__(self) -> str:
        return (
            f"HeldAttachment(attachment_id={self.attachment_id!r}, kind={self.kind!r}, "
            f"name={self.name!r}, bytes={len(self.content)})"
        )


@runtime_checkable
class Store(Protocol):
    """Persistence for the bot. Open before use, close at shutdown."""

    async def open(self) -> None:
        """Create or migrate the schema and make the store ready."""

    async def close(self) -> None:
        """Flush and release every resource; the store cannot be used afterwards."""

    # Conversation history
    async def append_turn(self, turn: Turn) -> None:
        """Add a turn at the end of its conversation."""

    async def load_turns(self, conversation_id: str) -> list[Turn]:
        """All turns of a conversation, oldest first."""

    async def load_recent_turns(self, conversation_id: str, max_tokens: int) -> list[Turn]:
        """The newest turns of a conversation whose ``tokens`` add up to at most ``max_tokens``.

        Returned oldest first. The turns are read newest first and the reading stops at the
        first turn that does not fit (older turns are never skipped over to fill the budget),
        so a long history costs no more than the part that is returned.
        """

    async def clear_conversation(self, conversation_id: str) -> int:
        """Forget a conversation's turns; return how many were removed."""

    async def prune_turns(self, older_than: float) -> int:
        """Delete every turn created before ``older_than`` (epoch seconds); return how many.

        The bot's sent messages (:meth:`find_sent`) created before ``older_than`` go too, in the
        same call; they are not counted in the number returned.
        """

    # Dedup of processed events and messages
    async def mark_seen(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; True when it was not already recorded (atomic)."""

    async def is_seen(self, key: str) -> bool:
        """Whether ``key`` is recorded and not expired."""

    async def purge_expired(self) -> int:
        """Drop expired dedup records; return how many."""

    # Durable inbox
    async def accept_message(self, entry: InboxEntry, ttl_s: float) -> bool:
        """Atomically mark ``entry.message_id`` answered-once and put it in the inbox.

        True the first time for a message id (within ``ttl_s``); False for a duplicate, which
        must then be dropped. This is the gate that makes every message answered exactly once,
        across restarts and instances.
        """

    async def inbox_add(self, entry: InboxEntry) -> None:
        """Record a message awaiting its answer (idempotent per message id)."""

    async def inbox_remove(self, message_id: str) -> None:
        """The message was answered (or refused): forget it."""

    async def inbox_list(self) -> list[InboxEntry]:
        """Every message still awaiting an answer, oldest first, with its ``delivery``."""

    async def inbox_set_delivery(self, message_id: str, delivery: str | None) -> None:
        """Replace the ``delivery`` record of an inbox entry; nothing when it is not there."""

    async def inbox_reject(self, message_id: str, reason: str) -> None:
        """Move an entry that cannot be read back out of the inbox, keeping it with ``reason``.

        The entry is kept aside (with the time it was moved) for a person to look at; it is
        never answered. Nothing happens when the message is not in the inbox.
        """

    # Arrival journal: raw events the long-connection process wrote before Feishu's ACK
    # (bot.journal), until they are accepted
    async def arrivals(self) -> list[tuple[str, str]]:
        """Journaled events that were never accepted, oldest first: ``(message_id, event)``.
        Once a message is accepted (:meth:`accept_message`) it is no longer listed."""

    async def forget_arrivals(self, message_ids: Sequence[str] = (), *, before: float = 0) -> int:
        """Drop journal entries by message id, and every one received before ``before``."""

    async def complete_message(
        self,
        message_ids: Sequence[str],
        turns: Sequence[Turn],
        usage: UsageRecord | None,
        sent: Sequence[SentMessage] = (),
        release: Sequence[int] = (),
    ) -> None:
        """Record a delivered answer in one transaction.

        Appends ``turns`` in order, counts ``usage`` (like :meth:`add_usage`) when given, records
        the messages the answer was ``sent`` as (replacing any with the same message id), drops
        the held attachments the answer used (``release``: their ids) and removes every message
        of ``message_ids`` from the inbox: all of it or, when it fails
        (:class:`bot.errors.StoreError`), none of it. So a crash never leaves the history saved
        while the inbox still holds the message, nor the reverse.
        """

    async def find_sent(self, message_id: str) -> SentMessage | None:
        """The bot's own message with this chat platform id, or None when it is not recorded.

        Sent messages outlive :meth:`clear_conversation` (a user may still quote an old answer)
        and go only with :meth:`prune_turns`.
        """

    # API keys
    async def save_key(self, key: StoredKey) -> None:
        """Insert or replace a key record."""

    async def load_keys(self) -> list[StoredKey]:
        """Every key record, oldest first."""

    async def delete_key(self, key_id: str) -> bool:
        """Remove a key; True when it existed."""

    # Attachments held for the next question
    async def hold_attachment(self, attachment: HeldAttachment) -> int:
        """Keep ``attachment`` until a question uses it; return its id."""

    async def held_attachments(self, holder: str, since: float) -> list[HeldAttachment]:
        """``holder``'s attachments created at or after ``since``, oldest first."""

    async def drop_held(self, before: float) -> int:
        """Forget every held attachment created before ``before``; return how many."""

    # Usage
    async def add_usage(
        self,
        day: str,
        user_id: str,
        key_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        images: int = 0,
    ) -> None:
        """Count one request, its tokens and the images it drew for (day, user, key)."""

    async def usage_for_day(self, day: str) -> list[Usage]:
        """Every usage row of a day."""

    async def usage_between(
        self, first_day: str, last_day: str, user_id: str | None = None
    ) -> list[Usage]:
        """Every usage row from ``first_day`` to ``last_day``, both included.

        Days are ``YYYY-MM-DD`` and compared as text. Only ``user_id``'s rows when it is given.
        Ordered by day, then user, then key.
        """

    # Preferences: small per-scope settings, e.g. a conversation's persona, a user's model
    async def get_preference(self, scope: str, subject: str) -> str | None:
        """The value stored for ``subject`` in ``scope``, or None when there is none."""

    async def set_preference(self, scope: str, subject: str, value: str | None) -> None:
        """Store ``value`` for ``subject`` in ``scope``, replacing any; None deletes it."""

    async def preferences(self, scope: str) -> dict[str, str]:
        """Every subject of ``scope`` with its value."""
