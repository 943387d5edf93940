"""Model requests first: under a burst, answers' requests to the model go out before their cards.

Every answer needs two things from the event loop before its user sees text: its model request
sent (the model then takes its own time to the first token) and its card created (two Feishu
calls). The loop runs the ready steps of all answers in turn, so when hundreds of messages arrive
at once each step on an answer's way to its model request waits behind the steps of every other
answer, card creation included, and the requests of a whole burst go out late together. A card
is only needed once the first token is there, so cards that are about to be created wait
(:meth:`ModelRequestsFirst.wait`) while any answer is still preparing its model request
(:meth:`ModelRequestsFirst.preparing`), and at most :data:`CARD_WAIT_MAX_S`. One answer alone
waits only for its own request's preparation (its history read and prompt), a few milliseconds.

Transport-agnostic: the conversation service marks the preparation, a channel's replier waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

#: the longest a card waits for model requests being prepared
CARD_WAIT_MAX_S: Final = 0.3


class Preparing:
    """One answer preparing its model request; :meth:`done` once it is sent (or never will
    be). Idempotent."""

    def __init__(self, gate: ModelRequestsFirst) -> None:
        self._gate: ModelRequestsFirst | None = gate

    def done(self) -> None:
        """The request went out, or the answer ended without one."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._leave()


class ModelRequestsFirst:
    """Counts the answers preparing a model request; lets cards wait until there are none."""

    def __init__(self, *, max_wait_s: float = CARD_WAIT_MAX_S) -> None:
        self._max_wait_s = max_wait_s
        self._preparing = 0
        self._none_preparing = asyncio.Event()
        self._none_preparing.set()

    @property
    def preparing_now(self) -> int:
        """How many answers are preparing their model request."""
        return self._preparing

    def preparing(self) -> Preparing:
        """An answer starts preparing its model request."""
        self._preparing += 1
        self._none_preparing.clear()
        return Preparing(self)

    def _leave(self) -> None:
        self._preparing -= 1
        if self._preparing == 0:
            self._none_preparing.set()

    async def wait(self) -> None:
        """Return once no answer is preparing a model request, or after the longest wait."""
        if self._preparing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_preparing.wait(), self._max_wait_s)
