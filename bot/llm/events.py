"""Plain data crossing the LLM boundary: chat messages in, stream events out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

MessageRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a prompt; a user message may carry ``images`` (``data:`` URLs)."""

    role: MessageRole
    content: str
    images: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"ChatMessage(role={self.role!r}, content={self.content!r}, images={len(self.images)})"
        )


@dataclass(frozen=True)
class TokenUsage:
    """Tokens a request cost, as the provider reported (or as estimated when it did not)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer, in order."""

    text: str


@dataclass(frozen=True)
class WaitingForKey:
    """Every key is rate limited: the answer will start after about ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class RequestSent:
    """A request is going out to the model (before each attempt's POST): the answer's text
    comes after the model's own time to the first token."""


@dataclass(frozen=True)
class Completed:
    """The answer is complete."""

    usage: TokenUsage | None
    key_id: str
    finish_reason: str | None


StreamEvent = TextDelta | WaitingForKey | RequestSent | Completed
Emit = Callable[[StreamEvent], None]


async def bridge(
    produce: Callable[[Emit], Awaitable[None]],
) -> AsyncIterator[StreamEvent]:
    """Run ``produce(emit)`` in a task and yield what it emits, in order.

    Lets code that reports progress from deep inside awaited calls (a key pool's waiting notice
    during a retry) expose a plain async iterator. An exception of the producer is raised to the
    consumer after the events emitted before it; closing the iterator early cancels the producer.
    """
    queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()

    async def run() -> None:
        try:
            await produce(queue.put_nowait)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (event := await queue.get()) is not None:
            yield event
        await task  # re-raises the producer's exception, if any
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(frozen=True)
class DrawnImage:
    """An image the endpoint drew: its bytes (PNG, JPEG or WebP) and the key that paid for it."""

    data: bytes
    key_id: str
    revised_prompt: str = ""
