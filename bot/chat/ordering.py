"""Per-conversation ordering: messages of one conversation are answered one at a time, in order.

A message takes its place (a :class:`Turn`) when it arrives; its answer may start once every
earlier turn of the same conversation has finished. A turn finishes only when its owner says so
(:meth:`Turn.finish`): after the answer was delivered or failed for good, however that happened,
so a later message never overtakes an earlier one whose delivery is still under way.
Conversations are independent of each other.
"""

from __future__ import annotations

import asyncio


class Turn:
    """A message's place in its conversation's queue."""

    def __init__(self, previous: asyncio.Future[None] | None) -> None:
        self._previous = previous
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(self) -> None:
        """Wait until every earlier turn of the conversation finished."""
        if self._previous is not None:
            await asyncio.shield(self._previous)

    @property
    def waiting(self) -> bool:
        """Whether an earlier turn of the conversation has not finished yet."""
        return self._previous is not None and not self._previous.done()

    def finish(self) -> None:
        """Let the next message of the conversation go (idempotent)."""
        if not self.finished.done():
            self.finished.set_result(None)


class ConversationQueue:
    """Hands out :class:`Turn` objects in arrival order, one chain per conversation."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def take_turn(self, conversation_id: str) -> Turn:
        """The next place in ``conversation_id``'s queue."""
        turn = Turn(self._tails.get(conversation_id))
        self._tails[conversation_id] = turn.finished
        turn.finished.add_done_callback(lambda done: self._forget(conversation_id, done))
        return turn

    def busy(self, conversation_id: str) -> bool:
        """Whether a turn of ``conversation_id`` has not finished yet."""
        return conversation_id in self._tails

    def _forget(self, conversation_id: str, finished: asyncio.Future[None]) -> None:
        if self._tails.get(conversation_id) is finished:
            del self._tails[conversation_id]
