"""Quoted messages: the bot's own answers from the store, others through the real SDK from the
fake Feishu, and what the user is told when one cannot be read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.service import QuoteUnavailable
from bot.feishu.quotes import FeishuQuotes, message_text
from bot.store import SentMessage, SQLiteStore
from tests.fakes.feishu_server import FakeFeishuThread
from tests.feishu_clients import feishu_api, running_fake_feishu


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    with running_fake_feishu("quotes") as running:
        yield running


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def quotes(fake: FakeFeishuThread, store: SQLiteStore) -> AsyncIterator[FeishuQuotes]:
    async with feishu_api(fake) as api:
        yield FeishuQuotes(api, store)


def item(msg_type: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"msg_type": msg_type, "body": {"content": json.dumps(content)}, **extra}


def test_text_of_each_message_kind() -> None:
    mentions = [{"key": "@_user_1", "name": "Alice"}]
    assert message_text(item("text", {"text": "@_user_1 look"}, mentions=mentions)) == (
        "@Alice look"
    )
    post = {
        "title": "Plan",
        "content": [
            [{"tag": "text", "text": "Ship "}, {"tag": "a", "text": "v2", "href": "https://x"}],
            [{"tag": "img", "image_key": "img_1"}],
            [{"tag": "at", "user_name": "Bob"}, {"tag": "text", "text": " reviews"}],
            [{"tag": "code_block", "language": "PYTHON", "text": "print(1)"}],
        ],
    }
    assert message_text(item("post", post)) == "Plan\nShip v2\n@Bob reviews\nprint(1)"
    assert message_text(item("post", {"zh_cn": post})).startswith("Plan\nShip v2")
    card = {"title": "Answer", "elements": [[{"tag": "text", "text": "Forty-two."}]]}
    assert message_text(item("interactive", card)) == "Answer\nForty-two."
    assert message_text(item("image", {"image_key": "img_1"})) == ""
    assert message_text({"msg_type": "text", "body": {"content": "not json"}}) == ""
    assert message_text({}) == ""


async def test_the_bots_own_answer_comes_from_the_store_without_an_api_call(
    fake: FakeFeishuThread, store: SQLiteStore, quotes: FeishuQuotes
) -> None:
    await store.complete_message([], [], None, [SentMessage("om_card", "p2p:u", "Hi there.", 1.0)])
    assert await quotes.quoted_text("om_card") == "Hi there."
    assert fake.fake.calls_to("message_get") == []


async def test_another_users_message_is_fetched(
    fake: FakeFeishuThread, quotes: FeishuQuotes
) -> None:
    message_id = fake.fake.add_message(text="The launch is on Monday.", chat_id="oc_team")
    assert await quotes.quoted_text(message_id) == "The launch is on Monday."
    assert len(fake.fake.calls_to("message_get")) == 1


async def test_a_transient_failure_is_retried(fake: FakeFeishuThread, quotes: FeishuQuotes) -> None:
    message_id = fake.fake.add_message(text="still here", chat_id="oc_team")
    fake.fake.fail("message_get", 1, "internal error", 500, times=2)
    assert await quotes.quoted_text(message_id) == "still here"
    assert len(fake.fake.calls_to("message_get")) == 3


@pytest.mark.parametrize(
    ("fault", "told"),
    [
        ({"error": 230011, "msg": "The message was withdrawn.", "http_status": 400}, "recalled"),
        (
            {
                "error": 99991672,
                "msg": "Access denied. One of the following scopes is required: "
                "[im:message:readonly, im:message]",
                "http_status": 400,
            },
            "permission im:message:readonly",
        ),
        ({"error": 1, "msg": "internal error", "http_status": 500, "times": None}, "did not"),
        ({"error": 99991400, "msg": "rate limited", "http_status": 429, "times": None}, "did not"),
    ],
)
async def test_an_unreadable_quote_says_why(
    fake: FakeFeishuThread, quotes: FeishuQuotes, fault: dict[str, Any], told: str
) -> None:
    message_id = fake.fake.add_message(text="secret plans", chat_id="oc_team")
    fake.fake.fail("message_get", **fault)
    with pytest.raises(QuoteUnavailable) as caught:
        await quotes.quoted_text(message_id)
    assert told in str(caught.value)
    assert "I answer without it" in str(caught.value)


async def test_a_message_that_does_not_exist(quotes: FeishuQuotes) -> None:
    with pytest.raises(QuoteUnavailable, match="recalled or deleted"):
        await quotes.quoted_text("om_never_was")


async def test_a_quote_that_times_out_is_given_up(
    fake: FakeFeishuThread, store: SQLiteStore, quotes: FeishuQuotes
) -> None:
    fs = fake.fake
    message_id = fs.add_message(text="slow", chat_id="oc_team")
    fs.delay("message_get", 2.0, times=None)
    async with feishu_api(fake, timeout_s=0.2, attempts=2) as api:
        with pytest.raises(QuoteUnavailable, match="did not return it"):
            await FeishuQuotes(api, store).quoted_text(message_id)
    assert len(fs.calls_to("message_get")) == 2


@pytest.mark.parametrize("degrade_v2_cards", [False, True])
async def test_a_card_of_the_bot_the_store_does_not_know_is_read_as_card_json(
    store: SQLiteStore, degrade_v2_cards: bool
) -> None:
    with running_fake_feishu("quotes", degrade_v2_cards=degrade_v2_cards) as running:
        app = running.fake
        async with feishu_api(running) as api:
            card = {
                "schema": "2.0",
                "body": {"elements": [{"tag": "markdown", "content": "An **old** answer."}]},
            }
            card_id = await api.create_card(card)
            message_id = app.add_message(
                content=json.dumps({"type": "card", "data": {"card_id": card_id}}),
                msg_type="interactive",
                chat_id="oc_team",
                sender_type="app",
            )
            text = await FeishuQuotes(api, store).quoted_text(message_id)
    assert text == "An **old** answer."
