"""Welcomes: once per user and per group, never for someone not allowed, a failure only logged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from bot.chat.access import AccessControl
from bot.config import AccessSettings
from bot.feishu.api import FeishuApi
from bot.feishu.welcome import Welcomer, welcome_text
from bot.store import SQLiteStore
from tests.fakes.feishu_server import FakeFeishuThread
from tests.feishu_clients import feishu_api, running_fake_feishu


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    with running_fake_feishu("welcome") as running:
        yield running


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def api(fake: FakeFeishuThread) -> AsyncIterator[FeishuApi]:
    async with feishu_api(fake) as api:
        yield api


def welcomer(api: FeishuApi, store: SQLiteStore, *, allow: list[str] | None = None) -> Welcomer:
    access = AccessControl(AccessSettings(allow=allow or []), store)
    return Welcomer(api, store, access, donations=True)


async def test_a_user_is_welcomed_once_however_often_they_open_the_chat(
    fake: FakeFeishuThread, api: FeishuApi, store: SQLiteStore
) -> None:
    greeter = welcomer(api, store)
    for _ in range(3):
        await greeter.user_entered("oc_p2p_alice", "ou_alice")
    (sent,) = fake.fake.sent_messages("oc_p2p_alice")
    text = fake.fake.message_text(sent.message_id)
    assert text == welcome_text(in_group=False, donations=True)
    assert "/help" in text
    assert "API key" in text
    await greeter.user_entered("oc_p2p_bob", "ou_bob")
    assert len(fake.fake.sent_messages("oc_p2p_bob")) == 1


async def test_the_welcome_mark_is_shared_through_the_store(
    fake: FakeFeishuThread, api: FeishuApi, store: SQLiteStore
) -> None:
    await welcomer(api, store).user_entered("oc_p2p_alice", "ou_alice")
    await welcomer(api, store).user_entered("oc_p2p_alice", "ou_alice")  # another instance
    assert len(fake.fake.sent_messages("oc_p2p_alice")) == 1


async def test_a_group_is_welcomed_once(
    fake: FakeFeishuThread, api: FeishuApi, store: SQLiteStore
) -> None:
    greeter = welcomer(api, store)
    await greeter.bot_added("oc_team", "ou_alice")
    await greeter.bot_added("oc_team", "ou_bob")  # removed and added again
    (sent,) = fake.fake.sent_messages("oc_team")
    assert "@mention me" in fake.fake.message_text(sent.message_id)


async def test_someone_not_allowed_is_not_welcomed(
    fake: FakeFeishuThread, api: FeishuApi, store: SQLiteStore
) -> None:
    greeter = welcomer(api, store, allow=["ou_alice", "oc_team"])
    await greeter.user_entered("oc_p2p_mallory", "ou_mallory")
    await greeter.bot_added("oc_other", "ou_mallory")
    assert fake.fake.calls_to("message_create") == []
    await greeter.bot_added("oc_team", "ou_mallory")  # a listed chat is welcome
    await greeter.user_entered("oc_p2p_alice", "ou_alice")
    assert len(fake.fake.calls_to("message_create")) == 2


async def test_donations_off_leaves_the_key_line_out() -> None:
    assert "API key" not in welcome_text(in_group=False, donations=False)


@pytest.mark.parametrize(
    "fault",
    [
        {"error": 1, "msg": "internal error", "http_status": 500, "times": None},
        {"error": 99991400, "msg": "rate limited", "http_status": 429, "times": None},
        {
            "error": 99991672,
            "msg": "Access denied. One of the following scopes is required: [im:message]",
            "http_status": 400,
        },
        {"error": 230002, "msg": "Bot/User can NOT be out of the chat.", "http_status": 400},
    ],
)
async def test_a_welcome_feishu_refuses_is_logged_and_not_repeated(
    fake: FakeFeishuThread,
    api: FeishuApi,
    store: SQLiteStore,
    fault: dict[str, object],
) -> None:
    fake.fake.fail("message_create", **fault)  # type: ignore[arg-type]
    greeter = welcomer(api, store)
    with structlog.testing.capture_logs() as logs:
        await greeter.user_entered("oc_p2p_alice", "ou_alice")
    assert [log["event"] for log in logs][-1] == "welcome_not_sent"
    calls = len(fake.fake.calls_to("message_create"))
    fake.fake.clear_faults()
    await greeter.user_entered("oc_p2p_alice", "ou_alice")
    assert len(fake.fake.calls_to("message_create")) == calls
    assert fake.fake.sent_messages("oc_p2p_alice") == []
