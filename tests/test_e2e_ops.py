"""Health and metrics end to end: `python -m bot run` with `ops.http`, between the fakes.

Slow suite (`make test-all`): each test starts the real bot process and reads its endpoints over
HTTP, as a probe and Prometheus would.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.llm.keypool import key_id_of
from tests.e2e_harness import LLM_KEY, USER_A, USER_B, BotProcess, World, make_world

pytestmark = pytest.mark.slow

FOOTER = re.compile(
    r"\n\n_gpt-4o-mini · \d+\.\d s · [\d,]+ tokens \([\d,]+ in, [\d,]+ out\) · key [0-9a-f]{12}_$"
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def world(tmp_path: Path, port: int) -> Iterator[World]:
    yield from make_world(tmp_path, ops={"http": f"127.0.0.1:{port}"}, chat={"footer": "full"})


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(port, "/healthz")
    return status, json.loads(body)


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_two_answered_messages_and_the_footer_shows_under_each(
    world: World, port: int
) -> None:
    world.llm.default.chunk_size = 3
    world.start_bot()
    status, report = health(port)
    assert status == 200
    assert report["failing"] == []
    assert report["checks"]["feishu"] == {"ok": True, "detail": "connected"}
    before = scrape(port)

    messages = [
        world.send("p2p_text", text="first question", sender_open_id=USER_A),
        world.send("p2p_text", text="second question", sender_open_id=USER_B),
    ]
    texts = [world.wait_for_final_reply(message, containing=" · key ") for message in messages]
    world.bots[0].wait_for_event("reply_sent", count=2)
    after = scrape(port)

    for text, question in zip(texts, ("first question", "second question"), strict=True):
        assert text.startswith(f"echo: {question}\n\n_gpt-4o-mini · ")
        assert FOOTER.search(text), text
    prefix = "feishu_gpt_bot_"
    assert moved(before, after, prefix + "messages_received_total") == 2
    assert moved(before, after, prefix + "messages_answered_total", outcome="complete") == 2
    assert moved(before, after, prefix + "answer_seconds_count") == 2
    assert moved(before, after, prefix + "first_text_seconds_count") == 2
    key_id = key_id_of(LLM_KEY)
    assert moved(before, after, prefix + "llm_calls_total", key_id=key_id, outcome="ok") == 2
    assert after[(prefix + "feishu_connected", ())] == 1
    assert after[(prefix + "inbox_messages", ())] == 0
    assert after[(prefix + "keys", (("state", "active"),))] == 1


def test_healthz_is_503_naming_feishu_while_the_connection_is_down_and_200_once_back(
    world: World, port: int
) -> None:
    bot = world.start_bot()
    assert health(port)[0] == 200
    gate = world.fs.hold("ws_endpoint")  # the reconnect waits here until released
    world.feishu.drop_connections()
    bot.wait_for_event("feishu_reconnecting")
    gate.wait_arrived_blocking(timeout=10)

    status, report = health(port)
    assert status == 503
    assert report["failing"] == ["feishu"]
    assert report["checks"]["feishu"] == {"ok": False, "detail": "reconnecting"}
    during = scrape(port)
    assert during[("feishu_gpt_bot_feishu_connected", ())] == 0
    assert during[("feishu_gpt_bot_feishu_reconnects_total", ())] == 1

    gate.release()
    bot.wait_for_event("feishu_reconnected")
    assert health(port)[0] == 200
    assert scrape(port)[("feishu_gpt_bot_feishu_connected", ())] == 1


def test_healthz_is_503_naming_the_keys_once_the_only_key_is_refused(
    world: World, port: int
) -> None:
    bot = world.start_bot()
    world.llm.invalidate(LLM_KEY)
    message = world.send("p2p_text", text="hello", sender_open_id=USER_A)
    text = world.wait_for_final_reply(message)
    bot.wait_for_event("reply_sent")
    assert "out of service" in text
    assert " · " not in text  # an apology has no footer

    status, report = health(port)
    assert status == 503
    assert report["failing"] == ["keys"]
    assert report["checks"]["keys"]["detail"] == "every key is disabled (1 disabled)"
    samples = scrape(port)
    key_id = key_id_of(LLM_KEY)
    assert samples[("feishu_gpt_bot_llm_calls_total", (("key_id", key_id), ("outcome", "auth")))]
    assert samples[("feishu_gpt_bot_messages_answered_total", (("outcome", "failed"),))] == 1
    assert samples[("feishu_gpt_bot_answer_seconds_count", ())] == 0
    assert samples[("feishu_gpt_bot_keys", (("state", "disabled"),))] == 1


def test_a_busy_ops_port_stops_the_bot_at_start_with_a_clear_error(world: World, port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        bot = BotProcess(world.workdir, world.settings_path).start()
        world.bots.append(bot)
        assert bot.wait(30) == 1
    assert f"error: ops.http: cannot listen on 127.0.0.1:{port}: " in bot.output
    assert world.fs.open_connections() == []  # it stopped before connecting
