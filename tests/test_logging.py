"""Logging: structured lines, and no secret survives in any rendered line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bot.logging import Redactor, configure_logging, contains_api_key, get_logger, mask_key
from tests.test_key_shapes import OPENAI_LEGACY, SAMPLE_IDS, SAMPLES

APP_SECRET = "Zq8VvY2u6wXkR1pLm3nB7cT9dE4fG5hJ"
CONFIGURED_KEY = "azure-0123456789abcdef0123456789abcdef"
SK_KEY = "sk-proj-AbCdEf0123456789GhIjKlMnOpQrStUv"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(level="debug", json=True, secrets=[APP_SECRET, CONFIGURED_KEY], stream=stream)
    yield stream
    configure_logging(level="warning", stream=io.StringIO())


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_mask_key_shows_prefix_and_last_four() -> None:
    assert mask_key("sk-abcdefghijklmnop1234") == "sk-…1234"
    assert mask_key(SK_KEY) == "sk-proj-…StUv"
    assert mask_key("0123456789abcdef") == "…cdef"
    assert mask_key("short") == "…"


def test_contains_api_key_still_answers_for_every_key_shape() -> None:
    assert contains_api_key(f"我的key是{OPENAI_LEGACY}")
    assert all(contains_api_key(f"try {key}") for _, key, _ in SAMPLES)
    assert not contains_api_key(
        "pip install sk-learn; see commit 3f5669d54579033ec6a1b1c9913510e7e42963cb"
    )


def test_json_lines_carry_event_level_logger_and_fields(captured: io.StringIO) -> None:
    get_logger("bot.test").info("reply_streamed", conversation="p2p:ou_1", chars=42)
    (line,) = lines(captured)
    assert line["event"] == "reply_streamed"
    assert line["level"] == "info"
    assert line["logger"] == "bot.test"
    assert line["conversation"] == "p2p:ou_1"
    assert line["chars"] == 42
    assert "timestamp" in line


def test_no_secret_survives_in_messages_fields_or_nested_values(captured: io.StringIO) -> None:
    log = get_logger("bot.test")
    log.info(f"using {SK_KEY}", key=SK_KEY, app_secret=APP_SECRET)
    log.warning("nested", detail={"keys": [CONFIGURED_KEY, {"deep": SK_KEY}]})
    output = captured.getvalue()
    for secret in (APP_SECRET, CONFIGURED_KEY, SK_KEY):
        assert secret not in output
    assert "sk-proj-…StUv" in output


@pytest.mark.parametrize(("kind", "key", "masked"), SAMPLES, ids=SAMPLE_IDS)
def test_a_log_line_with_any_key_shape_is_masked(
    captured: io.StringIO, kind: str, key: str, masked: str
) -> None:
    get_logger("bot.test").warning(
        f"provider said no to {key}", detail={"sent": [f"我的key是{key}"]}
    )
    logging.getLogger("Lark").info("request with %s failed", key)
    logging.getLogger("httpx").warning(f"GET https://api.example/v1?x=1&k={key} 401")
    output = captured.getvalue()
    assert key not in output
    assert masked in output
    assert len(lines(captured)) == 3


def test_the_app_secret_is_masked_even_inside_a_longer_word(captured: io.StringIO) -> None:
    logging.getLogger("Lark").info(f"signature base: ts1700000000{APP_SECRET}nonce")
    assert APP_SECRET not in captured.getvalue()


def test_a_short_configured_secret_is_still_masked() -> None:
    assert Redactor(["pa55wd"]).text("password is pa55wd!") == "password is …!"


def test_no_secret_survives_in_exception_messages_and_tracebacks(captured: io.StringIO) -> None:
    try:
        raise RuntimeError(f"auth failed for {SK_KEY} with secret {APP_SECRET}")
    except RuntimeError:
        get_logger("bot.test").exception("request_failed")
    output = captured.getvalue()
    assert "RuntimeError" in output
    assert SK_KEY not in output
    assert APP_SECRET not in output


def test_sdk_logger_lines_are_redacted_and_routed_through_our_handler(
    captured: io.StringIO,
) -> None:
    lark = logging.getLogger("Lark")
    lark.info(
        "connected to wss://msg-frontier.feishu.cn/ws/v2?fpid=493&aid=552564"
        "&device_id=7393&access_key=0f8e2a7c19d64b3b8e5f&service_id=33554678"
        "&ticket=7c0b7d9e-5d2f-4a31-9a57-1d2c3b4a5e6f"
    )
    output = captured.getvalue()
    (line,) = lines(captured)
    assert line["logger"] == "Lark"
    assert "0f8e2a7c19d64b3b8e5f" not in output
    assert "7c0b7d9e-5d2f-4a31-9a57-1d2c3b4a5e6f" not in output
    assert "access_key=***" in output


def test_sdk_debug_payloads_are_dropped_even_if_the_sdk_resets_its_level() -> None:
    stream = io.StringIO()
    configure_logging(level="debug", json=True, sdk_level="info", stream=stream)
    lark = logging.getLogger("Lark")
    lark.setLevel(logging.DEBUG)  # what lark_oapi.ws.Client does with its own log_level
    lark.debug('receive message, payload: {"text": "private"}')
    lark.info("visible")
    assert "private" not in stream.getvalue()
    assert "visible" in stream.getvalue()


def test_sdk_keeps_no_handler_of_its_own_so_nothing_bypasses_redaction(
    captured: io.StringIO,
) -> None:
    assert logging.getLogger("Lark").handlers == []


def test_credentials_in_urls_headers_and_json_are_masked() -> None:
    redactor = Redactor()
    text = redactor.text(
        'Authorization: Bearer t-g1044qGLDPOIU6NQQRGEHABCDEFGH0123 {"AppSecret": "abcdef123456"}'
        " tenant_access_token=t-g1044qKLMNOPQRSTUVWXYZ01234567"
    )
    assert "g1044q" not in text
    assert "abcdef123456" not in text


def test_secrets_registered_later_are_masked_from_then_on(captured: io.StringIO) -> None:
    donated = "donated-key-that-looks-like-nothing-0042"
    redactor = configure_logging(level="info", json=True, stream=captured)
    redactor.add(donated)
    get_logger("bot.test").info("key_added", raw=donated)
    assert donated not in captured.getvalue()
    assert "…0042" in captured.getvalue()


def test_console_output_is_redacted_too() -> None:
    stream = io.StringIO()
    configure_logging(level="info", json=False, secrets=[APP_SECRET], stream=stream)
    get_logger("bot.test").info("starting", secret=APP_SECRET, key=SK_KEY)
    output = stream.getvalue()
    assert "starting" in output
    assert APP_SECRET not in output
    assert SK_KEY not in output
