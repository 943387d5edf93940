"""The arrival journal's hook on the SDK's real dispatcher: what it journals, what it passes on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lark_oapi.api.im.v1 import P2ImMessageReceiveV1
from lark_oapi.channel import FeishuChannel

from bot.feishu import sdk_compat

SAMPLES = Path(__file__).parent / "fakes" / "samples"


def _hooked_channel(
    hook: Callable[[str, str], None] | None = None,
) -> tuple[Any, list[tuple[str, str]], list[Any]]:
    """A channel whose message events are hooked (by default into the returned journal list)."""
    channel = FeishuChannel(app_id="cli_test", app_secret="secret", domain="http://127.0.0.1:9")
    journaled: list[tuple[str, str]] = []
    passed_on: list[Any] = []
    # Stands in for the channel's own handler, which would schedule the event on its loop.
    channel._on_p2_im_message_receive_v1 = passed_on.append  # type: ignore[attr-defined]
    sdk_compat.hook_message_events(
        channel, hook or (lambda message_id, event: journaled.append((message_id, event)))
    )
    return channel, journaled, passed_on


def test_the_payload_is_journaled_as_feishu_sent_it_and_the_event_goes_on() -> None:
    channel, journaled, passed_on = _hooked_channel()
    payload = (SAMPLES / "p2p_text.json").read_bytes()
    message_id = json.loads(payload)["event"]["message"]["message_id"]

    channel._build_dispatcher()._do_without_validation(payload)

    assert journaled == [(message_id, payload.decode("utf-8"))]
    (event,) = passed_on
    assert isinstance(event, P2ImMessageReceiveV1)
    assert event.event.message.message_id == message_id


def test_a_journaled_payload_replays_as_the_same_event() -> None:
    from lark_oapi.core.json import JSON

    channel, journaled, _ = _hooked_channel()
    payload = (SAMPLES / "group_text_mention.json").read_bytes()
    channel._build_dispatcher()._do_without_validation(payload)

    ((_, event),) = journaled
    replayed = JSON.unmarshal(event, P2ImMessageReceiveV1)
    original = JSON.unmarshal(payload.decode("utf-8"), P2ImMessageReceiveV1)
    assert JSON.marshal(replayed) == JSON.marshal(original)


def test_an_event_delivered_without_the_dispatcher_is_journaled_from_its_typed_form() -> None:
    from lark_oapi.core.json import JSON

    channel, journaled, passed_on = _hooked_channel()
    payload = (SAMPLES / "p2p_text.json").read_text("utf-8")
    event = JSON.unmarshal(payload, P2ImMessageReceiveV1)

    channel._on_p2_im_message_receive_v1(event)

    ((message_id, journaled_event),) = journaled
    assert message_id == event.event.message.message_id
    assert json.loads(journaled_event)["event"]["message"]["message_id"] == message_id
    assert passed_on == [event]


def test_a_failing_journal_does_not_stop_the_event() -> None:
    def broken(message_id: str, event: str) -> None:
        raise OSError("disk full")

    channel, _, passed_on = _hooked_channel(broken)
    channel._build_dispatcher()._do_without_validation((SAMPLES / "p2p_text.json").read_bytes())

    assert len(passed_on) == 1
