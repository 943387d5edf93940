"""Classifying provider errors, and reading Retry-After in its several spellings."""

from __future__ import annotations

import pytest

from bot.llm.errors import parse_duration, retry_after_seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "20", "x-ratelimit-reset-requests": "5s"}, 20.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-reset-requests": "6ms"}, 0.006),
        ({"retry-after": "Wed, 25 Nov 2026 10:00:30 GMT"}, 30.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_from_every_header_providers_use(
    headers: dict[str, str], seconds: float | None
) -> None:
    now = 1_795_600_800.0  # 2026-11-25 10:00:00 GMT
    assert (
        retry_after_seconds(headers, now=now) == pytest.approx(seconds)
        if seconds
        else (retry_after_seconds(headers, now=now) is None)
    )


def test_durations_must_parse_whole() -> None:
    assert parse_duration("1h2m") == 3720.0
    assert parse_duration("20s") == 20.0
    assert parse_duration("20 seconds") is None
    assert parse_duration("") is None
