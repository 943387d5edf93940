"""The tenant token keeper: the SDK never fetches a token on the bot's event loop.

Driven through the fake Feishu (in its own thread) with the real SDK. The SDK caches tenant
tokens per app id for the whole process, so every test uses an app id of its own. Time is
injected: :class:`ManualTime` is the keeper's clock and sleep, and a test lets each sleep
elapse explicitly, so refresh and retry schedules are checked exactly and without waiting.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import structlog
from lark_oapi.api.im.v1 import CreateMessageRequest, CreateMessageRequestBody

from bot.errors import FeishuConnectError
from bot.feishu import sdk_compat
from bot.feishu.token_keeper import TenantTokenKeeper
from tests.fakes.feishu_server import DEFAULT_APP_SECRET, FakeFeishu, FakeFeishuThread

TOKEN_TTL = 7200  # what the fake (like Feishu) answers as ``expire``
SDK_VALIDITY = TOKEN_TTL - 600  # the SDK treats a token as expired 10 minutes early
MARGIN = 1200  # the keeper's default refresh margin


class ManualTime:
    """The keeper's clock and sleep: time moves only when a test lets a sleep elapse."""

    def __init__(self) -> None:
        # Whole seconds on the real epoch: the SDK's cache compares expiries with time.time().
        self.now = float(int(time.time()))
        self._sleeps: asyncio.Queue[tuple[float, float, asyncio.Future[None]]] = asyncio.Queue()
        self._pending: tuple[float, float, asyncio.Future[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._sleeps.put((self.now + seconds, seconds, woken))
        await woken

    async def next_sleep(self, timeout: float = 10) -> float:
        """Wait until the keeper goes to sleep; return for how long it wants to."""
        self._pending = await asyncio.wait_for(self._sleeps.get(), timeout)
        return self._pending[1]

    def elapse(self) -> None:
        """Let the pending sleep run its full length (the clock moves to its end)."""
        assert self._pending is not None, "the keeper is not sleeping"
        (until, _, woken), self._pending = self._pending, None
        self.now = max(self.now, until)
        woken.set_result(None)


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    """A fake Feishu in its own thread, with an app id no other test uses."""
    app = FakeFeishu(app_id=f"cli_keeper_{uuid.uuid4().hex[:12]}", token_ttl=TOKEN_TTL)
    with app.run_in_thread() as running:
        yield running


def new_keeper(
    fake: FakeFeishuThread, manual: ManualTime | None = None, *, app_secret: str | None = None
) -> TenantTokenKeeper:
    fs = fake.fake
    if manual is None:
        return TenantTokenKeeper(fs.app_id, app_secret or fs.app_secret, fake.domain)
    return TenantTokenKeeper(
        fs.app_id,
        app_secret or fs.app_secret,
        fake.domain,
        clock=manual.clock,
        sleep=manual.sleep,
    )


@asynccontextmanager
async def running_keeper(
    fake: FakeFeishuThread, manual: ManualTime | None = None
) -> AsyncIterator[TenantTokenKeeper]:
    keeper = new_keeper(fake, manual)
    async with keeper:
        yield keeper


def cached_token(fake: FakeFeishuThread) -> str | None:
    return sdk_compat.cached_tenant_token(fake.fake.app_id)


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


def text_message(chat_id: str, text: str) -> CreateMessageRequest:
    body = (
        CreateMessageRequestBody.builder()
        .receive_id(chat_id)
        .msg_type("text")
        .content(json.dumps({"text": text}))
        .build()
    )
    return CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()


# --------------------------------------------------------------------------------------------
# The regression: a token fetch stalled every answer on the loop
# --------------------------------------------------------------------------------------------


async def test_a_slow_token_endpoint_never_stalls_rest_calls_on_the_event_loop(
    fake: FakeFeishuThread,
) -> None:
    fs = fake.fake
    async with running_keeper(fake) as keeper:
        first = cached_token(fake)
        assert first is not None

        # Every token request now hangs until released: a fetch on this loop would freeze it.
        gate = fs.hold("tenant_token", times=None)
        # If something did block the loop, free it after a while so the test fails, not hangs.
        watchdog = threading.Timer(5, gate.release)
        watchdog.start()
        try:
            refresh = asyncio.create_task(keeper.refresh_now())
            await gate.wait_arrived()

            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            ticking = asyncio.create_task(ticker())
            client = sdk_compat.build_client(
                app_id=fs.app_id, app_secret=fs.app_secret, domain=fake.domain, timeout_s=10
            )
            ticks_before = ticks
            sent = await asyncio.wait_for(
                client.im.v1.message.acreate(text_message("oc_chat", "still answering")), 30
            )
            ticks_during_call = ticks - ticks_before
            held_throughout = not gate.released
            ticking.cancel()

            assert sent.code == 0
            assert held_throughout, "the REST call waited for the token endpoint"
            assert ticks_during_call > 0, "the loop did not run while the REST call did"
            assert fs.calls_to("message_create")[-1].token == first
            # Only the keeper asked for tokens: at start, and the refresh still held.
            assert len(fs.calls_to("tenant_token")) == 2
            assert not refresh.done()
        finally:
            gate.release()
            watchdog.cancel()

        await asyncio.wait_for(refresh, 10)
        second = cached_token(fake)
        assert second is not None
        assert second != first
        assert second in fs.tokens


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


async def test_start_puts_a_token_in_the_sdk_cache_valid_as_long_as_the_sdk_would_keep_it(
    fake: FakeFeishuThread,
) -> None:
    manual = ManualTime()
    async with running_keeper(fake, manual):
        token = cached_token(fake)
        assert token in fake.fake.tokens
        assert sdk_compat.cached_tenant_token_expiry(fake.fake.app_id) == manual.now + SDK_VALIDITY
        assert len(fake.fake.calls_to("tenant_token")) == 1


async def test_token_is_refreshed_the_margin_before_the_sdk_would_consider_it_expired(
    fake: FakeFeishuThread,
) -> None:
    manual = ManualTime()
    started = manual.now
    async with running_keeper(fake, manual):
        first = cached_token(fake)
        sdk_expiry = sdk_compat.cached_tenant_token_expiry(fake.fake.app_id)
        assert sdk_expiry == started + SDK_VALIDITY

        assert await manual.next_sleep() == SDK_VALIDITY - MARGIN
        manual.elapse()
        # The keeper sleeps again only once the refreshed token is stored.
        assert await manual.next_sleep() == SDK_VALIDITY - MARGIN

        refreshed_at = started + SDK_VALIDITY - MARGIN
        assert manual.now == refreshed_at < sdk_expiry
        second = cached_token(fake)
        assert second is not None
        assert second != first
        assert second in fake.fake.tokens
        expiry = sdk_compat.cached_tenant_token_expiry(fake.fake.app_id)
        assert expiry == refreshed_at + SDK_VALIDITY
        assert len(fake.fake.calls_to("tenant_token")) == 2


async def test_refresh_now_moves_the_next_background_refresh(fake: FakeFeishuThread) -> None:
    manual = ManualTime()
    async with running_keeper(fake, manual) as keeper:
        assert await manual.next_sleep() == SDK_VALIDITY - MARGIN
        manual.now += 1000  # while the keeper sleeps …
        await keeper.refresh_now()  # … the token is refreshed on demand
        manual.elapse()
        # Woken when the old token was due, the keeper sleeps on until the new one is.
        assert await manual.next_sleep() == 1000
        assert len(fake.fake.calls_to("tenant_token")) == 2


async def test_refreshes_asked_for_while_one_is_under_way_share_its_request(
    fake: FakeFeishuThread,
) -> None:
    fs = fake.fake
    async with running_keeper(fake, ManualTime()) as keeper:
        gate = fs.hold("tenant_token")
        try:
            first = asyncio.create_task(keeper.refresh_now())
            await gate.wait_arrived()
            second = asyncio.create_task(keeper.refresh_now())
        finally:
            gate.release()
        await asyncio.wait_for(asyncio.gather(first, second), 10)

        assert len(fs.calls_to("tenant_token")) == 2  # at start, and one for both refreshes
        assert cached_token(fake) == fs.calls_to("tenant_token")[-1].response["tenant_access_token"]


async def test_a_short_lived_token_is_refreshed_halfway_not_at_once(
    fake: FakeFeishuThread,
) -> None:
    # Feishu returns the token it already issued, with the time it has left, while that is 30
    # minutes or more: the keeper must not hammer it when the margin exceeds what is left.
    fake.fake.token_ttl = 1800
    manual = ManualTime()
    async with running_keeper(fake, manual):
        assert await manual.next_sleep() == (1800 - 600) / 2


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


async def test_a_failed_refresh_is_retried_with_backoff_while_the_old_token_stays(
    fake: FakeFeishuThread,
) -> None:
    fs = fake.fake
    manual = ManualTime()
    async with running_keeper(fake, manual):
        first = cached_token(fake)
        expiry = sdk_compat.cached_tenant_token_expiry(fs.app_id)
        assert expiry is not None
        fs.fail("tenant_token", code=1, msg="internal error", http_status=503, times=6)

        await manual.next_sleep()
        with structlog.testing.capture_logs() as logs:
            manual.elapse()
            retries = []
            for _ in range(6):
                retries.append(await manual.next_sleep())
                assert cached_token(fake) == first
                assert sdk_compat.cached_tenant_token_expiry(fs.app_id) == expiry
                assert manual.now < expiry
                manual.elapse()
            await manual.next_sleep()  # the seventh attempt succeeded

        assert retries == [5, 10, 20, 40, 60, 60]
        assert cached_token(fake) not in (None, first)
        failed = [entry for entry in logs if entry["event"] == "tenant_token_refresh_failed"]
        assert [entry["retry_in_s"] for entry in failed] == retries
        assert failed[0]["log_level"] == "warning"
        assert "code 1, HTTP 503" in failed[0]["error"]
        assert failed[0]["cached_token_valid_for_s"] == MARGIN  # failed at the margin
        refreshed = [entry for entry in logs if entry["event"] == "tenant_token_refreshed"]
        assert len(refreshed) == 1
        assert refreshed[0]["expires_in_s"] == TOKEN_TTL
        rendered = repr(logs)
        assert fs.app_secret not in rendered
        assert all(token not in rendered for token in fs.tokens)


async def test_wrong_credentials_fail_start_with_the_feishu_code_and_how_to_fix_them(
    fake: FakeFeishuThread,
) -> None:
    keeper = new_keeper(fake, app_secret="not-" + DEFAULT_APP_SECRET)
    with pytest.raises(FeishuConnectError) as raised:
        await keeper.start()

    message = str(raised.value)
    assert message.startswith("Feishu rejected app_id/app_secret: ")
    assert "(code 10014)" in message
    assert "developer console → your app → Credentials & Basic Info" in message
    assert DEFAULT_APP_SECRET not in message
    assert cached_token(fake) is None
    assert not other_tasks()
    await keeper.aclose()


async def test_an_unreachable_feishu_fails_start_naming_the_domain() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        domain = f"http://127.0.0.1:{probe.getsockname()[1]}"
    keeper = TenantTokenKeeper(f"cli_keeper_{uuid.uuid4().hex[:12]}", "secret", domain)
    with pytest.raises(FeishuConnectError, match=f"^cannot reach Feishu at {domain}: "):
        await keeper.start()
    assert not other_tasks()


# --------------------------------------------------------------------------------------------
# Shutdown
# --------------------------------------------------------------------------------------------


async def test_aclose_leaves_no_task_running(fake: FakeFeishuThread) -> None:
    manual = ManualTime()
    keeper = new_keeper(fake, manual)
    await keeper.start()
    await manual.next_sleep()
    assert other_tasks()

    await keeper.aclose()
    await keeper.aclose()  # idempotent

    assert not other_tasks()


async def test_aclose_during_a_refresh_abandons_it_without_touching_the_cache(
    fake: FakeFeishuThread,
) -> None:
    fs = fake.fake
    manual = ManualTime()
    keeper = new_keeper(fake, manual)
    await keeper.start()
    first = cached_token(fake)
    gate = fs.hold("tenant_token")
    try:
        await manual.next_sleep()
        manual.elapse()
        await gate.wait_arrived()

        await keeper.aclose()
        assert not other_tasks()
    finally:
        gate.release()

    await fs.wait_for_calls("tenant_token", 2)  # the abandoned fetch got its answer …
    assert cached_token(fake) == first  # … which nobody stored


# --------------------------------------------------------------------------------------------
# sdk_compat
# --------------------------------------------------------------------------------------------


def test_a_stored_token_is_the_one_the_sdk_uses_until_its_expiry() -> None:
    app_id = f"cli_compat_{uuid.uuid4().hex[:12]}"
    expires_at = time.time() + 3600
    sdk_compat.store_tenant_token(app_id, "t-stored", expires_at)

    from lark_oapi.core.model import Config
    from lark_oapi.core.token.manager import TokenManager

    config = Config()
    config.app_id, config.app_secret = app_id, "secret"
    assert TokenManager.get_self_tenant_token(config) == "t-stored"  # no request: no domain set
    assert sdk_compat.cached_tenant_token(app_id) == "t-stored"
    assert sdk_compat.cached_tenant_token_expiry(app_id) == int(expires_at)


def test_an_expired_stored_token_is_not_used() -> None:
    app_id = f"cli_compat_{uuid.uuid4().hex[:12]}"
    sdk_compat.store_tenant_token(app_id, "t-old", time.time() - 1)
    assert sdk_compat.cached_tenant_token(app_id) is None


def test_the_installed_sdk_is_the_tested_one() -> None:
    with structlog.testing.capture_logs() as logs:
        assert sdk_compat.check_sdk_version()
    assert logs == []


@pytest.mark.parametrize("installed", ["1.8.0", "1.7.4", "2.0.0", "1.8.0rc1"])
def test_an_untested_sdk_version_is_named_in_a_warning(
    installed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return installed if name == "lark-oapi" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with structlog.testing.capture_logs() as logs:
        assert not sdk_compat.check_sdk_version()

    (warning,) = logs
    assert warning["event"] == "lark_oapi_version_untested"
    assert warning["log_level"] == "warning"
    assert warning["installed"] == installed
    assert warning["supported"] == sdk_compat.SUPPORTED == ">=1.7.5,<1.8"


@pytest.mark.parametrize("installed", ["1.7.5", "1.7.6", "1.7.12.post1"])
def test_a_version_in_the_tested_range_passes_quietly(
    installed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    with structlog.testing.capture_logs() as logs:
        assert sdk_compat.check_sdk_version()
    assert logs == []


def test_the_ws_client_is_given_a_fresh_loop_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    import lark_oapi.ws.client as ws_client_module

    imported_with = ws_client_module.loop
    monkeypatch.setattr(ws_client_module, "loop", imported_with)  # put back afterwards
    loop = sdk_compat.give_ws_client_its_own_loop()
    try:
        assert ws_client_module.loop is loop
        assert loop is not imported_with
        assert not loop.is_running()
        assert not loop.is_closed()
    finally:
        loop.close()


def test_a_stopping_ws_client_does_not_reconnect() -> None:
    import lark_oapi as lark

    sdk_logger = logging.getLogger("Lark")
    level = sdk_logger.level
    try:
        ws_client = lark.ws.Client("cli_compat_app", "secret", auto_reconnect=True)
    finally:
        sdk_logger.setLevel(level)  # the SDK's constructor sets the process-wide level
    sdk_compat.disable_auto_reconnect(ws_client)
    assert ws_client._auto_reconnect is False
    sdk_compat.disable_auto_reconnect(None)  # a channel that never connected has none
    # The client's cache scheduled its clean-up task on a loop nobody runs here: end it, or its
    # coroutine warns "never awaited" whenever the collector finds it, in some later test.
    cleanup = ws_client._cache._cron
    cleanup.cancel()
    cleanup.get_loop().run_until_complete(asyncio.gather(cleanup, return_exceptions=True))
