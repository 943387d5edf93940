"""How a failed LLM request affects its key and whether it is retried.

Classification follows the OpenAI SDK's exception classes and the error body's ``code``:

========================================  ===========  ==========================================
error                                     outcome      what happens
========================================  ===========  ==========================================
429 ``rate_limit_exceeded`` (other 429)   RATE_LIMIT   cool the key (Retry-After), other key now
401, 403, 402, 429 ``insufficient_quota``  KEY_DEAD     disable the key with the reason, other key
5xx, 408, 409, timeouts, connection       TRANSIENT    back off with jitter, count on the key
400, 404, 422 (``context_length…``)       REJECTED     no retry, no penalty; the caller handles it
========================================  ===========  ==========================================
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import openai


class Outcome(Enum):
    """What an error means for the key and the retry."""

    RATE_LIMIT = "rate_limit"
    KEY_DEAD = "key_dead"
    TRANSIENT = "transient"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Classified:
    """An error, classified: its outcome, a short reason (no secrets), and a Retry-After."""

    outcome: Outcome
    reason: str
    retry_after_s: float | None = None
    code: str | None = None


_QUOTA_WORDS = re.compile(r"quota|billing|balance|credit|payment|余额|欠费", re.IGNORECASE)
_DURATION_PART = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)")


def classify(exc: BaseException) -> Classified:
    """Classify an exception raised by a request or while reading its first chunk."""
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc)
    if isinstance(exc, openai.APITimeoutError):
        return Classified(Outcome.TRANSIENT, "timeout")
    if isinstance(exc, openai.APIConnectionError):
        return Classified(Outcome.TRANSIENT, "connection error")
    if isinstance(exc, openai.APIError):
        return Classified(Outcome.TRANSIENT, f"API error: {exc.code or type(exc).__name__}")
    return Classified(Outcome.TRANSIENT, type(exc).__name__)


def _classify_status(exc: openai.APIStatusError) -> Classified:
    status = exc.status_code
    code = exc.code or _body_field(exc.body, "type")
    message = str(_body_field(exc.body, "message") or exc.message or "")
    label = f"{status} {code}" if code else str(status)
    if status == 429:
        if code == "insufficient_quota" or _QUOTA_WORDS.search(message):
            return Classified(Outcome.KEY_DEAD, f"{label}: quota exhausted", code=code)
        headers = exc.response.headers
        return Classified(
            Outcome.RATE_LIMIT, label, retry_after_s=retry_after_seconds(headers), code=code
        )
    if status in (401, 403):
        return Classified(Outcome.KEY_DEAD, f"{label}: key refused", code=code)
    if status == 402:
        return Classified(Outcome.KEY_DEAD, f"{label}: payment required", code=code)
    if status >= 500 or status in (408, 409):
        return Classified(
            Outcome.TRANSIENT, label, retry_after_s=retry_after_seconds(exc.response.headers)
        )
    return Classified(Outcome.REJECTED, label, code=code)


def _body_field(body: object, name: str) -> Any:
    if isinstance(body, dict):
        return body.get(name)
    return None


def retry_after_seconds(headers: Any, *, now: float | None = None) -> float | None:
    """Seconds to wait, from ``retry-after-ms``, ``retry-after`` or ``x-ratelimit-reset-requests``.

    None when the headers carry no usable hint.
    """
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError):
                moment = None
            if moment is not None:
                return max(0.0, moment - (time.time() if now is None else now))
    value = headers.get("x-ratelimit-reset-requests")
    if value:
        return parse_duration(value)
    return None


def parse_duration(text: str) -> float | None:
    """Parse OpenAI's reset durations such as ``20s``, ``1m30s``, ``6ms``, ``1h2m``."""
    total = 0.0
    matched = ""
    factors = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for part in _DURATION_PART.finditer(text.strip()):
        total += float(part.group("value")) * factors[part.group("unit")]
        matched += part.group(0)
    return total if matched and matched == text.strip() else None
