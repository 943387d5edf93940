"""Assembly: builds the store, key pool, LLM client and conversation service from settings.

Shared by every front end (the terminal chat, the Feishu gateway), so they run the same core.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot.chat.access import AccessControl
from bot.chat.key_commands import KeyCommands
from bot.chat.media import MediaOptions, MediaReader
from bot.chat.service import ConversationService
from bot.config import Settings
from bot.llm.client import LLMClient
from bot.llm.keypool import KeyPool
from bot.llm.validation import KeyCheck, check_key
from bot.logging import Redactor
from bot.ops.metrics import Metrics
from bot.store import Store, create_store, secret_key_from_env


@dataclass
class Core:
    """The transport-agnostic parts of a running bot."""

    store: Store
    pool: KeyPool
    llm: LLMClient
    service: ConversationService
    check_key: Callable[[str], Awaitable[KeyCheck]]
    metrics: Metrics = field(default_factory=Metrics)

    async def close(self) -> None:
        """Release the HTTP pool and the store."""
        try:
            await self.llm.aclose()
        finally:
            await self.store.close()


async def build_core(
    settings: Settings,
    redactor: Redactor,
    *,
    cwd: Path | None = None,
    metrics: Metrics | None = None,
) -> Core:
    """Open the store, load the keys and wire the conversation service (counting into
    ``metrics``, else into a private set nobody reads)."""
    metrics = metrics or Metrics()
    secret_key = secret_key_from_env()  # BOT_SECRET_KEY: encrypts the stored API keys
    if secret_key is not None:
        redactor.add(secret_key)
    store = create_store(settings.store, cwd=cwd, secret_key=secret_key)
    await store.open()
    try:
        pool = KeyPool(
            store,
            max_wait_s=settings.llm.max_wait_s,
            owner_first=settings.keys.owner_first,
            reserved_for=settings.keys.reserved_for,
        )
        pool.on_secret = redactor.add  # every key the pool holds is masked in the logs
        await pool.load(settings.llm.keys)
        llm = LLMClient(settings.llm, pool, on_call=metrics.llm_call)
    except BaseException:
        await store.close()
        raise
    check = functools.partial(check_key, settings.llm)
    keys = KeyCommands(pool, check, settings)
    service = ConversationService(
        store,
        llm,
        settings.chat,
        model=settings.llm.model,
        models=settings.llm.models,
        keys=keys,
        secrets=settings.secrets(),
        access=AccessControl(settings.access, store),
        donations=settings.keys.accept_donations,
        media=MediaReader(
            store, llm, MediaOptions.from_settings(settings), secrets=settings.secrets()
        ),
    )
    return Core(store=store, pool=pool, llm=llm, service=service, check_key=check, metrics=metrics)
