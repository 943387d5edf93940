"""The fake Feishu and a :class:`FeishuApi` on it as the bot builds it, for in-process tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from bot.feishu import sdk_compat
from bot.feishu.api import FeishuApi
from bot.feishu.token_keeper import TenantTokenKeeper
from bot.feishu.transport import AiohttpTransport
from bot.timing import Sleep
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread


async def no_wait(seconds: float) -> None:
    """Retry waits are recorded by nobody and not slept."""


@contextlib.contextmanager
def running_fake_feishu(name: str, **options: Any) -> Iterator[FakeFeishuThread]:
    """A fake Feishu in a thread, with an app id of its own (``cli_<name>_…``)."""
    app = FakeFeishu(app_id=f"cli_{name}_{uuid.uuid4().hex[:12]}", **options)
    with app.run_in_thread() as running:
        yield running


def transport_for(
    fake: FakeFeishuThread,
    keeper: TenantTokenKeeper,
    *,
    domain: str | None = None,
    timeout_s: float = 5,
) -> AiohttpTransport:
    """The gateway's transport on ``fake``: the tenant token ``keeper`` keeps in the SDK's cache."""
    app_id = fake.fake.app_id
    return AiohttpTransport(
        domain or fake.domain,
        token=lambda: sdk_compat.cached_tenant_token(app_id),
        refresh=keeper.refresh_now,
        timeout_s=timeout_s,
    )


@contextlib.asynccontextmanager
async def feishu_api(
    fake: FakeFeishuThread,
    *,
    timeout_s: float = 5,
    attempts: int = 4,
    sleep: Sleep = no_wait,
) -> AsyncIterator[FeishuApi]:
    """The answer path's API on ``fake``, as the gateway builds it (closed afterwards)."""
    fs = fake.fake
    async with TenantTokenKeeper(fs.app_id, fs.app_secret, fake.domain) as keeper:
        api = FeishuApi(
            transport_for(fake, keeper, timeout_s=timeout_s),
            attempts=attempts,
            sleep=sleep,
            on_token_invalid=keeper.refresh_now,
        )
        try:
            yield api
        finally:
            await api.aclose()
