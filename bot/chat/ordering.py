"""Per-conversation ordering: messages of one conversation are answered one at a time, in order.

A message takes its place (a :class:`Place`) when it arrives; its answer may start once every
earlier place of the same conversation was finished. A place is finished only when its owner says so
(:meth:`Place.finish`): after the answer was delivered or failed for good, however that happened,
so a later message never overtakes an earlier one whose delivery is still under way.
Conversations are independent of each other.
"""

from __future__ import annotations

import asyncio


class Place:
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
        """Whether an earlier place of the conversation is not finished yet."""
        return self._previous is not None and not self._previous.done()

    def finish(self) -> None:
        """Let the next message of the conversation go (idempotent)."""
        if not self.finished.done():
            self.finished.set_result(None)


class ConversationQueue:
    """Hands out :class:`Place` objects in arrival order, one chain per conversation."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def take_place(self, conversation_id: str) -> Place:
        """The next place in ``conversation_id``'s queue."""
        place = Place(self._tails.get(conversation_id))
        self._tails[conversation_id] = place.finished
        place.finished.add_done_callback(lambda done: self._forget(conversation_id, done))
        return place

    def _forget(self, conversation_id: str, finished: asyncio.Future[None]) -> None:
        if self._tails.get(conversation_id) is finished:
            del self._tails[conversation_id]
