"""Mapping Feishu messages for the service: conversations, mentions, posts, broken input, inbox."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from lark_oapi.channel import Conversation, Identity, InboundMessage, Mention
from lark_oapi.channel.normalize.pipeline import InboundPipeline, PipelineConfig, PipelineDeps
from lark_oapi.event.dispatcher_handler import EventDispatcherHandler

from bot.chat.media import MediaRef
from bot.feishu.messages import (
    FeishuMessage,
    InboxPayloadError,
    conversation_key,
    from_inbound,
    strip_bot_mention,
)

BOT = "ou_bot"
SAMPLE_BOT = "ou_bot_open_id"  # the bot's open_id in tests/fakes/samples
SAMPLES = Path(__file__).parent / "fakes" / "samples"


def sample(name: str) -> dict[str, Any]:
    """A recorded ``im.message.receive_v1`` event (a fresh copy to change)."""
    event: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text(encoding="utf-8"))
    return event


def post_event(*paragraphs: list[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """The p2p post sample with other content (paragraphs of post elements)."""
    event = sample("p2p_post")
    event["event"]["message"]["content"] = json.dumps({"title": title, "content": list(paragraphs)})
    return event


def through_the_channel(payload: bytes) -> InboundMessage | None:
    """What ``FeishuChannel`` hands the bot for this event frame, computed in-process.

    The same steps as the channel: the SDK's event dispatcher parses the frame (as
    ``lark_oapi.ws.Client`` does with a data frame) and the channel's inbound pipeline
    normalises it. Nothing goes to the network: fetching a message (merge_forward, cards)
    gives ``{}`` and names resolve to none. Exceptions are the SDK's: the channel logs them
    and drops the event.
    """
    received: list[Any] = []
    dispatcher = (
        EventDispatcherHandler.builder("", "")
        .register_p2_im_message_receive_v1(received.append)
        .build()
    )
    dispatcher._do_without_validation(payload)
    if not received or received[0].event is None or received[0].event.message is None:
        return None  # the channel ignores an event without a message

    async def fetch_message(message_id: str) -> dict[str, Any]:
        return {}

    pipeline = InboundPipeline(
        PipelineConfig(),
        PipelineDeps(fetch_message=fetch_message, resolve_names=lambda ids: {}),
    )
    event = received[0]
    inbound: InboundMessage | None = asyncio.run(
        pipeline.process(
            event_id=getattr(event.header, "event_id", None),
            message_event=event.event.message,
            sender=event.event.sender,
        )
    )
    return inbound


def mapped(event: dict[str, Any], bot_open_id: str = SAMPLE_BOT) -> FeishuMessage:
    """The bot's view of a recorded event, through the channel."""
    inbound = through_the_channel(json.dumps(event).encode("utf-8"))
    assert inbound is not None
    return from_inbound(inbound, bot_open_id)


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


def test_a_recorded_group_reply_maps_to_its_thread_through_the_channel() -> None:
    message = mapped(sample("group_thread_reply"))
    assert message.conversation_id == "group:oc_group:om_a1"
    assert message.text == "and shorter?"
    assert message.kind == "text"


def test_an_image_a_file_and_a_voice_message_carry_their_resource_keys() -> None:
    image = mapped(sample("p2p_image"))
    assert (image.kind, image.text) == ("image", "")
    assert image.media == (MediaRef("image", "img_v3_02ab_0d6d1a3b-1f2e-4c8b-a1f0-123456789abg"),)
    document = mapped(sample("p2p_file"))
    assert document.kind == "file"
    assert document.media == (MediaRef("file", "file_v3_00ab", name="report.pdf"),)
    voice = sample("p2p_file")
    voice["event"]["message"]["message_type"] = "audio"
    voice["event"]["message"]["content"] = '{"file_key": "file_v3_voice", "duration": 4200}'
    assert mapped(voice).kind == "voice"
    assert mapped(voice).media == (MediaRef("audio", "file_v3_voice", duration_ms=4200),)


@pytest.mark.parametrize(
    "content", ['{"image_key": [null]}', '{"image_key": {"a": 1}}', '{"image_key": "../../x"}']
)
def test_an_image_whose_key_feishu_could_not_have_issued_is_unsupported(content: str) -> None:
    event = sample("p2p_image")
    event["event"]["message"]["content"] = content
    image = mapped(event)
    assert (image.kind, image.media) == ("unsupported", ())
    assert image.describe_type()


def test_other_media_are_marked_unsupported_and_described() -> None:
    sticker = mapped(sample("p2p_sticker"))
    assert (sticker.kind, sticker.media) == ("unsupported", ())
    assert sticker.describe_type() == "a sticker"


def test_a_media_message_round_trips_through_the_inbox() -> None:
    message = mapped(sample("p2p_file"))
    assert FeishuMessage.from_json(message.to_json()) == message


def test_a_post_keeps_its_text_and_code_and_carries_its_images_as_media() -> None:
    message = mapped(sample("p2p_post"))  # title, text, a code block and an image
    assert message.kind == "text"
    assert message.text == "# Question\n\nExplain this code: \n\n```python\nprint(1)\n```"
    assert [(item.kind, item.key.startswith("img_")) for item in message.media] == [("image", True)]


def test_a_post_of_only_images_is_held_like_an_image() -> None:
    message = mapped(
        post_event([{"tag": "img", "image_key": "img_v3_a"}], [{"tag": "img", "image_key": "k2"}])
    )
    assert message.kind == "image"
    assert message.text == ""
    assert [item.key for item in message.media] == ["img_v3_a", "k2"]


def test_a_group_post_of_the_bots_mention_and_an_image_is_held_like_an_image() -> None:
    event = post_event(
        [{"tag": "at", "user_id": SAMPLE_BOT, "user_name": "GPT Bot"}],
        [{"tag": "img", "image_key": "img_v3_a"}],
    )
    event["event"]["message"]["chat_type"] = "group"
    event["event"]["message"]["mentions"] = sample("group_text_mention")["event"]["message"][
        "mentions"
    ]
    message = mapped(event)
    assert (message.kind, [item.key for item in message.media]) == ("image", ["img_v3_a"])


def test_a_post_of_only_a_video_is_answered_like_a_video() -> None:
    message = mapped(post_event([{"tag": "media", "file_key": "file_v3_a", "image_key": "i"}]))
    assert (message.kind, message.describe_type()) == ("unsupported", "a video")


def test_image_markdown_the_user_typed_in_a_post_is_kept() -> None:
    message = mapped(
        post_event(
            [{"tag": "text", "text": "why does ![image](https://x.test/a.png) not show?"}],
            [{"tag": "img", "image_key": "img_v3_a"}],
        )
    )
    assert message.text == "why does ![image](https://x.test/a.png) not show?"


def test_a_lone_surrogate_in_the_event_is_replaced_not_dropped() -> None:
    event = sample("group_thread_reply")
    event["event"]["message"]["content"] = '{"text": "@_user_1 x\\ud800y"}'
    payload = json.dumps(event).replace("oc_group", "oc_\\udfffgroup").encode("utf-8")
    inbound = through_the_channel(payload)
    assert inbound is not None
    message = from_inbound(inbound, SAMPLE_BOT)
    assert message.text == "x\ufffdy"
    assert message.chat_id == "oc_\ufffdgroup"
    assert message.conversation_id == "group:oc_\ufffdgroup:om_a1"
    assert FeishuMessage.from_json(message.to_json()) == message
    message.to_json().encode("utf-8")  # valid UTF-8 throughout


def test_every_text_field_is_made_valid_unicode() -> None:
    message = FeishuMessage(
        message_id="om_\ud800",
        chat_id="oc",
        chat_type="p2p",
        sender_open_id="ou_\udc00",
        conversation_id="p2p:ou",
        kind="text",
        message_type="text",
        text="split pair \ud83d\ude00, lone \ud83d",
        create_time_ms=0,
        in_group=False,
    )
    assert (message.message_id, message.sender_open_id) == ("om_\ufffd", "ou_\ufffd")
    assert message.text == "split pair \U0001f600, lone \ufffd"
    message.to_json().encode("utf-8")


def test_a_message_survives_the_inbox_round_trip() -> None:
    message = from_inbound(inbound("你好"), BOT)
    assert FeishuMessage.from_json(message.to_json()) == message
    image_post = mapped(post_event([{"tag": "img", "image_key": "img_v3_a"}]))
    assert FeishuMessage.from_json(image_post.to_json()) == image_post


def test_an_inbox_payload_ignores_unknown_fields_and_defaults_missing_optional_ones() -> None:
    payload = {
        "message_id": "om_1",
        "chat_id": "oc_1",
        "sender_open_id": "ou_a",
        "conversation_id": "group:oc_1:om_1",
        "kind": "text",
        "text": "hi",
        "added_by_a_later_version": {"x": 1},
    }
    message = FeishuMessage.from_json(json.dumps(payload))
    assert message.text == "hi"
    assert (message.chat_type, message.in_group) == ("group", True)
    assert (message.create_time_ms, message.message_type, message.describe_as) == (0, "", "")


def _valid_payload() -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(from_inbound(inbound("hi"), BOT).to_json())
    return payload


def _without(name: str) -> str:
    payload = _valid_payload()
    del payload[name]
    return json.dumps(payload)


def _with(name: str, value: Any) -> str:
    payload = _valid_payload()
    payload[name] = value
    return json.dumps(payload)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ("[" * 100_000, "not JSON"),
        ('["om_1"]', "not a JSON object but an array"),
        ("null", "not a JSON object but null"),
        (_without("message_id"), "message_id: missing"),
        (_without("text"), "text: missing"),
        (_with("text", 5), "text: expected a string, got a number"),
        (_with("chat_id", None), "chat_id: expected a string, got null"),
        (_with("kind", "video"), "kind: expected one of text, voice, image, file, unsupported"),
        (_with("media", "x"), "media: expected a list, got a string"),
        (_with("media", [{"kind": "video", "key": "k"}]), "media kind: unknown 'video'"),
        (_with("media", [5]), "media: expected an object, got a number"),
        (_with("create_time_ms", "1764000000000"), "create_time_ms: expected an integer"),
        (_with("create_time_ms", True), "create_time_ms: expected an integer, got a boolean"),
        (_with("in_group", "yes"), "in_group: expected true or false, got a string"),
    ],
)
def test_an_unreadable_inbox_payload_raises_one_error_type_with_the_reason(
    payload: str, reason: str
) -> None:
    with pytest.raises(InboxPayloadError, match=re.escape(reason)):
        FeishuMessage.from_json(payload)


def test_an_unreadable_inbox_payload_is_a_value_error() -> None:
    assert issubclass(InboxPayloadError, ValueError)
