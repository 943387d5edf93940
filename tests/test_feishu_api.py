"""The answer path's Feishu REST calls: which failures are retried, which are final, and how.

Real SDK client, fake Feishu over sockets; retry waits are recorded, not slept.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from bot.feishu import sdk_compat
from bot.feishu.api import FeishuApi, FeishuApiError, read_answer
from bot.feishu.token_keeper import TenantTokenKeeper
from bot.feishu.transport import AiohttpTransport
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread
from tests.feishu_clients import transport_for

CARD = {"schema": "2.0", "body": {"elements": [{"tag": "markdown", "content": "hi"}]}}


class Waits:
    """The injected sleep: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    app = FakeFeishu(app_id=f"cli_api_{uuid.uuid4().hex[:12]}")
    with app.run_in_thread() as running:
        yield running


@pytest.fixture
async def keeper(fake: FakeFeishuThread) -> AsyncIterator[TenantTokenKeeper]:
    fs = fake.fake
    async with TenantTokenKeeper(fs.app_id, fs.app_secret, fake.domain) as running:
        yield running


ApiFactory = Callable[..., FeishuApi]


@pytest.fixture
async def api_for(keeper: TenantTokenKeeper) -> AsyncIterator[ApiFactory]:
    """Builds the API as the gateway does: the aiohttp transport with the SDK's cached token."""
    made: list[FeishuApi] = []

    def build(
        fake: FakeFeishuThread,
        waits: Waits,
        *,
        domain: str | None = None,
        timeout_s: float = 5,
        on_token_invalid: Callable[[], Awaitable[None]] | None = None,
    ) -> FeishuApi:
        transport = transport_for(fake, keeper, domain=domain, timeout_s=timeout_s)
        api = FeishuApi(transport, sleep=waits, on_token_invalid=on_token_invalid)
        made.append(api)
        return api

    yield build
    for api in made:
        await api.aclose()


@pytest.mark.usefixtures("keeper")
@pytest.mark.parametrize(
    ("status", "code"),
    [(500, 1), (502, 1), (503, 1), (504, 1)],
)
async def test_server_errors_are_retried_with_backoff(
    api_for: ApiFactory, fake: FakeFeishuThread, status: int, code: int
) -> None:
    waits = Waits()
    fake.fake.fail("card_create", code, "server trouble", http_status=status, times=2)
    card_id = await api_for(fake, waits).create_card(CARD)
    assert card_id
    assert len(fake.fake.calls_to("card_create")) == 3
    assert len(waits.seconds) == 2
    assert all(0 <= wait <= 8 for wait in waits.seconds)


@pytest.mark.usefixtures("keeper")
async def test_a_rate_limit_waits_for_feishus_reset_hint(
    api_for: ApiFactory, fake: FakeFeishuThread
) -> None:
    waits = Waits()
    fake.fake.fail("card_create", "rate_limited", times=1, headers={"x-ogw-ratelimit-reset": "3"})
    assert await api_for(fake, waits).create_card(CARD)
    assert waits.seconds == [3.0]


@pytest.mark.usefixtures("keeper")
async def test_a_rate_limit_with_code_99991400_on_http_200_is_still_a_rate_limit(
    api_for: ApiFactory,
    fake: FakeFeishuThread,
) -> None:
    waits = Waits()
    fake.fake.fail("card_create", 99991400, "request trigger frequency limit", 200, times=1)
    assert await api_for(fake, waits).create_card(CARD)
    assert len(waits.seconds) == 1


@pytest.mark.usefixtures("keeper")
async def test_a_missing_scope_is_final_and_named(
    api_for: ApiFactory, fake: FakeFeishuThread
) -> None:
    waits = Waits()
    fake.fake.fail("card_create", "no_permission_cardkit", times=None)
    with pytest.raises(FeishuApiError) as raised:
        await api_for(fake, waits).create_card(CARD)
    assert raised.value.missing_scope == "cardkit:card:write"
    assert raised.value.retryable is False
    assert len(fake.fake.calls_to("card_create")) == 1
    assert waits.seconds == []


@pytest.mark.usefixtures("keeper")
@pytest.mark.parametrize("error", ["message_recalled", "patch_window_expired", "card_too_large"])
async def test_final_feishu_errors_are_not_retried(
    api_for: ApiFactory, fake: FakeFeishuThread, error: str
) -> None:
    waits = Waits()
    fake.fake.fail("card_create", error, times=None)
    with pytest.raises(FeishuApiError) as raised:
        await api_for(fake, waits).create_card(CARD)
    assert raised.value.retryable is False
    assert len(fake.fake.calls_to("card_create")) == 1


@pytest.mark.usefixtures("keeper")
async def test_a_timeout_is_retried(api_for: ApiFactory, fake: FakeFeishuThread) -> None:
    waits = Waits()
    fake.fake.delay("card_create", 2.0, times=1)
    assert await api_for(fake, waits, timeout_s=0.5).create_card(CARD)
    assert len(waits.seconds) == 1


@pytest.mark.usefixtures("keeper")
async def test_a_refused_connection_is_retried_then_reported(
    api_for: ApiFactory, fake: FakeFeishuThread
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once the socket is closed
    waits = Waits()
    api = api_for(fake, waits, domain=f"http://127.0.0.1:{port}")
    with pytest.raises(FeishuApiError) as raised:
        await api.create_card(CARD)
    assert raised.value.retryable is True
    assert raised.value.code == -1
    assert len(waits.seconds) == 3  # four attempts


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (502, b"<html>Bad Gateway</html>", True),
        (200, b"not json", False),
        (400, b"<html>Bad Request</html>", False),
        (429, b"", True),
        (500, b'{"code": 1, "msg": "internal"}', True),
        (400, b'{"code": 99991663, "msg": "token invalid"}', True),
        (400, b'{"code": 230011, "msg": "withdrawn"}', False),
    ],
)
def test_answers_are_classified_by_status_and_code(
    status: int, body: bytes, retryable: bool
) -> None:
    with pytest.raises(FeishuApiError) as raised:
        read_answer("card_create", status, {}, body)
    assert raised.value.retryable is retryable


def test_a_successful_answer_gives_its_data() -> None:
    assert read_answer("x", 200, {}, b'{"code": 0, "data": {"card_id": "c1"}}') == {"card_id": "c1"}


async def test_an_invalid_tenant_token_is_refreshed_and_the_call_retried(
    api_for: ApiFactory, fake: FakeFeishuThread, keeper: TenantTokenKeeper
) -> None:
    refreshed: list[bool] = []

    async def refresh() -> None:
        refreshed.append(True)
        await keeper.refresh_now()

    fs = fake.fake
    api = api_for(fake, Waits(), on_token_invalid=refresh)
    fs.revoke_tokens()
    assert await api.create_card(CARD)
    assert refreshed == [True]


@pytest.mark.usefixtures("keeper")
async def test_a_repeated_reply_uuid_returns_the_first_message(
    api_for: ApiFactory, fake: FakeFeishuThread
) -> None:
    frame = fake.deliver("p2p_text", text="hello")
    message_id = fake.fake.delivery(frame).message_id or ""
    api = api_for(fake, Waits())
    first = await api.reply(message_id, "text", {"text": "once"}, in_thread=False, uuid="u-1")
    again = await api.reply(message_id, "text", {"text": "once"}, in_thread=False, uuid="u-1")
    assert first == again
    assert fake.fake.reply_texts(message_id) == ["once"]


@pytest.mark.usefixtures("keeper")
async def test_the_aiohttp_transport_keeps_connections_alive_for_every_call_in_flight(
    fake: FakeFeishuThread,
) -> None:
    fs = fake.fake

    async def no_refresh() -> None:
        """The keeper fixture has put a token in the SDK's cache."""

    transport = AiohttpTransport(
        fake.domain,
        token=lambda: sdk_compat.cached_tenant_token(fs.app_id),
        refresh=no_refresh,
        timeout_s=5,
    )
    api = FeishuApi(transport, sleep=Waits())
    try:
        for _ in range(3):  # three waves of 30 calls at once
            await asyncio.gather(*(api.create_card(CARD) for _ in range(30)))
    finally:
        await api.aclose()
    calls = fs.calls_to("card_create")
    assert len(calls) == 90
    assert len({call.peer for call in calls}) <= 30  # later waves reuse the first one's


async def test_without_a_token_the_transport_fetches_one_first(fake: FakeFeishuThread) -> None:
    tokens: list[str] = []

    async def refresh() -> None:
        async with TenantTokenKeeper(fake.fake.app_id, fake.fake.app_secret, fake.domain) as k:
            tokens.append(str(sdk_compat.cached_tenant_token(fake.fake.app_id)))
            assert k

    transport = AiohttpTransport(
        fake.domain,
        token=lambda: tokens[-1] if tokens else None,
        refresh=refresh,
        timeout_s=5,
    )
    api = FeishuApi(transport, sleep=Waits())
    try:
        assert await api.create_card(CARD)
    finally:
        await api.aclose()
    assert len(tokens) == 1
