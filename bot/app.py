"""Assembly: builds the store, key pool, LLM client and conversation service from settings.

Shared by every front end (the terminal chat, the Feishu gateway), so they run the same core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bot.chat.service import ConversationService
from bot.config import Settings
from bot.llm.client import LLMClient
from bot.llm.keypool import KeyPool
from bot.logging import Redactor
from bot.store import Store, create_store


@dataclass
class Core:
    """The transport-agnostic parts of a running bot."""

    store: Store
    pool: KeyPool
    llm: LLMClient
    service: ConversationService

    async def close(self) -> None:
        """Release the HTTP pool and the store."""
        try:
            await self.llm.aclose()
        finally:
            await self.store.close()


async def build_core(settings: Settings, redactor: Redactor, *, cwd: Path | None = None) -> Core:
    """Open the store, load the keys and wire the conversation service."""
    store = create_store(settings.store, cwd=cwd)
    await store.open()
    try:
        pool = KeyPool(store, max_wait_s=settings.llm.max_wait_s)
        await pool.load(settings.llm.keys)
        for stored in await store.load_keys():
            redactor.add(stored.secret)
        llm = LLMClient(settings.llm, pool)
    except BaseException:
        await store.close()
        raise
    service = ConversationService(store, llm, settings.chat, model=settings.llm.model)
    return Core(store=store, pool=pool, llm=llm, service=service)
