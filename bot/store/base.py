"""The ``Store`` protocol and the plain records that cross it.

A store keeps everything that must survive a restart or be shared by several instances:
conversation turns, processed-message marks (dedup, with expiry), the durable inbox of messages
awaiting an answer, the API keys with their state, and usage counters. Implementations:
:mod:`bot.store.sqlite` (embedded default). Every method is a coroutine that never blocks the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
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


@dataclass(frozen=True)
class InboxEntry:
    """A message accepted from the chat platform and not answered yet.

    ``payload`` is the gateway's own serialisation of the message; the store does not read it.
    """

    message_id: str
    conversation_id: str
    payload: str
    received_at: float


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

    async def clear_conversation(self, conversation_id: str) -> int:
        """Forget a conversation's turns; return how many were removed."""

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
        """Every message still awaiting an answer, oldest first."""

    # API keys
    async def save_key(self, key: StoredKey) -> None:
        """Insert or replace a key record."""

    async def load_keys(self) -> list[StoredKey]:
        """Every key record, oldest first."""

    async def delete_key(self, key_id: str) -> bool:
        """Remove a key; True when it existed."""

    # Usage
    async def add_usage(
        self, day: str, user_id: str, key_id: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Count one request and its tokens for (day, user, key)."""

    async def usage_for_day(self, day: str) -> list[Usage]:
        """Every usage row of a day."""
