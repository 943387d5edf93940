"""A journaled event replays as the event the SDK's dispatcher made of the frame's payload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lark_oapi.api.im.v1 import P2ImMessageReceiveV1
from lark_oapi.channel import FeishuChannel
from lark_oapi.core.json import JSON

SAMPLES = Path(__file__).parent / "fakes" / "samples"


@pytest.mark.parametrize("sample", ["p2p_text", "group_text_mention", "p2p_post", "p2p_image"])
def test_a_journaled_payload_replays_as_the_event_the_dispatcher_made_of_it(sample: str) -> None:
    # The long-connection process journals the frame's payload as text (bot/feishu/ingress.py);
    # the gateway replays it with sdk_compat.replay_message_event, which unmarshals that text.
    channel = FeishuChannel(app_id="cli_test", app_secret="secret", domain="http://127.0.0.1:9")
    dispatched: list[Any] = []
    channel._on_p2_im_message_receive_v1 = dispatched.append  # type: ignore[attr-defined]
    payload = (SAMPLES / f"{sample}.json").read_bytes()

    channel._build_dispatcher()._do_without_validation(payload)

    (original,) = dispatched
    replayed = JSON.unmarshal(payload.decode("utf-8"), P2ImMessageReceiveV1)
    assert JSON.marshal(replayed) == JSON.marshal(original)
