"""Sharing a key with the real bot through Feishu: the key never leaks anywhere.

Slow suite (`make test-all`): the bot runs as a subprocess between the fakes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e_harness import USER_A, World, make_world

pytestmark = pytest.mark.slow

DONATED = "sk-proj-e2eDonatedKEY0000000000000000000zyxw"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path, access={"admins": [USER_A]})


def test_a_key_shared_in_private_joins_the_pool_and_leaks_nowhere(world: World) -> None:
    bot = world.start_bot()
    message = world.send("p2p_text", text=f"我的key是{DONATED}", sender_open_id=USER_A)
    answer = world.wait_for_final_reply(message, containing="pool")
    assert "sk-proj-…zyxw" in answer
    listing = world.send("p2p_text", text="/keys", sender_open_id=USER_A)
    assert "sk-proj-…zyxw" in world.wait_for_final_reply(listing, containing="Keys in the pool")
    grouped = world.send("group_text_mention", text=f"try {DONATED}", mention_bot=True)
    assert "revoke" in world.wait_for_final_reply(grouped, containing="revoke")
    bot.wait_for_event("reply_sent", count=3)
    assert bot.stop() == 0
    # nowhere: the bot's output, anything sent to Feishu, the LLM, the history
    feishu_texts = [world.fs.message_text(m.message_id) for m in world.fs.sent_messages()]
    feishu_texts += [card.text for card in world.fs.cards.values()]
    llm_texts = [str(request.messages) for request in world.llm.requests]
    with sqlite3.connect(world.workdir / "data" / "bot.db") as connection:
        history = [row[0] for row in connection.execute("SELECT content FROM turns")]
        inbox = [row[0] for row in connection.execute("SELECT payload FROM inbox")]
    for text in [bot.output, *feishu_texts, *llm_texts, *history, *inbox]:
        assert DONATED not in text
    assert history == []
