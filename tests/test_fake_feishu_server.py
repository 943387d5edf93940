"""The fake Feishu speaks the real protocol: the real lark-oapi SDK is driven against it.

Long-connection clients run in subprocesses (``tests/fakes/ws_probe.py``) because
``lark_oapi.ws.client`` binds a module-level event loop at import and caches tenant tokens
process-wide; REST-only checks use the SDK's ``lark.Client`` in this process (off the fake's
loop, since the SDK fetches tokens with blocking ``requests``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import lark_oapi as lark
import pytest
from lark_oapi.api.cardkit.v1 import (
    BatchUpdateCardRequest,
    BatchUpdateCardRequestBody,
    ContentCardElementRequest,
    ContentCardElementRequestBody,
    CreateCardRequest,
    CreateCardRequestBody,
)
from lark_oapi.api.im.v1 import (
    CreateImageRequest,
    CreateImageRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    GetMessageRequest,
    GetMessageResourceRequest,
    P2ImChatAccessEventBotP2pChatEnteredV1,
    P2ImChatMemberBotAddedV1,
)
from lark_oapi.api.speech_to_text.v1 import (
    FileConfig,
    FileRecognizeSpeechRequest,
    FileRecognizeSpeechRequestBody,
    Speech,
)
from lark_oapi.core.json import JSON

from tests.fakes.feishu_server import (
    BOT_NAME,
    BOT_OPEN_ID,
    CODE_FIELD_VALIDATION,
    CODE_FILE_NOT_IN_MESSAGE,
    CODE_IMAGE_EMPTY,
    CODE_IMAGE_TOO_LARGE,
    CODE_IMAGE_TYPE_UNSUPPORTED,
    CODE_RESOURCE_INVALID_PARAM,
    CODE_SCOPE_MISSING,
    CODE_SPEECH_TOO_LONG,
    DEFAULT_SCOPES,
    ENDPOINTS,
    FEISHU_ERRORS,
    MAX_IMAGE_BYTES,
    SAMPLE_SENDER_OPEN_ID,
    SPEECH_BYTES_PER_SECOND,
    FakeFeishu,
    FakeFeishuThread,
    build_bot_added_event,
    build_message_event,
    build_p2p_chat_entered_event,
)
from tests.fakes.openai_server import solid_png
from tests.fakes.ws_probe import ProbeProcess

INTERRUPTED_FOOTER = "\n\n— _(generation interrupted)_"


@pytest.fixture(autouse=True)
def _keep_the_lark_logger() -> Iterator[None]:
    """``lark.Client...build()`` sets the process-wide "Lark" logger level: undo it."""
    sdk_logger = logging.getLogger("Lark")
    level, handlers, propagate = sdk_logger.level, list(sdk_logger.handlers), sdk_logger.propagate
    yield
    sdk_logger.setLevel(level)
    sdk_logger.handlers[:] = handlers
    sdk_logger.propagate = propagate


@pytest.fixture(scope="module")
def server() -> Iterator[FakeFeishuThread]:
    """One fake (in its own thread) shared by the channel tests of this module."""
    with FakeFeishu(reconnect_interval=0.2, reconnect_nonce=0).run_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: FakeFeishuThread) -> Iterator[ProbeProcess]:
    """A real ``FeishuChannel`` (subprocess) connected to the shared fake."""
    fs = server.fake
    probe = ProbeProcess(
        server.domain,
        app_id=fs.app_id,
        app_secret=fs.app_secret,
        extra_args=("--retry-base-ms", "20"),  # RetryConfig(base_delay_ms=20): fast retries
    )
    try:
        probe.expect("ready", timeout=20)
        yield probe
    finally:
        probe.close()


def _deliver_text(server: FakeFeishuThread, text: str, **kwargs: object) -> tuple[str, str]:
    frame_id = server.deliver("p2p_text", text=text, **kwargs)
    message_id = server.fake.delivery(frame_id).message_id
    assert message_id is not None
    return frame_id, message_id


# --------------------------------------------------------------------------------------------
# Long connection: discovery, delivery, ACK
# --------------------------------------------------------------------------------------------


def test_channel_discovers_the_endpoint_connects_and_pings(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    endpoints = [c.endpoint for c in fs.calls_to()][:4]
    assert endpoints == ["tenant_token", "bot_info", "ws_endpoint", "ws_connect"]
    discovery = fs.calls_to("ws_endpoint")[0]
    assert discovery.json == {"AppID": fs.app_id, "AppSecret": fs.app_secret}
    assert discovery.headers["User-Agent"].endswith(" channel")
    assert discovery.response["data"]["ClientConfig"]["ReconnectInterval"] == 0.2

    (conn,) = fs.wait_for_connections_blocking(1)
    assert fs.calls_to("ws_connect")[0].query["device_id"] == conn.conn_id
    # The SDK's ping loop pings right after connecting; the fake answers with a pong.
    fs.wait_until_blocking(lambda: conn.pings >= 1, 5, "a ping")


def test_delivered_event_reaches_the_handler_and_is_acked(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    frame_id, message_id = _deliver_text(server, "你好，帮我写一首诗")

    ack = fs.wait_for_ack_blocking(frame_id)
    assert ack.code == 200
    assert ack.message_id == message_id
    assert ack.latency is not None
    assert ack.latency < 2
    assert "biz_rt" in ack.headers

    received = channel.expect("message", message_id=message_id)
    event_message = fs.delivery(frame_id).event["event"]["message"]
    assert received["content_text"] == "你好，帮我写一首诗"
    assert received["chat_type"] == "p2p"
    assert received["chat_id"] == event_message["chat_id"]
    assert received["create_time"] == int(event_message["create_time"])
    assert received["sender"] == {
        "open_id": SAMPLE_SENDER_OPEN_ID,
        "union_id": "on_8ed6aa67826108097d9ee143816345",
        "user_id": "e33ggbyz",
        "display_name": "Sample User",  # resolved through contact/v3/users/batch
        "is_bot": False,
    }
    assert received["reply_to"] is None
    assert received["thread"] == "lark-channel-bg"
    lookup = fs.calls_to("contact_users_batch")[-1]
    assert lookup.query_multi["user_ids"] == [SAMPLE_SENDER_OPEN_ID]


def test_fragmented_event_is_reassembled_by_the_sdk(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    frame_id, message_id = _deliver_text(
        server, "split into three frames", fragments=3, reverse_fragments=True
    )
    server.fake.wait_for_ack_blocking(frame_id)
    received = channel.expect("message", message_id=message_id)
    assert received["content_text"] == "split into three frames"
    assert len(server.fake.delivery(frame_id).acks) == 1


def test_event_without_a_processor_is_acked_with_code_500(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    event = {
        "schema": "2.0",
        "header": {
            "event_id": uuid.uuid4().hex,
            "event_type": "im.chat.updated_v1",
            "create_time": "1732500000000",
            "token": "",
            "app_id": server.fake.app_id,
            "tenant_key": "2ca1d211f64f6438",
        },
        "event": {"chat_id": "oc_x"},
    }
    frame_id = server.deliver(event)
    assert server.fake.wait_for_ack_blocking(frame_id).code == 500


def test_group_mentions_and_thread_replies_as_the_channel_reports_them(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    mention_frame = server.deliver("group_text_mention")
    mention_id = fs.delivery(mention_frame).message_id
    mention = channel.expect("message", message_id=mention_id)
    assert mention["chat_type"] == "group"
    assert mention["content_text"] == f"@{BOT_NAME} summarise the thread please"
    assert mention["mentions"] == [
        {"key": "@_user_1", "open_id": BOT_OPEN_ID, "name": BOT_NAME, "is_bot": False}
    ]
    assert mention["mentioned_bot"] is False  # never set by the 1.7.5 pipeline

    # parent == root: the channel reports no reply ref, only the raw ids.
    thread_frame = server.deliver("group_thread_reply", root_id=mention_id, parent_id=mention_id)
    reply = channel.expect("message", message_id=fs.delivery(thread_frame).message_id)
    assert reply["reply_to"] is None
    assert (reply["raw_root_id"], reply["raw_parent_id"]) == (mention_id, mention_id)

    nested_frame = server.deliver(
        "group_thread_reply", root_id=mention_id, parent_id="om_parent", thread_id="omt_1"
    )
    nested = channel.expect("message", message_id=fs.delivery(nested_frame).message_id)
    assert nested["reply_to"] == "om_parent"
    assert nested["thread_id"] == "omt_1"

    # Without a bot mention, the default policy (require_mention) drops group messages.
    silent = server.deliver("group_text_mention", mention_bot=False, text="no mention")
    channel.expect("reject", message_id=fs.delivery(silent).message_id, reason="policy_no_mention")


def test_chat_events_travel_the_long_connection_and_parse_in_the_sdk_dispatcher(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    known_messages = set(fs.messages)
    added_frame = server.deliver(
        "bot_added", chat_id="oc_3f1b0e6a9c2d47e58b7a6c5d4e3f2a1b", chat_name="Release crew"
    )
    entered_frame = server.deliver(
        fs.build_p2p_chat_entered(operator_open_id="ou_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f")
    )
    # FeishuChannel registers a processor for bot.added (ACK 200) but none for
    # bot_p2p_chat_entered in lark-oapi 1.7.5 (the SDK answers 500 "processor not found").
    assert fs.wait_for_ack_blocking(added_frame).code == 200
    assert fs.wait_for_ack_blocking(entered_frame).code == 500
    assert fs.delivery(added_frame).message_id is None
    assert set(fs.messages) == known_messages  # chat events never enter the IM model

    # The bytes that went over the wire, through the SDK's own dispatcher (what ws/client.py
    # calls for every data frame) with both processors registered.
    seen: list[Any] = []
    dispatcher = (
        lark.EventDispatcherHandler.builder("", "")
        .register_p2_im_chat_member_bot_added_v1(seen.append)
        .register_p2_im_chat_access_event_bot_p2p_chat_entered_v1(seen.append)
        .build()
    )
    for frame_id in (added_frame, entered_frame):
        dispatcher._do_without_validation(fs.delivery(frame_id).payload)
    added, entered = seen
    assert isinstance(added, P2ImChatMemberBotAddedV1)
    assert added.header.event_type == "im.chat.member.bot.added_v1"
    assert added.header.app_id == fs.app_id
    assert (added.event.chat_id, added.event.name) == (
        "oc_3f1b0e6a9c2d47e58b7a6c5d4e3f2a1b",
        "Release crew",
    )
    assert added.event.operator_id.open_id == SAMPLE_SENDER_OPEN_ID
    assert isinstance(entered, P2ImChatAccessEventBotP2pChatEnteredV1)
    assert entered.event.operator_id.open_id == "ou_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"
    assert entered.event.chat_id.startswith("oc_")


def test_post_message_is_flattened_to_content_text(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    frame_id = server.deliver("p2p_post")
    received = channel.expect("message", message_id=server.fake.delivery(frame_id).message_id)
    assert received["content_kind"] == "post"
    assert "Explain this code" in received["content_text"]
    assert "print(1)" in received["content_text"]


def test_ack_is_sent_before_the_channel_handler_finishes(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    frame_id, message_id = _deliver_text(server, "HOLD the handler")
    channel.expect("handler_blocked", message_id=message_id)
    ack = server.fake.wait_for_ack_blocking(frame_id)
    assert ack.code == 200
    assert not channel.events("handler_done")
    channel.send({"cmd": "release"})
    channel.expect("handler_done", message_id=message_id)


# --------------------------------------------------------------------------------------------
# Outbound through the channel
# --------------------------------------------------------------------------------------------


def test_channel_text_reply_and_markdown_send_reach_the_fake(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    _, message_id = _deliver_text(server, "say hi")
    chat_id = channel.expect("message", message_id=message_id)["chat_id"]

    result = channel.request(
        {
            "cmd": "send",
            "to": chat_id,
            "message": {"text": "hi back"},
            "opts": {"reply_to": message_id},
        }
    )
    assert result["ok"] is True
    (reply,) = fs.replies_to(message_id)
    assert reply.message_id == result["message_id"]
    assert (reply.msg_type, fs.message_text(reply.message_id)) == ("text", "hi back")
    call = fs.calls_to("message_reply")[-1]
    assert call.json["msg_type"] == "text"
    assert json.loads(call.json["content"]) == {"text": "hi back"}
    assert call.json["uuid"]

    result = channel.request({"cmd": "send", "to": chat_id, "message": "**bold** move"})
    assert result["ok"] is True
    create = fs.calls_to("message_create")[-1]
    assert create.query["receive_id_type"] == "chat_id"
    assert create.json["msg_type"] == "post"
    assert "bold" in fs.message_text(result["message_id"])


def test_markdown_stream_builds_a_cardkit_card_and_closes_it(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    _, message_id = _deliver_text(server, "stream to me")
    chat_id = channel.expect("message", message_id=message_id)["chat_id"]
    since = fs.mark()

    chunks = ["Hello", "Hello, wor", "Hello, world! ", "Hello, world! Bye."]
    result = channel.request(
        {
            "cmd": "stream",
            "to": chat_id,
            "chunks": chunks,
            "mode": "set",
            "opts": {"reply_to": message_id},
        }
    )
    assert result["ok"] is True
    (reply,) = fs.replies_to(message_id)
    assert reply.message_id == result["message_id"]
    assert reply.msg_type == "interactive"
    assert reply.card_id is not None

    card = fs.card(reply.card_id)
    assert card.initial_spec["config"]["streaming_mode"] is True
    assert card.initial_spec["body"]["elements"][0]["content"] == "Thinking..."
    assert card.element_order == ["stream_md"]
    assert card.closed
    assert card.text == chunks[-1] == fs.reply_texts(message_id)[0]
    sequences = card.sequences
    assert sequences == sorted(set(sequences))
    assert sequences[0] >= 1
    assert card.updates[-1].kind == "settings"
    assert card.settings[-1] == {"config": {"streaming_mode": False}}
    assert card.content_updates[-1].content == chunks[-1]

    order = [
        c.endpoint for c in fs.calls_to(since=since) if c.endpoint.startswith(("card", "mess"))
    ]
    assert order[:2] == ["card_create", "message_reply"]
    assert order[-1] == "card_settings"
    assert set(order[2:-1]) == {"card_element_content"}
    assert json.loads(fs.calls_to("message_reply", since=since)[0].json["content"]) == {
        "type": "card",
        "data": {"card_id": reply.card_id},
    }


def test_markdown_stream_append_merges_overlapping_deltas(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    """Pins an SDK quirk: ``append`` de-duplicates a delta's overlap with the text so far."""
    fs = server.fake
    result = channel.request(
        {"cmd": "stream", "to": "oc_quirk", "chunks": ["Hel", "lo"], "mode": "append"}
    )
    card_id = fs.message(result["message_id"]).card_id
    assert card_id is not None
    assert fs.card_text(card_id) == "Helo"


def test_failing_stream_producer_leaves_an_interrupted_footer_and_a_closed_card(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    since = fs.mark()
    result = channel.request(
        {
            "cmd": "stream",
            "to": "oc_fail",
            "chunks": ["partial answer"],
            "mode": "set",
            "fail": True,
        }
    )
    assert result["ok"] is False
    assert result["exception"]["type"] == "builtins.RuntimeError"
    (create,) = fs.calls_to("card_create", since=since)
    card = fs.card(create.response["data"]["card_id"])
    assert card.text == "partial answer" + INTERRUPTED_FOOTER
    assert card.closed


def test_tenant_token_is_fetched_once_and_reused(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    assert channel.request({"cmd": "send", "to": "oc_token", "message": {"text": "t"}})["ok"]
    (token_call,) = fs.calls_to("tenant_token")
    token = token_call.response["tenant_access_token"]
    authed = [c for c in fs.calls_to() if c.endpoint.startswith(("bot", "contact", "mess", "card"))]
    assert len(authed) > 3
    assert {c.token for c in authed} == {token}


def test_rate_limited_reply_is_returned_not_retried_by_the_channel(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    since = fs.mark()
    rule = fs.fail("message_reply", "rate_limited")
    result = channel.request(
        {"cmd": "send", "to": "oc_x", "message": {"text": "x"}, "opts": {"reply_to": "om_target"}}
    )
    assert rule.hits == 1
    assert result["ok"] is False
    # lark-oapi 1.7.5 files 99991400 under permission errors (errors.py:61): no retry.
    assert result["error"]["code"] == "permission_denied"
    assert result["error"]["raw_code"] == FEISHU_ERRORS["rate_limited"]["body"]["code"]
    assert result["error"]["retryable"] is False
    assert len(fs.calls_to("message_reply", since=since)) == 1


def test_unclassified_error_codes_are_retried_by_the_channel_sender(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    since = fs.mark()
    fs.fail("message_reply", "message_recalled", times=None)
    try:
        result = channel.request(
            {"cmd": "send", "to": "oc_x", "message": {"text": "x"}, "opts": {"reply_to": "om_t"}}
        )
    finally:
        fs.clear_faults()
    # 230011 is not in any bucket of errors.py -> UNKNOWN, which retry.py retries.
    assert result["error"]["code"] == "unknown"
    assert result["error"]["raw_code"] == 230011
    assert len(fs.calls_to("message_reply", since=since)) == 3  # RetryConfig.max_attempts


def test_stream_reports_success_even_when_its_card_message_was_not_sent(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    since = fs.mark()
    fs.fail("message_reply", "rate_limited")
    result = channel.request(
        {
            "cmd": "stream",
            "to": "oc_x",
            "chunks": ["lost words"],
            "mode": "set",
            "opts": {"reply_to": "om_gone"},
        }
    )
    assert result["ok"] is True
    assert result["message_id"] == ""  # the only sign that nobody saw the card
    (create,) = fs.calls_to("card_create", since=since)
    card = fs.card(create.response["data"]["card_id"])
    assert card.message_ids == []
    assert card.text == "lost words"
    assert card.closed


def test_card_update_over_the_size_limit_is_rejected_and_swallowed(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    since = fs.mark()
    too_big = "x" * (31 * 1024)
    result = channel.request(
        {"cmd": "stream", "to": "oc_big", "chunks": ["short start", too_big], "mode": "set"}
    )
    assert result["ok"] is True
    card_id = fs.message(result["message_id"]).card_id
    assert card_id is not None
    rejected = [c for c in fs.calls_to("card_element_content", since=since) if c.status != 200]
    assert [c.response["code"] for c in rejected] == [
        FEISHU_ERRORS["card_too_large"]["body"]["code"]
    ]
    assert fs.card_text(card_id) == "short start"
    assert fs.card(card_id).closed


# --------------------------------------------------------------------------------------------
# Connection loss
# --------------------------------------------------------------------------------------------


def test_dropped_connection_is_reestablished_and_missed_events_are_replayed(
    server: FakeFeishuThread, channel: ProbeProcess
) -> None:
    fs = server.fake
    before = len(fs.connections)
    endpoint_calls = len(fs.calls_to("ws_endpoint"))
    # Hold the SDK's next endpoint discovery, then fail it with a retryable server error.
    gate = fs.hold("ws_endpoint")
    fs.fail("ws_endpoint", code=1000040343, msg="internal error", http_status=200)

    assert server.drop_connections() == 1
    channel.expect("reconnecting")
    gate.wait_arrived_blocking()
    assert not fs.open_connections()
    missed_frame, missed_id = _deliver_text(server, "sent while disconnected")
    gate.release()

    (conn,) = fs.wait_for_connections_blocking(1, timeout=10, after=before)
    channel.expect("reconnected")
    assert len(fs.calls_to("ws_endpoint")) == endpoint_calls + 2
    assert fs.wait_for_ack_blocking(missed_frame).conn_id == conn.conn_id
    assert [a.reason for a in fs.delivery(missed_frame).attempts] == ["replay"]
    channel.expect("message", message_id=missed_id)

    frame_id, message_id = _deliver_text(server, "after the reconnect")
    assert fs.wait_for_ack_blocking(frame_id).conn_id == conn.conn_id
    channel.expect("message", message_id=message_id)


def test_wrong_app_secret_fails_start_without_retrying(server: FakeFeishuThread) -> None:
    fs = server.fake
    since = fs.mark()
    connections = len(fs.connections)
    probe = ProbeProcess(server.domain, app_id=fs.app_id, app_secret="not-the-secret")
    try:
        failed = probe.expect("start_failed", timeout=20)
        assert probe.wait_exit() == 3
    finally:
        probe.close()
    assert failed["type"] == "lark_oapi.channel.errors.FeishuChannelError"
    assert failed["code"] == "not_connected"
    assert failed["message"].startswith("WebSocket connect failed: 514:")
    assert (failed["cause_type"], failed["cause_code"]) == ("ClientException", 514)
    token_calls = fs.calls_to("tenant_token", since=since)
    assert token_calls
    assert all(c.response["code"] == 10014 for c in token_calls)
    assert len(fs.calls_to("ws_endpoint", since=since)) == 1
    assert len(fs.connections) == connections


# --------------------------------------------------------------------------------------------
# Several raw clients: round robin and redelivery
# --------------------------------------------------------------------------------------------


def test_events_are_shared_round_robin_and_unacked_ones_are_redelivered() -> None:
    with FakeFeishu(reconnect_interval=0.2).run_in_thread() as server:
        fs = server.fake
        slow, quick = (
            ProbeProcess(
                server.domain,
                app_id=fs.app_id,
                app_secret=fs.app_secret,
                mode="raw",
                extra_args=extra,
            )
            for extra in (("--block-on", "SLOW"), ())
        )
        try:
            fs.wait_for_connections_blocking(2, timeout=20)
            frames = [server.deliver("p2p_text", text=f"event {i}") for i in range(4)]
            for frame_id in frames:
                fs.wait_for_ack_blocking(frame_id)
            assert all(len(fs.delivery(f).acks) == 1 for f in frames)
            per_conn = [sum(a.conn_id == c.conn_id for a in fs.acks) for c in fs.connections]
            assert per_conn == [2, 2]

            # A handler that blocks the raw SDK's loop delays the ACK; the fake redelivers the
            # event (to the other client) and both end up handling it.
            slow_conn = slow.expect("message")["conn_id"]
            frame_id = server.deliver(
                "p2p_text", text="SLOW handler", redeliver_after=0.3, conn_id=slow_conn
            )
            delivery = fs.delivery(frame_id)
            slow.expect("handler_blocked", message_id=delivery.message_id)
            quick.expect("message", message_id=delivery.message_id)
            first_ack = fs.wait_for_ack_blocking(frame_id)
            assert [a.reason for a in delivery.attempts] == ["first", "redeliver"]
            assert first_ack.conn_id != slow_conn
            assert first_ack.latency is not None
            assert first_ack.latency < 1
            slow.send({"cmd": "release"})
            fs.wait_until_blocking(lambda: len(delivery.acks) >= 2, 5, "the late ACK")
            assert delivery.acks[1].conn_id == slow_conn

            # A fatal handshake answer (403) while reconnecting ends the SDK's reconnect loop:
            # the processes stay alive but never connect again.
            fs.fail("ws_connect", code=403, msg="forbidden", http_status=403, times=None)
            endpoint_calls = len(fs.calls_to("ws_endpoint"))
            server.drop_connections()
            refused = fs.wait_until_blocking(
                lambda: [c for c in fs.calls_to("ws_connect") if c.status == 403][1:], 5, "2 x 403"
            )
            assert len(refused) == 1
            assert len(fs.calls_to("ws_endpoint")) == endpoint_calls + 2
            # Bounded negative check: no new discovery within 5 reconnect intervals.
            with pytest.raises(TimeoutError):
                fs.wait_until_blocking(
                    lambda: len(fs.calls_to("ws_endpoint")) > endpoint_calls + 2, 1.0, "a retry"
                )
            assert slow.proc.poll() is None
            assert quick.proc.poll() is None
            assert not fs.open_connections()
        finally:
            slow.close()
            quick.close()


# --------------------------------------------------------------------------------------------
# REST faults against the in-process SDK client (fake on this test's loop)
# --------------------------------------------------------------------------------------------


def _sdk_client(fs: FakeFeishu) -> lark.Client:
    return (
        lark.Client.builder().app_id(fs.app_id).app_secret(fs.app_secret).domain(fs.domain).build()
    )


def _text_message(chat_id: str, text: str) -> CreateMessageRequest:
    body = (
        CreateMessageRequestBody.builder()
        .receive_id(chat_id)
        .msg_type("text")
        .content(json.dumps({"text": text}))
        .build()
    )
    return CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()


async def test_injected_faults_reach_the_sdk_with_the_documented_bodies() -> None:
    # A fresh app id: the SDK caches tenant tokens per app id for the whole process.
    async with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}") as fs:
        client = _sdk_client(fs)
        rule = fs.fail("message_create", "rate_limited")
        limited = await asyncio.to_thread(client.im.v1.message.create, _text_message("oc_a", "1"))
        assert (limited.code, limited.msg) == (99991400, "request trigger frequency limit")
        assert limited.raw.status_code == 429
        assert rule.hits == 1
        assert not rule.active

        sent = await asyncio.to_thread(client.im.v1.message.create, _text_message("oc_a", "2"))
        assert sent.code == 0
        assert fs.message_text(sent.data.message_id) == "2"

        gate = fs.hold("message_create")
        pending = asyncio.ensure_future(
            asyncio.to_thread(client.im.v1.message.create, _text_message("oc_a", "3"))
        )
        await gate.wait_arrived(5)
        assert not pending.done()
        assert [c.json["content"] for c in gate.calls] == [json.dumps({"text": "3"})]
        gate.release()
        assert (await asyncio.wait_for(pending, 5)).code == 0

        fs.revoke_tokens()  # the SDK keeps using its cached token
        rejected = await asyncio.to_thread(client.im.v1.message.create, _text_message("oc_a", "4"))
        assert rejected.code == 99991663
        assert len(fs.calls_to("tenant_token")) == 1


async def _create_streaming_card(client: lark.Client) -> str:
    """A streaming CardKit card with one markdown element ``md`` ("..."), made through the SDK."""
    spec = {
        "schema": "2.0",
        "config": {"streaming_mode": True},
        "body": {"elements": [{"tag": "markdown", "element_id": "md", "content": "..."}]},
    }
    created = await asyncio.to_thread(
        client.cardkit.v1.card.create,
        CreateCardRequest.builder()
        .request_body(
            CreateCardRequestBody.builder().type("card_json").data(json.dumps(spec)).build()
        )
        .build(),
    )
    return str(created.data.card_id)


async def test_cardkit_rejects_a_sequence_that_does_not_increase() -> None:
    async with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}") as fs:
        client = _sdk_client(fs)
        card_id = await _create_streaming_card(client)

        def update(content: str, sequence: int) -> lark.BaseResponse:
            request = (
                ContentCardElementRequest.builder()
                .card_id(card_id)
                .element_id("md")
                .request_body(
                    ContentCardElementRequestBody.builder()
                    .content(content)
                    .sequence(sequence)
                    .build()
                )
                .build()
            )
            return client.cardkit.v1.card_element.content(request)

        assert (await asyncio.to_thread(update, "a", 1)).code == 0
        stale = await asyncio.to_thread(update, "b", 1)
        assert (stale.code, stale.msg) == (300317, "sequence number compare failed")
        assert (await asyncio.to_thread(update, "c", 2)).code == 0
        assert fs.card(card_id).sequences == [1, 2]
        assert fs.card_text(card_id) == "c"


async def test_cardkit_batch_update_applies_its_actions_in_order_or_not_at_all() -> None:
    async with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}", card_size_limit=512) as fs:
        client = _sdk_client(fs)
        card_id = await _create_streaming_card(client)

        def batch(actions: list[dict[str, Any]], sequence: int) -> lark.BaseResponse:
            request = (
                BatchUpdateCardRequest.builder()
                .card_id(card_id)
                .request_body(
                    BatchUpdateCardRequestBody.builder()
                    .actions(json.dumps(actions))
                    .sequence(sequence)
                    .build()
                )
                .build()
            )
            return client.cardkit.v1.card.batch_update(request)

        text = {
            "action": "partial_update_element",
            "params": {"element_id": "md", "partial_element": {"content": "Done."}},
        }
        close = {
            "action": "partial_update_setting",
            "params": {"settings": {"config": {"streaming_mode": False}}},
        }
        unknown = {"action": "rotate_card", "params": {}}
        too_large = {
            "action": "partial_update_element",
            "params": {"element_id": "md", "partial_element": {"content": "x" * 513}},
        }
        for refused, code in (([text, unknown], 99992402), ([close, too_large], 230025)):
            answer = await asyncio.to_thread(batch, refused, 1)
            assert answer.code == code
            card = fs.card(card_id)
            assert (card.closed, card.text, card.updates) == (False, "...", [])  # nothing applied

        assert (await asyncio.to_thread(batch, [text, close], 1)).code == 0
        card = fs.card(card_id)
        assert (card.closed, card.text) == (True, "Done.")
        assert [(u.kind, u.sequence, u.batch) for u in card.updates] == [
            ("content", 1, True),
            ("settings", None, True),
        ]
        assert card.content_updates[-1].content == "Done."
        assert card.settings == [{"config": {"streaming_mode": False}}]
        stale = await asyncio.to_thread(batch, [text], 1)
        assert stale.code == 300317  # one operation, one sequence

        rework = [
            {
                "action": "partial_update_element",
                "params": {"element_id": "md", "partial_element": {"text_size": "heading"}},
            },
            {
                "action": "update_element",
                "params": {
                    "element_id": "md",
                    "element": {"tag": "markdown", "element_id": "md", "content": "Redone."},
                },
            },
        ]
        assert (await asyncio.to_thread(batch, rework, 2)).code == 0
        assert [u.kind for u in card.updates[-2:]] == ["element_patch", "element_update"]
        assert card.text == "Redone."
        delete = {"action": "delete_elements", "params": {"element_ids": ["md"]}}
        assert (await asyncio.to_thread(batch, [delete], 3)).code == 0
        assert (card.elements, card.element_order, card.text) == ({}, [], "")
        gone = await asyncio.to_thread(batch, [text], 4)
        assert gone.code == 300302  # the fake's "element not found"


# --------------------------------------------------------------------------------------------
# Reading messages back: GET /im/v1/messages/:message_id through the SDK
# --------------------------------------------------------------------------------------------


def _get_message(message_id: str, card_content_type: str | None = None) -> GetMessageRequest:
    builder = GetMessageRequest.builder().message_id(message_id)
    if card_content_type is not None:
        builder = builder.card_msg_content_type(card_content_type)
    return builder.build()


async def test_get_message_returns_added_and_delivered_messages_as_feishu_does() -> None:
    # The fake runs in its own thread: the SDK's ``aget`` fetches its token with blocking I/O.
    with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}").run_in_thread() as server:
        fs = server.fake
        client = _sdk_client(fs)
        chat = "oc_5ce6d572455d361153b7cb51da133945"
        quoted_id = fs.add_message(text="明天下午三点开会", chat_id=chat)

        got = await client.im.v1.message.aget(_get_message(quoted_id))
        assert got.code == 0
        (item,) = got.data.items
        assert (item.message_id, item.chat_id, item.msg_type) == (quoted_id, chat, "text")
        assert json.loads(item.body.content) == {"text": "明天下午三点开会"}
        assert (item.sender.id, item.sender.id_type, item.sender.sender_type) == (
            SAMPLE_SENDER_OPEN_ID,
            "open_id",
            "user",
        )
        assert item.deleted is False

        # A delivered event is readable too (no client is connected: it stays pending), with
        # its mentions in the API shape.
        frame_id = server.deliver("group_text_mention", parent_id=quoted_id)
        mention_id = fs.delivery(frame_id).message_id
        assert mention_id is not None
        mention = (await client.im.v1.message.aget(_get_message(mention_id))).data.items[0]
        assert mention.parent_id == quoted_id
        assert [(m.key, m.id, m.id_type, m.name) for m in mention.mentions] == [
            ("@_user_1", BOT_OPEN_ID, "open_id", BOT_NAME)
        ]

        bot_reply = fs.add_message(text="好的", chat_id=chat, sender_type="app", root_id=quoted_id)
        sender = (await client.im.v1.message.aget(_get_message(bot_reply))).data.items[0].sender
        assert (sender.id, sender.id_type, sender.sender_type) == (fs.app_id, "app_id", "app")

        missing = await client.im.v1.message.aget(
            _get_message("om_dc13264520392913993dd051dba21dcf")
        )
        assert (missing.code, missing.msg) == (230011, "The message was withdrawn.")
        assert missing.raw.status_code == 400


async def test_get_message_flattens_a_bot_card_to_its_visible_text() -> None:
    with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}").run_in_thread() as server:
        fs = server.fake
        client = _sdk_client(fs)
        spec = {
            "schema": "2.0",
            "config": {"streaming_mode": True},
            "header": {"title": {"tag": "plain_text", "content": "GPT Bot"}},
            "body": {"elements": [{"tag": "markdown", "element_id": "md", "content": "..."}]},
        }
        created = await client.cardkit.v1.card.acreate(
            CreateCardRequest.builder()
            .request_body(
                CreateCardRequestBody.builder().type("card_json").data(json.dumps(spec)).build()
            )
            .build()
        )
        card_id = created.data.card_id
        streamed = await client.cardkit.v1.card_element.acontent(
            ContentCardElementRequest.builder()
            .card_id(card_id)
            .element_id("md")
            .request_body(
                ContentCardElementRequestBody.builder()
                .content("Paris is the capital of France.")
                .sequence(1)
                .build()
            )
            .build()
        )
        assert streamed.code == 0
        body = (
            CreateMessageRequestBody.builder()
            .receive_id("oc_a0553eda9014c201e6969b478895c230")
            .msg_type("interactive")
            .content(json.dumps({"type": "card", "data": {"card_id": card_id}}))
            .build()
        )
        sent = await client.im.v1.message.acreate(
            CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build()
        )
        message_id = sent.data.message_id

        item = (await client.im.v1.message.aget(_get_message(message_id))).data.items[0]
        assert item.msg_type == "interactive"
        assert (item.sender.id_type, item.sender.sender_type) == ("app_id", "app")
        assert json.loads(item.body.content) == {
            "title": "GPT Bot",
            "elements": [[{"tag": "text", "text": "Paris is the capital of France."}]],
        }

        as_sent = await client.im.v1.message.aget(_get_message(message_id, "user_card_content"))
        card_json = json.loads(as_sent.data.items[0].body.content)
        assert card_json["schema"] == "2.0"
        assert card_json["body"]["elements"][0]["content"] == "Paris is the capital of France."

        # Real Feishu hides a CardKit card's text behind an "upgrade your client" stub unless
        # the request asks for user_card_content.
        fs.degrade_v2_cards = True
        stub = (await client.im.v1.message.aget(_get_message(message_id))).data.items[0]
        flattened = json.loads(stub.body.content)
        assert "Paris" not in stub.body.content
        assert flattened["elements"][0][1] == {
            "tag": "text",
            "text": "请升级至最新版本客户端，以查看内容",
        }


def test_add_message_wants_exactly_one_of_text_and_content() -> None:
    fs = FakeFeishu()
    with pytest.raises(ValueError, match="exactly one"):
        fs.add_message(chat_id="oc_x")
    with pytest.raises(ValueError, match="exactly one"):
        fs.add_message(text="a", content='{"text": "a"}', chat_id="oc_x")
    with pytest.raises(ValueError, match="text message"):
        fs.add_message(text="a", msg_type="post", chat_id="oc_x")
    post = json.dumps({"zh_cn": {"title": "Plan", "content": [[{"tag": "text", "text": "go"}]]}})
    post_id = fs.add_message(content=post, msg_type="post", chat_id="oc_x", message_id="om_post")
    assert post_id == "om_post"
    assert fs.message_text(post_id) == "Plan\ngo"


def test_chat_event_builders_make_fresh_payloads_that_the_sdk_models_parse() -> None:
    before_ms = int(time.time() * 1000)
    entered_event = build_p2p_chat_entered_event(
        chat_id="oc_5ce6d572455d361153b7cb51da133945",
        operator_open_id="ou_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f",
        app_id="cli_a1b2c3d4e5f60718",
    )
    entered = JSON.unmarshal(json.dumps(entered_event), P2ImChatAccessEventBotP2pChatEnteredV1)
    assert entered.schema == "2.0"
    assert entered.header.event_type == "im.chat.access_event.bot_p2p_chat_entered_v1"
    assert entered.header.app_id == "cli_a1b2c3d4e5f60718"
    assert int(entered.header.create_time) >= before_ms
    assert entered.event.chat_id == "oc_5ce6d572455d361153b7cb51da133945"
    assert entered.event.operator_id.open_id == "ou_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"
    assert entered.event.operator_id.union_id.startswith("on_")
    assert entered.event.last_message_id.startswith("om_")
    assert entered.event.last_message_create_time.isdigit()

    added_event = build_bot_added_event(
        chat_id="oc_3f1b0e6a9c2d47e58b7a6c5d4e3f2a1b", chat_name="Release crew", event_id="ev_1"
    )
    added = JSON.unmarshal(json.dumps(added_event), P2ImChatMemberBotAddedV1)
    assert added.header.event_type == "im.chat.member.bot.added_v1"
    assert added.header.event_id == "ev_1"
    assert added.event.chat_id == "oc_3f1b0e6a9c2d47e58b7a6c5d4e3f2a1b"
    assert added.event.operator_id.open_id == SAMPLE_SENDER_OPEN_ID
    assert added.event.external is False
    assert added.event.operator_tenant_key == added.header.tenant_key
    assert added.event.name == "Release crew"
    assert (added.event.i18n_names.zh_cn, added.event.i18n_names.en_us) == (
        "Release crew",
        "Release crew",
    )

    again = build_bot_added_event()
    assert again["header"]["event_id"] != build_bot_added_event()["header"]["event_id"]
    assert again["event"]["chat_id"].startswith("oc_")
    assert FakeFeishu(app_id="cli_fake_app_0042").build_bot_added()["header"]["app_id"] == (
        "cli_fake_app_0042"
    )


def test_event_builder_makes_fresh_current_events_from_the_samples() -> None:
    first = build_message_event("group_text_mention", text="hello", mention_bot=True)
    second = build_message_event("group_text_mention", text="hello", mention_bot=True)
    message = first["event"]["message"]
    assert first["header"]["event_id"] != second["header"]["event_id"]
    assert message["message_id"] != second["event"]["message"]["message_id"]
    assert message["message_id"].startswith("om_")
    assert message["create_time"] == first["header"]["create_time"]
    assert json.loads(message["content"]) == {"text": "@_user_1 hello"}
    assert [m["id"]["open_id"] for m in message["mentions"]] == [BOT_OPEN_ID]

    plain = build_message_event(
        "p2p_text",
        text="hi",
        create_time_ms=1_700_000_000_000,
        overrides={"event.sender.sender_type": "app"},
    )
    assert plain["event"]["message"]["create_time"] == "1700000000000"
    assert plain["event"]["sender"]["sender_type"] == "app"
    assert build_message_event("p2p_text", mention_bot=False)["event"]["message"]["mentions"] == []


# --------------------------------------------------------------------------------------------
# Setup checks (what `doctor` asks): scopes, the bot feature, unknown apps, the WebSocket URL
# --------------------------------------------------------------------------------------------


async def test_granted_scopes_are_listed_as_the_sdk_reads_them() -> None:
    from lark_oapi.api.application.v6 import ListScopeRequest

    async with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}") as fs:
        client = _sdk_client(fs)
        listed = await asyncio.to_thread(
            client.application.v6.scope.list, ListScopeRequest.builder().build()
        )
        assert listed.code == 0
        assert {(s.scope_name, s.grant_status) for s in listed.data.scopes} == {
            (name, 1) for name in DEFAULT_SCOPES
        }

        fs.set_scopes(["im:message"], not_granted=["cardkit:card:write"])
        listed = await asyncio.to_thread(
            client.application.v6.scope.list, ListScopeRequest.builder().build()
        )
        assert [(s.scope_name, s.grant_status, s.scope_type) for s in listed.data.scopes] == [
            ("im:message", 1, "tenant"),
            ("cardkit:card:write", 2, "tenant"),
        ]


async def test_bot_info_answers_11205_for_an_app_without_the_bot_feature() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        token = (
            await http.post(
                "/open-apis/auth/v3/tenant_access_token/internal",
                json={"app_id": fs.app_id, "app_secret": fs.app_secret},
            )
        ).json()["tenant_access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        assert (await http.get("/open-apis/bot/v3/info", headers=auth)).json()["bot"][
            "activate_status"
        ] == 2

        fs.bot_enabled = False
        answer = await http.get("/open-apis/bot/v3/info", headers=auth)
        assert (answer.status_code, answer.json()) == (
            400,
            {"code": 11205, "msg": "app do not have bot"},
        )


async def test_unknown_app_ids_get_the_configured_answer() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        body = {"app_id": "cli_someone_else", "app_secret": fs.app_secret}
        path = "/open-apis/auth/v3/tenant_access_token/internal"
        assert (await http.post(path, json=body)).json() == {
            "code": 10003,
            "msg": "app_id not found",
        }
        fs.unknown_app_error = (10014, "app id not exists")
        assert (await http.post(path, json=body)).json() == {
            "code": 10014,
            "msg": "app id not exists",
        }


async def test_the_endpoint_discovery_can_hand_out_another_websocket_url() -> None:
    async with FakeFeishu(ws_url="ws://127.0.0.1:9/ws") as fs, httpx.AsyncClient() as http:
        answer = await http.post(
            f"{fs.domain}/callback/ws/endpoint",
            json={"AppID": fs.app_id, "AppSecret": fs.app_secret},
        )
        assert answer.json()["data"]["URL"].startswith("ws://127.0.0.1:9/ws?device_id=")


# --------------------------------------------------------------------------------------------
# Media: speech to text, image upload, message resources
# --------------------------------------------------------------------------------------------

SPEECH_PATH = "/open-apis/speech_to_text/v1/speech/file_recognize"
IMAGES_PATH = "/open-apis/im/v1/images"
FILE_ID = "voice_0123456789"  # Feishu wants exactly 16 characters
PNG = solid_png(8, 8, (0, 160, 80))


def _resource_path(file_key: str, message_id: str = "om_dc13264520392913993dd051dba21dcf") -> str:
    return f"/open-apis/im/v1/messages/{message_id}/resources/{file_key}"


def _pcm(seconds: float) -> bytes:
    """Silence of 16 kHz mono s16le PCM."""
    return bytes(int(seconds * SPEECH_BYTES_PER_SECOND))


def _speech_body(
    pcm: bytes, *, file_id: Any = FILE_ID, fmt: Any = "pcm", engine: Any = "16k_auto"
) -> dict[str, Any]:
    return {
        "speech": {"speech": base64.b64encode(pcm).decode("ascii")},
        "config": {"file_id": file_id, "format": fmt, "engine_type": engine},
    }


async def _tenant_auth(http: httpx.AsyncClient, fs: FakeFeishu) -> dict[str, str]:
    answer = await http.post(
        "/open-apis/auth/v3/tenant_access_token/internal",
        json={"app_id": fs.app_id, "app_secret": fs.app_secret},
    )
    return {"Authorization": f"Bearer {answer.json()['tenant_access_token']}"}


async def _upload(
    http: httpx.AsyncClient,
    auth: dict[str, str],
    data: bytes,
    *,
    image_type: str = "message",
    content_type: str = "image/png",
) -> httpx.Response:
    return await http.post(
        IMAGES_PATH,
        headers=auth,
        data={"image_type": image_type},
        files={"image": ("image.png", data, content_type)},
    )


async def test_speech_is_recognised_through_the_sdk_and_the_audio_is_recorded() -> None:
    with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}").run_in_thread() as server:
        fs = server.fake
        fs.speech_text = "明天天气怎么样"
        request = (
            FileRecognizeSpeechRequest.builder()
            .request_body(
                FileRecognizeSpeechRequestBody.builder()
                .speech(Speech.builder().speech(base64.b64encode(_pcm(2.5)).decode()).build())
                .config(
                    FileConfig.builder()
                    .file_id(FILE_ID)
                    .format("pcm")
                    .engine_type("16k_auto")
                    .build()
                )
                .build()
            )
            .build()
        )
        answer = await _sdk_client(fs).speech_to_text.v1.speech.afile_recognize(request)

        assert (answer.code, answer.msg) == (0, "success")
        assert answer.data.recognition_text == "明天天气怎么样"
        [heard] = fs.speech_requests
        assert (heard.byte_count, heard.seconds, heard.file_id, heard.code) == (
            80_000,
            2.5,
            FILE_ID,
            0,
        )
        [call] = fs.calls_to("speech_file_recognize")
        assert call.seq == heard.call_seq
        assert call.json["config"] == {
            "file_id": FILE_ID,
            "format": "pcm",
            "engine_type": "16k_auto",
        }

        fs.speech_text = lambda request: f"{request.seconds:.0f} seconds of silence"
        again = await _sdk_client(fs).speech_to_text.v1.speech.afile_recognize(request)
        assert again.data.recognition_text == "2 seconds of silence"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"config": {"file_id": FILE_ID, "format": "pcm", "engine_type": "16k_auto"}},
            "speech.speech",
        ),
        (
            {
                "speech": {"speech": "not base64!"},
                "config": {"file_id": FILE_ID, "format": "pcm", "engine_type": "16k_auto"},
            },
            "speech.speech",
        ),
        (_speech_body(_pcm(1), file_id=None), "config.file_id"),
        (_speech_body(_pcm(1), file_id="short_id"), "config.file_id"),
        (_speech_body(_pcm(1), file_id="seventeen_chars_x"), "config.file_id"),
        (_speech_body(_pcm(1), fmt="opus"), "config.format"),
        (_speech_body(_pcm(1), engine="8k_auto"), "config.engine_type"),
    ],
    ids=["no-speech", "not-base64", "no-file-id", "short-id", "long-id", "opus", "8k-engine"],
)
async def test_speech_requests_feishu_refuses_fail_field_validation(
    body: dict[str, Any], field: str
) -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        answer = await http.post(SPEECH_PATH, headers=await _tenant_auth(http, fs), json=body)

    assert answer.status_code == 400
    payload = answer.json()
    assert (payload["code"], payload["msg"]) == (CODE_FIELD_VALIDATION, "field validation failed")
    assert [v["field"] for v in payload["error"]["field_violations"]] == [field]


async def test_speech_longer_than_sixty_seconds_is_refused() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        at_limit = await http.post(SPEECH_PATH, headers=auth, json=_speech_body(_pcm(60)))
        too_long = await http.post(
            SPEECH_PATH, headers=auth, json=_speech_body(_pcm(60) + b"\x00\x00")
        )

    assert at_limit.json()["data"] == {"recognition_text": "recognized speech"}
    assert too_long.status_code == 400
    assert too_long.json() == {"code": CODE_SPEECH_TOO_LONG, "msg": "audio duration exceeds 60s"}
    assert [(r.seconds, r.code) for r in fs.speech_requests] == [
        (60.0, 0),
        (60.0 + 2 / SPEECH_BYTES_PER_SECOND, CODE_SPEECH_TOO_LONG),
    ]


async def test_speech_scope_not_granted_is_access_denied_naming_the_scope() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        fs.set_scopes([])  # scopes that are not listed are not checked
        allowed = await http.post(SPEECH_PATH, headers=auth, json=_speech_body(_pcm(1)))
        fs.set_scopes(DEFAULT_SCOPES, not_granted=["speech_to_text:speech"])
        denied = await http.post(SPEECH_PATH, headers=auth, json=_speech_body(_pcm(1)))
        unauthenticated = await http.post(SPEECH_PATH, json=_speech_body(_pcm(1)))

    assert allowed.json()["code"] == 0
    assert denied.status_code == 400
    assert denied.json()["code"] == CODE_SCOPE_MISSING
    assert denied.json()["msg"].startswith(
        "Access denied. One of the following scopes is required: [speech_to_text:speech]."
    )
    assert unauthenticated.json()["code"] == 99991661
    assert len(fs.speech_requests) == 1  # a denied request never reaches recognition


async def test_uploaded_image_bytes_are_kept_and_served_back_through_the_sdk() -> None:
    with FakeFeishu(app_id=f"cli_{uuid.uuid4().hex[:12]}").run_in_thread() as server:
        fs = server.fake
        client = _sdk_client(fs)
        uploaded = await client.im.v1.image.acreate(
            CreateImageRequest.builder()
            .request_body(
                CreateImageRequestBody.builder()
                .image_type("message")
                .image(io.BytesIO(PNG))
                .build()
            )
            .build()
        )
        assert uploaded.code == 0
        image_key = uploaded.data.image_key
        assert image_key.startswith("img_v3_")
        [image] = fs.uploaded_images()
        assert (image.image_key, image.data, image.image_type) == (image_key, PNG, "message")
        assert image.content_type == "image/png"  # the SDK sends a generic type: sniffed
        [call] = fs.calls_to("image_upload")
        assert call.files["image"].data == PNG
        assert json.loads(json.dumps(call.json))["image"]["size"] == len(PNG)  # JSON-friendly
        assert call.json["image_type"] == "message"

        downloaded = await client.im.v1.message_resource.aget(
            GetMessageResourceRequest.builder()
            .message_id("om_dc13264520392913993dd051dba21dcf")
            .file_key(image_key)
            .type("image")
            .build()
        )
        assert downloaded.code == 0
        assert downloaded.file.read() == PNG
        assert downloaded.raw.headers["content-type"] == "image/png"
        assert downloaded.raw.headers["content-length"] == str(len(PNG))


async def test_image_upload_keeps_the_given_content_type_and_accepts_every_image_format() -> None:
    jpeg = b"\xff\xd8\xff\xe0" + bytes(32)
    samples = {
        "image/jpeg": jpeg,
        "image/gif": b"GIF89a" + bytes(16),
        "image/webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8),
        "image/bmp": b"BM" + bytes(32),
    }
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        keys = {}
        for content_type, data in samples.items():
            answer = await _upload(http, auth, data, content_type=content_type)
            keys[content_type] = answer.json()["data"]["image_key"]
        avatar = await _upload(http, auth, PNG, image_type="avatar")
        served = await http.get(f"/open-apis/im/v1/images/{keys['image/jpeg']}", headers=auth)

    assert avatar.json()["code"] == 0
    assert [(i.content_type, i.data) for i in fs.uploaded_images()[:4]] == list(samples.items())
    assert fs.uploaded_images()[-1].image_type == "avatar"
    assert fs.resources[keys["image/gif"]] == (samples["image/gif"], "image/gif")
    assert (served.content, served.headers["content-type"]) == (jpeg, "image/jpeg")


@pytest.mark.parametrize(
    ("data", "image_type", "code"),
    [
        (PNG, "sticker", CODE_FIELD_VALIDATION),
        (b"", "message", CODE_IMAGE_EMPTY),
        (b"%PDF-1.7 not an image", "message", CODE_IMAGE_TYPE_UNSUPPORTED),
        (PNG + bytes(MAX_IMAGE_BYTES), "message", CODE_IMAGE_TOO_LARGE),
    ],
    ids=["image-type", "empty", "not-an-image", "over-10-MB"],
)
async def test_image_uploads_feishu_refuses_are_answered_with_its_codes(
    data: bytes, image_type: str, code: int
) -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        answer = await _upload(http, await _tenant_auth(http, fs), data, image_type=image_type)

    assert answer.status_code == 400
    assert answer.json()["code"] == code
    assert fs.uploaded_images() == []


async def test_image_upload_without_the_image_part_fails_field_validation() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        answer = await http.post(
            IMAGES_PATH,
            headers=await _tenant_auth(http, fs),
            files={"image_type": (None, "message")},
        )

    assert answer.json()["code"] == CODE_FIELD_VALIDATION
    assert answer.json()["error"]["field_violations"][0]["field"] == "image"


async def test_message_resources_check_the_type_and_the_kind() -> None:
    voice = b"OggS\x00\x02" + bytes(100)
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        fs.add_resource("file_v3_voice", voice, "audio/ogg", kind="file")
        fs.add_resource("img_v3_legacy", PNG, "image/png")  # no kind: either type is served

        ok = await http.get(_resource_path("file_v3_voice"), headers=auth, params={"type": "file"})
        wrong_kind = await http.get(
            _resource_path("file_v3_voice"), headers=auth, params={"type": "image"}
        )
        no_type = await http.get(_resource_path("file_v3_voice"), headers=auth)
        bad_type = await http.get(
            _resource_path("file_v3_voice"), headers=auth, params={"type": "audio"}
        )
        legacy = await http.get(
            _resource_path("img_v3_legacy"), headers=auth, params={"type": "file"}
        )
        made_up = await http.get(
            _resource_path("file_v3_unknown"), headers=auth, params={"type": "file"}
        )
        fs.strict_resources = True
        missing = await http.get(
            _resource_path("file_v3_unknown"), headers=auth, params={"type": "file"}
        )

    assert ok.status_code == 200
    assert (ok.content, ok.headers["content-type"]) == (voice, "audio/ogg")
    assert ok.headers["content-length"] == str(len(voice))
    assert (wrong_kind.status_code, wrong_kind.json()) == (
        400,
        {"code": CODE_RESOURCE_INVALID_PARAM, "msg": "Invalid request param."},
    )
    assert no_type.json()["code"] == CODE_FIELD_VALIDATION
    assert no_type.json()["error"]["field_violations"][0]["field"] == "type"
    assert bad_type.json()["code"] == CODE_FIELD_VALIDATION
    assert legacy.content == PNG
    assert made_up.content == b"fake file file_v3_unknown"  # lenient by default
    assert (missing.status_code, missing.json()) == (
        400,
        {"code": CODE_FILE_NOT_IN_MESSAGE, "msg": "File not in msg."},
    )


async def test_im_resource_scope_not_granted_denies_uploads_and_downloads() -> None:
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        fs.add_resource("file_v3_voice", b"OggS", "audio/ogg", kind="file")
        fs.set_scopes(DEFAULT_SCOPES, not_granted=["im:resource"])
        upload = await _upload(http, auth, PNG)
        download = await http.get(
            _resource_path("file_v3_voice"), headers=auth, params={"type": "file"}
        )

    for denied in (upload, download):
        assert denied.status_code == 400
        assert denied.json()["code"] == CODE_SCOPE_MISSING
        assert "[im:resource]" in denied.json()["msg"]
        assert f"open.feishu.cn/app/{fs.app_id}/auth?q=im:resource" in denied.json()["msg"]
    assert fs.uploaded_images() == []


async def test_media_endpoints_take_injected_faults_holds_and_delays() -> None:
    assert {"speech_file_recognize", "image_upload", "message_resource"} <= ENDPOINTS
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)

        fs.fail("speech_file_recognize", "rate_limited", headers={"x-ogw-ratelimit-reset": "2"})
        limited = await http.post(SPEECH_PATH, headers=auth, json=_speech_body(_pcm(1)))
        assert (limited.status_code, limited.json()["code"]) == (429, 99991400)
        assert limited.headers["x-ogw-ratelimit-reset"] == "2"

        fs.fail("image_upload", 1, "internal error", 500)
        broken = await _upload(http, auth, PNG)
        assert (broken.status_code, broken.json()) == (500, {"code": 1, "msg": "internal error"})
        assert fs.calls_to("image_upload")[-1].injected == "fail 500 code=1"
        assert fs.uploaded_images() == []  # an injected failure stores nothing

        gate = fs.hold("message_resource")
        pending = asyncio.ensure_future(
            http.get(_resource_path("img_v3_x"), headers=auth, params={"type": "image"})
        )
        await gate.wait_arrived(5)
        assert not pending.done()
        gate.release()
        assert (await asyncio.wait_for(pending, 5)).status_code == 200

        held = fs.hold("speech_file_recognize")
        with pytest.raises(httpx.ReadTimeout):
            await http.post(SPEECH_PATH, headers=auth, json=_speech_body(_pcm(1)), timeout=0.3)
        held.release()

        fs.delay("image_upload", 0.2, times=1)
        started = time.monotonic()
        assert (await _upload(http, auth, PNG)).json()["code"] == 0
        assert time.monotonic() - started >= 0.2

    assert len(fs.calls_to("speech_file_recognize")) == 2
    assert [c.status for c in fs.calls_to("message_resource")] == [200]


async def test_a_cut_call_resets_its_connection_with_no_answer_and_no_effect() -> None:
    card = {"schema": "2.0", "body": {"elements": [{"tag": "markdown", "content": "hi"}]}}
    body = {"type": "card_json", "data": json.dumps(card)}
    async with FakeFeishu() as fs, httpx.AsyncClient(base_url=fs.domain) as http:
        auth = await _tenant_auth(http, fs)
        fs.cut("card_create")
        with pytest.raises(httpx.TransportError):
            await http.post("/open-apis/cardkit/v1/cards", headers=auth, json=body)
        assert fs.cards == {}
        created = await http.post("/open-apis/cardkit/v1/cards", headers=auth, json=body)
        assert created.json()["code"] == 0
    cut, answered = fs.calls_to("card_create")
    assert (cut.injected, cut.status) == ("cut", None)
    assert (answered.injected, answered.status) == (None, 200)
    assert list(fs.cards) == [created.json()["data"]["card_id"]]
