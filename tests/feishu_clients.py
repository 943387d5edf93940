"""The fake Feishu and a :class:`FeishuApi` on it through the real SDK, for in-process tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from bot.feishu import sdk_compat
from bot.feishu.api import FeishuApi
from bot.feishu.token_keeper import TenantTokenKeeper
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread


async def no_wait(seconds: float) -> None:
    """Retry waits are recorded by nobody and not slept."""


@contextlib.contextmanager
def running_fake_feishu(name: str, **options: Any) -> Iterator[FakeFeishuThread]:
    """A fake Feishu in a thread, with an app id of its own (``cli_<name>_…``)."""
    app = FakeFeishu(app_id=f"cli_{name}_{uuid.uuid4().hex[:12]}", **options)
    with app.run_in_thread() as running:
        yield running


@contextlib.asynccontextmanager
async def feishu_api(
    fake: FakeFeishuThread, *, timeout_s: float = 5, attempts: int = 4
) -> AsyncIterator[FeishuApi]:
    """The answer path's API on ``fake``, with a tenant token in the SDK's cache."""
    fs = fake.fake
    async with TenantTokenKeeper(fs.app_id, fs.app_secret, fake.domain):
        client = sdk_compat.build_client(
            app_id=fs.app_id, app_secret=fs.app_secret, domain=fake.domain, timeout_s=timeout_s
        )
        yield FeishuApi(client, attempts=attempts, sleep=no_wait)
