"""Fuzzing the mapping: whatever Feishu sends, the bot maps it or the SDK drops it; no crash.

Malformed ``im.message.receive_v1`` events go through the same steps as in the channel (see
``through_the_channel``); where the SDK itself rejects an event, the channel logs and drops it
and the bot never sees it. For everything the SDK does produce, ``from_inbound`` must return a
message that serialises. And an inbox payload is either read back or refused with
``InboxPayloadError``, nothing else.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark_oapi.channel import InboundMessage
from lark_oapi.channel.normalize.registry import SUPPORTED_MESSAGE_TYPES
from lark_oapi.channel.safety.chat_pipeline import merge_batch

from bot.feishu.messages import FeishuMessage, InboxPayloadError, from_inbound
from tests.test_feishu_mapping import SAMPLE_BOT, SAMPLES, through_the_channel

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # The autouse `isolated` fixture only points cwd and env at a temp dir: fine to share.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

RECORDED = {path.stem: json.loads(path.read_text("utf-8")) for path in SAMPLES.glob("*.json")}
EVENTS = {
    name: event
    for name, event in RECORDED.items()
    if isinstance(event.get("event"), dict) and "message" in event["event"]
}

#: Any text, lone surrogates included, and the edge cases worth always trying.
texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),
    st.sampled_from(["", " ", "x\ud800y", "\udfff", "a" * 100_000, "@_user_1", "@_all", "\x00"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
MESSAGE_TYPES = [*SUPPORTED_MESSAGE_TYPES, "unknown_type", ""]
POST_TAGS = ["text", "a", "at", "img", "media", "emotion", "code_block", "hr", "md", "x"]
post_elements = st.fixed_dictionaries(
    {"tag": st.sampled_from(POST_TAGS)},
    optional={
        "text": json_values,
        "href": json_values,
        "user_id": json_values,
        "user_name": json_values,
        "image_key": json_values,
        "file_key": json_values,
        "style": json_values,
        "language": json_values,
    },
)
posts = st.fixed_dictionaries(
    {},
    optional={
        "title": json_values,
        "content": st.lists(st.lists(post_elements | json_values, max_size=4), max_size=4)
        | json_values,
    },
)
#: The ``content`` field: a JSON string of the right or wrong shape, or not JSON at all.
contents = st.one_of(
    texts,
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(["text", "image_key", "file_key"]), json_values).map(
        json.dumps
    ),
    posts.map(json.dumps),
    st.fixed_dictionaries({"zh_cn": posts}).map(json.dumps),
    json_values,  # not even a string
)
mentions = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "key": st.sampled_from(["@_user_1", "@_user_2", "@_all"]) | json_values,
            "name": texts | json_values,
            "id": st.fixed_dictionaries(
                {},
                optional={
                    "open_id": st.sampled_from([SAMPLE_BOT, "ou_carol"]) | json_values,
                    "user_id": st.just("all") | json_values,
                },
            )
            | json_values,
        },
    )
    | json_values,
    max_size=3,
)

MESSAGE_FIELDS = [
    "message_id",
    "root_id",
    "parent_id",
    "create_time",
    "chat_id",
    "thread_id",
    "chat_type",
    "message_type",
    "content",
    "mentions",
]


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A recorded event with a text, a post or anything as its content, and some of its fields
    deleted, nulled or replaced by anything."""
    event = copy.deepcopy(EVENTS[draw(st.sampled_from(sorted(EVENTS)))])
    message = event["event"]["message"]
    shape = draw(st.sampled_from(["text", "post", "any"]))
    if shape == "text":
        message["message_type"] = "text"
        message["content"] = json.dumps({"text": draw(texts)})
    elif shape == "post":
        message["message_type"] = "post"
        message["content"] = json.dumps(draw(posts | st.fixed_dictionaries({"zh_cn": posts})))
    else:
        message["message_type"] = draw(st.sampled_from(MESSAGE_TYPES) | texts)
        message["content"] = draw(contents)
    if draw(st.booleans()):
        message["mentions"] = draw(mentions | json_values)
    for name in draw(st.lists(st.sampled_from(MESSAGE_FIELDS), max_size=3)):
        if draw(st.booleans()):
            message.pop(name, None)
        else:
            message[name] = draw(json_values)
    if draw(st.integers(0, 3)) == 0:
        target = draw(
            st.sampled_from(
                [event, event["event"], event["header"], event["event"]["sender"], message]
            )
        )
        target[draw(st.sampled_from(sorted(target)) | texts)] = draw(json_values)
    return event


def sdk_output(payload: bytes) -> InboundMessage | None:
    """What the channel would hand the bot, or None where the SDK drops the event."""
    try:
        return through_the_channel(payload)
    except Exception:  # the channel logs it and drops the event: the bot never sees it
        return None


def assert_mapped(inbound: InboundMessage) -> None:
    message = from_inbound(inbound, SAMPLE_BOT)
    payload = message.to_json()
    payload.encode("utf-8")  # valid Unicode throughout
    assert FeishuMessage.from_json(payload) == message
    assert message.kind in ("text", "unsupported")
    assert message.describe_type()


@FUZZ
@given(events())
def test_any_malformed_event_the_channel_hands_over_maps_without_error(
    event: dict[str, Any],
) -> None:
    payload = json.dumps(event).encode("utf-8")  # lone surrogates travel as \udXXX escapes
    inbound = sdk_output(payload)
    if inbound is not None:
        assert_mapped(inbound)


@settings(FUZZ, max_examples=100)
@given(st.lists(events(), min_size=1, max_size=3))
def test_bursts_the_channel_merges_map_without_error(burst: list[dict[str, Any]]) -> None:
    inbounds = [sdk_output(json.dumps(event).encode("utf-8")) for event in burst]
    produced = [inbound for inbound in inbounds if inbound is not None]
    if not produced:
        return
    try:
        merged = merge_batch(produced)  # what the channel's text batching hands over
    except Exception:  # the SDK's batch flush fails, logs, and drops the burst
        return
    assert_mapped(merged)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode()))
def test_garbage_frames_never_reach_the_bot_as_anything_it_cannot_map(payload: bytes) -> None:
    inbound = sdk_output(payload)
    if inbound is not None:
        assert_mapped(inbound)


def valid_payloads() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "message_id": texts,
            "chat_id": texts,
            "chat_type": st.sampled_from(["p2p", "group"]),
            "sender_open_id": texts,
            "conversation_id": texts,
            "kind": st.sampled_from(["text", "unsupported"]),
            "message_type": texts,
            "text": texts,
            "create_time_ms": st.integers(),
            "in_group": st.booleans(),
            "describe_as": texts,
        }
    )


@st.composite
def inbox_payloads(draw: st.DrawFn) -> str:
    """A valid inbox payload, damaged a little or a lot, or any text at all."""
    if draw(st.booleans()):
        return draw(texts)
    payload: Any = draw(valid_payloads())
    for name in draw(st.lists(st.sampled_from(sorted(payload)) | texts, max_size=3)):
        if draw(st.booleans()):
            payload.pop(name, None)
        else:
            payload[name] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        payload = draw(json_values)
    return json.dumps(payload)


@FUZZ
@given(inbox_payloads())
def test_an_inbox_payload_is_read_back_or_refused_with_inbox_payload_error(payload: str) -> None:
    try:
        message = FeishuMessage.from_json(payload)
    except InboxPayloadError:
        return  # refused with its reason: the gateway moves the row aside
    message.to_json().encode("utf-8")
    assert FeishuMessage.from_json(message.to_json()) == message
