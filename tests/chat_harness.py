"""A conversation core wired to the fake OpenAI server, for tests that talk to it."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.chat.access import AccessControl
from bot.chat.key_commands import KeyCommands
from bot.chat.media import MediaOptions, MediaReader
from bot.chat.replies import Reply, ReplyDelta, ReplyEvent, ReplyFailed, ReplyFinished, ReplyNotice
from bot.chat.service import ConversationService, IncomingMessage
from bot.config import Settings, parse_settings
from bot.llm.client import LLMClient
from bot.llm.keypool import KeyPool, key_id_of
from bot.llm.validation import check_key
from bot.ops.metrics import Metrics
from bot.store import SQLiteStore

KEY_A = "sk-test-key-a-000000000000000000000001"
KEY_B = "sk-test-key-b-000000000000000000000002"


class FakeTime:
    """A wall clock and an async sleep that advances it instantly, recording each real wait.

    Zero-length sleeps (tenacity's "retry at once") are not recorded.
    """

    def __init__(self, now: float = 1_764_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.sleeps.append(seconds)
            self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Answer:
    """Everything one reply produced, as a user would see it."""

    events: list[ReplyEvent] = field(default_factory=list)

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, ReplyDelta))

    @property
    def notices(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, ReplyNotice)]

    @property
    def finished(self) -> ReplyFinished | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, ReplyFinished) else None

    @property
    def failed(self) -> ReplyFailed | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, ReplyFailed) else None

    @property
    def text(self) -> str:
        if self.finished is not None:
            return self.finished.text
        return self.failed.message if self.failed else ""


def make_settings(base_url: str, keys: list[str], /, **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "llm": {
            "base_url": base_url,
            "keys": [{"key": key, "owner": f"owner{index}"} for index, key in enumerate(keys)],
            "request_timeout_s": 5,
            "max_attempts": 4,
            "max_wait_s": 30,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_settings(raw)


class ChatHarness:
    """Store + key pool + LLM client + service over the fake, with fake time."""

    def __init__(
        self, settings: Settings, db_path: Path, time: FakeTime, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.time = time
        self.metrics = metrics or Metrics()
        self.store = SQLiteStore(db_path, clock=time)
        self.pool = KeyPool(self.store, clock=time, sleep=time.sleep, max_wait_s=30)
        self.llm = LLMClient(
            settings.llm, self.pool, sleep=time.sleep, on_call=self.metrics.llm_call
        )
        self.keys = KeyCommands(
            self.pool, functools.partial(check_key, settings.llm), settings, clock=time
        )
        self.service = ConversationService(
            self.store,
            self.llm,
            settings.chat,
            clock=time,
            model=settings.llm.model,
            models=settings.llm.models,
            keys=self.keys,
            secrets=settings.secrets(),
            access=AccessControl(settings.access, self.store, clock=time),
            donations=settings.keys.accept_donations,
            media=MediaReader(
                self.store,
                self.llm,
                MediaOptions.from_settings(settings),
                clock=time,
                secrets=settings.secrets(),
            ),
        )
        self._count = 0

    async def start(self) -> ChatHarness:
        await self.store.open()
        await self.pool.load(self.settings.llm.keys)
        return self

    async def close(self) -> None:
        await self.llm.aclose()
        await self.store.close()

    def message(
        self,
        text: str,
        *,
        conversation: str = "c1",
        user: str = "u1",
        in_group: bool = False,
        **details: Any,
    ) -> IncomingMessage:
        """A message; ``details`` are further :class:`IncomingMessage` fields (``chat_id`` …)."""
        self._count += 1
        return IncomingMessage(conversation, user, text, f"om_{self._count}", in_group, **details)

    async def ask(
        self,
        text: str,
        *,
        conversation: str = "c1",
        user: str = "u1",
        in_group: bool = False,
        **details: Any,
    ) -> Answer:
        message = self.message(
            text, conversation=conversation, user=user, in_group=in_group, **details
        )
        return await collect(self.service.handle(message))

    def key_state(self, key: str) -> str:
        (view,) = [v for v in self.pool.keys() if v.key_id == key_id_of(key)]  # noqa: SIM118
        return view.state


async def collect(reply: Reply) -> Answer:
    """Read a reply to its end as a transport would, then commit it (it was "delivered")."""
    answer = Answer()
    try:
        async for event in reply:
            answer.events.append(event)
        await reply.commit()
    finally:
        await reply.aclose()
    return answer
