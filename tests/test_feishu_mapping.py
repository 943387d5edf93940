"""Mapping Feishu messages for the service, and the store-backed dedup the channel uses."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from lark_oapi.channel import Conversation, Identity, InboundMessage, Mention

from bot.feishu.dedup import StoreDedup
from bot.feishu.messages import FeishuMessage, conversation_key, from_inbound, strip_bot_mention
from bot.store import SQLiteStore

BOT = "ou_bot"


def inbound(
    text: str,
    *,
    chat_type: str = "p2p",
    message_type: str = "text",
    root_id: str = "",
    mentions: list[Mention] | None = None,
) -> InboundMessage:
    return InboundMessage(
        id="om_1",
        create_time=1_764_000_000_000,
        conversation=Conversation(chat_id="oc_1", chat_type=chat_type),  # type: ignore[arg-type]
        sender=Identity(open_id="ou_alice"),
        mentions=mentions or [],
        raw={"root_id": root_id, "message_type": message_type},
        content_text=text,
        raw_content_type=message_type,
    )


def test_p2p_is_one_conversation_per_user_and_groups_one_per_thread() -> None:
    assert conversation_key("p2p", "oc_1", "ou_a", "", "om_1") == "p2p:ou_a"
    assert conversation_key("group", "oc_1", "ou_a", "", "om_1") == "group:oc_1:om_1"
    assert conversation_key("group", "oc_1", "ou_b", "om_1", "om_2") == "group:oc_1:om_1"


def test_the_bots_mention_is_stripped_in_every_rendered_form() -> None:
    bot = Mention(key="@_user_1", open_id=BOT, name="GPT Bot")
    other = Mention(key="@_user_2", open_id="ou_carol", name="Carol")
    assert strip_bot_mention("@GPT Bot summarise", [bot], BOT) == "summarise"
    assert strip_bot_mention("@_user_1 summarise", [bot], BOT) == "summarise"
    assert strip_bot_mention("ask @Carol and @GPT Bot", [bot, other], BOT) == "ask @Carol and"
    assert strip_bot_mention("code:\n    indented", [bot], BOT) == "code:\n    indented"


def test_a_group_message_maps_to_its_thread_with_the_mention_stripped() -> None:
    message = from_inbound(
        inbound(
            "@GPT Bot and shorter?",
            chat_type="group",
            root_id="om_root",
            mentions=[Mention(key="@_user_1", open_id=BOT, name="GPT Bot")],
        ),
        BOT,
    )
    assert message.conversation_id == "group:oc_1:om_root"
    assert message.text == "and shorter?"
    assert message.in_group
    assert message.kind == "text"


def test_media_is_marked_unsupported_and_described() -> None:
    message = from_inbound(inbound('<file key="k" name="a.pdf"/>', message_type="file"), BOT)
    assert message.kind == "unsupported"
    assert message.text == ""
    assert message.describe_type() == "a file"


def test_a_message_survives_the_inbox_round_trip() -> None:
    message = from_inbound(inbound("你好"), BOT)
    assert FeishuMessage.from_json(message.to_json()) == message


async def test_the_channels_dedup_marks_persist_in_the_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    dedup = StoreDedup(store, asyncio.get_running_loop())
    results: dict[str, bool] = {}

    def channel_thread() -> None:  # the SDK calls seen/mark synchronously from its own thread
        results["before"] = dedup.seen("msg:cli:om_1")
        dedup.mark("msg:cli:om_1", 60)  # fire and forget; the store serialises its work
        results["after"] = dedup.seen("msg:cli:om_1")

    thread = threading.Thread(target=channel_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert results == {"before": False, "after": True}
    assert await store.is_seen("msg:cli:om_1")
    await store.close()
