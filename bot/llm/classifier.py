"""What a failed LLM request means for its key, and whether the request is retried.

Decided from the HTTP status and the *codes* of the error body (``error.code``, ``error.type``,
Google's ``status`` and ``ErrorInfo.reason``), not from its wording: Azure's per-minute 429 talks
about "quota" and Gemini's says "You exceeded your current quota", yet both only ask to wait. The
bodies these rules were decided from, with where each was seen, are the named samples in
``tests/fakes/samples/openai_errors.json``; ``tests/test_llm_classifier.py`` replays every one
through the real SDK.

=========================================================  ==========  =========================
error                                                      outcome     the key
=========================================================  ==========  =========================
401, whatever the body                                     KEY_DEAD    disabled (``auth``)
an auth code, on any 4xx or inside the stream              KEY_DEAD    disabled (``auth``)
a quota code, on any 4xx or inside the stream              KEY_DEAD    disabled (``quota``)
402 Payment Required (DeepSeek, OpenRouter)                KEY_DEAD    disabled (``quota``)
every other 429, whatever its wording                      RATE_LIMIT  rests; next key at once
a rate code, on another 4xx or inside the stream           RATE_LIMIT  rests; next key at once
OpenRouter's 402 with limit_source in-flight budget        RATE_LIMIT  rests; next key at once
5xx, 408, 409, a timeout, a connection error               TRANSIENT   counted; backoff, jitter
any other error event inside the stream                    TRANSIENT   counted; backoff, jitter
any other 4xx: 403 without an auth code, 400, 404, 422     REJECTED    untouched; no retry
=========================================================  ==========  =========================

Auth codes: ``invalid_api_key``, ``invalid_authentication(_error)`` (Moonshot),
``authentication_error`` (DeepSeek's type), ``account_deactivated``, ``access_terminated``;
Zhipu 1110/1111/1112/1121 (account inactive, missing, locked, banned: sent with a 429); Google
reasons ``API_KEY_INVALID`` (sent with a 400), ``API_KEY_EXPIRED``, ``CONSUMER_SUSPENDED``,
``SERVICE_DISABLED``, ``API_KEY_SERVICE_BLOCKED``; ``permission_denied`` / ``PERMISSION_DENIED``
only when the message names the API key (Gemini's "Your API key was reported as leaked"; its
"The caller does not have permission" stays REJECTED). Zhipu's own auth codes 1000-1004 come
with a 401, which is enough.

Quota codes: ``insufficient_quota`` as the ``type``, or as the ``code`` when no other type is
given (OpenAI; DashScope's exhausted free tier); ``billing_not_active``;
``exceeded_current_quota_error`` (Moonshot, with a 429 or a 403); ``Arrearage`` (DashScope, with
a 400); Zhipu 1113 (in arrears, with a 429) and 1309 (plan expired). DashScope answers its
per-minute *token* limit with code ``insufficient_quota`` but type ``invalid_request_error``
("Allocated quota exceeded, please increase your quota limit."): a rate limit, not a dead key.

Rate codes: ``rate_limit_exceeded``, ``rate_limit_reached_error`` (Moonshot),
``rate_limit_error``, ``limit_requests`` (DashScope), ``Throttling``, ``Throttling.RateQuota``,
``Throttling.AllocationQuota``, ``RESOURCE_EXHAUSTED`` (Google), Zhipu 1302-1305, 1308, 1310,
1312, 1313.

An error event inside a 200 SSE stream reaches us as :class:`openai.APIError` without a status;
its body is read with the same codes, a numeric HTTP-like ``code`` (OpenRouter sends
``"code": 429``) standing for the status.

How long a rate-limited key rests (:func:`rest_seconds`): ``retry-after-ms``, else
``Retry-After`` (seconds or an HTTP date), else the longest of the relevant
``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens`` (``"6ms"``, ``"1m30s"``, ``"20s"``;
relevant: the window the error ``type`` names or whose ``x-ratelimit-remaining-*`` is 0, else
both), else Google's ``RetryInfo.retryDelay`` in the body, else None and the pool backs off
exponentially from 2 s. Whatever the source, never less than :data:`MIN_REST_S`. A TRANSIENT
error keeps only an explicit ``Retry-After`` as a hint for the backoff.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

import openai


class Outcome(Enum):
    """What an error means for the key and the retry."""

    RATE_LIMIT = "rate_limit"
    KEY_DEAD = "key_dead"
    TRANSIENT = "transient"
    REJECTED = "rejected"


#: why a dead key is dead: the key is refused (``auth``) or its account has no money (``quota``)
KeyProblem = Literal["auth", "quota"]

#: the shortest rest of a rate-limited key, whatever the provider says (a "6ms" reset would
#: otherwise let every attempt hit the same limit again at once)
MIN_REST_S: Final = 1.0


@dataclass(frozen=True)
class Classified:
    """An error, classified. ``reason`` is short and holds no secret (codes, never messages)."""

    outcome: Outcome
    reason: str
    retry_after_s: float | None = None
    """For RATE_LIMIT: how long the key rests (None: exponential); for TRANSIENT: a server hint."""
    code: str | None = None
    """The body's ``code`` (else ``type``, else Google ``status``), e.g. context_length_exceeded."""
    status: int | None = None
    """The HTTP status; None for errors inside a stream and for network failures."""
    key_problem: KeyProblem | None = None
    """For KEY_DEAD: ``auth`` (the key is refused) or ``quota`` (no balance, credits, arrears)."""


@dataclass(frozen=True)
class ProviderError:
    """The fields of an error body that classification reads, whatever the provider's shape.

    Shapes handled: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (also the
    unwrapped inner object the SDK keeps in ``exc.body``), Google's ``[{"error": {"code",
    "message", "status", "details"}}]`` and OpenRouter's ``{"error": {"code", "message",
    "metadata"}}``. Codes are kept only when they look like codes (no free text).
    """

    code: str | None = None
    type: str | None = None
    status: str | None = None
    """Google's canonical status, e.g. ``RESOURCE_EXHAUSTED``."""
    reasons: frozenset[str] = frozenset()
    """Google ``ErrorInfo`` reasons, e.g. ``API_KEY_INVALID``."""
    message: str = ""
    retry_delay_s: float | None = None
    """Google ``RetryInfo.retryDelay``."""
    limit_source: str | None = None
    """OpenRouter ``metadata.limit_source``."""

    @classmethod
    def from_body(cls, body: object) -> ProviderError:
        """Read an error body (parsed JSON, or the text the SDK kept when it was not JSON)."""
        error = _error_object(body)
        if error is None:
            return cls()
        reasons: set[str] = set()
        retry_delay: float | None = None
        details = error.get("details")
        for detail in details if isinstance(details, list) else []:
            if not isinstance(detail, dict):
                continue
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.rpc.ErrorInfo") and isinstance(detail.get("reason"), str):
                reasons.add(detail["reason"].upper())
            if kind.endswith("google.rpc.RetryInfo") and isinstance(detail.get("retryDelay"), str):
                retry_delay = parse_duration(detail["retryDelay"])
        metadata = error.get("metadata")
        limit_source = metadata.get("limit_source") if isinstance(metadata, dict) else None
        message = error.get("message")
        return cls(
            code=_token(error.get("code")),
            type=_token(error.get("type")),
            status=_token(error.get("status")),
            reasons=frozenset(reasons),
            message=message if isinstance(message, str) else "",
            retry_delay_s=retry_delay,
            limit_source=_token(limit_source),
        )

    @property
    def codes(self) -> frozenset[str]:
        """``code``, ``type`` and ``status``, lower-cased, for matching against code sets."""
        return frozenset(c.lower() for c in (self.code, self.type, self.status) if c)

    def label(self, status: int | None = None) -> str | None:
        """The most specific code: ``code``, else ``type``, else Google ``status``.

        A code that only repeats the HTTP ``status`` (Azure's ``"429"``) is skipped.
        """
        for candidate in (self.code, self.type, self.status):
            if candidate and candidate != str(status):
                return candidate
        return None


_AUTH_CODES: Final = frozenset(
    {
        "invalid_api_key",
        "invalid_authentication",
        "invalid_authentication_error",
        "authentication_error",
        "account_deactivated",
        "access_terminated",
        # Zhipu account errors (their HTTP status is 429, so the code must decide)
        "1110",
        "1111",
        "1112",
        "1121",
    }
)
_AUTH_REASONS: Final = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "CONSUMER_SUSPENDED",
        "SERVICE_DISABLED",
        "API_KEY_SERVICE_BLOCKED",
    }
)
_PERMISSION_CODES: Final = frozenset({"permission_denied", "permission_denied_error"})
_MENTIONS_KEY: Final = re.compile(r"\bapi[ _-]?key\b", re.IGNORECASE)
_QUOTA_CODES: Final = frozenset(
    {
        "billing_not_active",
        "exceeded_current_quota_error",
        "arrearage",
        # Zhipu: account in arrears; GLM Coding Plan expired
        "1113",
        "1309",
    }
)
_RATE_CODES: Final = frozenset(
    {
        "rate_limit_exceeded",
        "rate_limit_reached_error",
        "rate_limit_error",
        "limit_requests",
        "throttling",
        "throttling.ratequota",
        "throttling.allocationquota",
        "resource_exhausted",
        # Zhipu: concurrency, frequency, daily count, traffic, usage windows, model busy
        "1302",
        "1303",
        "1304",
        "1305",
        "1308",
        "1310",
        "1312",
        "1313",
    }
)
_INSUFFICIENT_QUOTA: Final = "insufficient_quota"
_IN_FLIGHT_BUDGET: Final = "openrouter_in_flight_budget"
_CODE_LIKE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_DURATION_PART: Final = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)")
_DURATION_FACTORS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def classify(exc: BaseException, *, now: float | None = None) -> Classified:
    """Classify an exception raised by a request, or while reading its stream.

    ``now`` (epoch seconds) is used to read a ``Retry-After`` given as an HTTP date.
    """
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc, now)
    if isinstance(exc, openai.APITimeoutError):
        return Classified(Outcome.TRANSIENT, "timeout")
    if isinstance(exc, openai.APIConnectionError):
        return Classified(Outcome.TRANSIENT, "connection error")
    if isinstance(exc, openai.APIResponseValidationError):
        return Classified(Outcome.TRANSIENT, "invalid response", status=exc.status_code)
    if isinstance(exc, openai.APIError):
        return _classify_in_stream(exc)
    return Classified(Outcome.TRANSIENT, type(exc).__name__)


def _classify_status(exc: openai.APIStatusError, now: float | None) -> Classified:
    status = exc.status_code
    error = ProviderError.from_body(exc.body)
    outcome, problem = decide(status, error)
    code = error.label(status)
    label = f"{status} {code}" if code else str(status)
    headers = exc.response.headers
    rest = None
    if outcome is Outcome.RATE_LIMIT:
        rest = rest_seconds(headers, error, now=now)
    elif outcome is Outcome.TRANSIENT:  # only an explicit Retry-After; reset windows are quotas
        hint = _retry_after({name.lower(): value for name, value in headers.items()}, now)
        rest = None if hint is None else max(MIN_REST_S, hint)
    return Classified(
        outcome,
        _reason(label, outcome, problem),
        retry_after_s=rest,
        code=code,
        status=status,
        key_problem=problem,
    )


def _classify_in_stream(exc: openai.APIError) -> Classified:
    error = ProviderError.from_body(exc.body)
    status = _http_like(error.code)
    outcome, problem = decide(status, error, in_stream=True)
    code = error.label(status)
    label = f"stream error {code}" if code else "stream error"
    rest = error.retry_delay_s if outcome is Outcome.RATE_LIMIT else None
    return Classified(
        outcome,
        _reason(label, outcome, problem),
        retry_after_s=None if rest is None else max(MIN_REST_S, rest),
        code=code,
        key_problem=problem,
    )


def decide(
    status: int | None, error: ProviderError, *, in_stream: bool = False
) -> tuple[Outcome, KeyProblem | None]:
    """The rules of the module docstring: an outcome, and for a dead key why it is dead.

    ``status`` is the HTTP status (for an in-stream error, a numeric ``code`` standing for one,
    else None).
    """
    if status is not None and (status >= 500 or status in (408, 409)):
        return Outcome.TRANSIENT, None
    if status == 402 and error.limit_source == _IN_FLIGHT_BUDGET:
        return Outcome.RATE_LIMIT, None
    problem = _key_problem(error)
    if problem is not None:
        return Outcome.KEY_DEAD, problem
    if status == 401:
        return Outcome.KEY_DEAD, "auth"
    if status == 402:
        return Outcome.KEY_DEAD, "quota"
    if status == 429 or _is_rate_limit(error):
        return Outcome.RATE_LIMIT, None
    if status is None or in_stream:
        return Outcome.TRANSIENT, None
    return Outcome.REJECTED, None


def _key_problem(error: ProviderError) -> KeyProblem | None:
    codes = error.codes
    if codes & _AUTH_CODES or error.reasons & _AUTH_REASONS:
        return "auth"
    if codes & _PERMISSION_CODES and _MENTIONS_KEY.search(error.message):
        return "auth"
    if codes & _QUOTA_CODES or _out_of_quota(error):
        return "quota"
    return None


def _out_of_quota(error: ProviderError) -> bool:
    """``insufficient_quota`` as the type, or as the code of a body with no other type.

    DashScope (and gateways built like it) answer their per-minute *token* limit with code
    ``insufficient_quota`` but type ``invalid_request_error`` ("Allocated quota exceeded"), and
    an exhausted free tier with type ``insufficient_quota``; OpenAI sets both, or (older
    bodies) only the type.
    """
    error_type = (error.type or "").lower()
    if error_type == _INSUFFICIENT_QUOTA:
        return True
    return (error.code or "").lower() == _INSUFFICIENT_QUOTA and not error_type


def _is_rate_limit(error: ProviderError) -> bool:
    if error.codes & _RATE_CODES:
        return True
    # the per-minute token limit in DashScope's shape (see _out_of_quota)
    return (error.code or "").lower() == _INSUFFICIENT_QUOTA


def _reason(label: str, outcome: Outcome, problem: KeyProblem | None) -> str:
    if outcome is Outcome.KEY_DEAD:
        return f"{label}: {'no quota left' if problem == 'quota' else 'key refused'}"
    if outcome is Outcome.RATE_LIMIT:
        return f"{label}: rate limited"
    return label


def _error_object(body: object) -> dict[str, object] | None:
    if isinstance(body, list) and body:
        body = body[0]  # Gemini's OpenAI-compatible endpoint: [{"error": {...}}]
    if not isinstance(body, dict):
        return None
    inner = body.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    return body


def _token(value: object) -> str | None:
    """A code-like string (``"insufficient_quota"``, ``"1113"``, ``"429"``), else None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text if _CODE_LIKE.fullmatch(text) else None


def _http_like(code: str | None) -> int | None:
    if code is not None and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return None


def rest_seconds(
    headers: Mapping[str, str], error: ProviderError | None = None, *, now: float | None = None
) -> float | None:
    """How long a rate-limited key rests, from the headers and the body (module docstring).

    None when nothing says; otherwise at least :data:`MIN_REST_S`.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    seconds = _retry_after(lower, now)
    if seconds is None:
        seconds = _reset_window(lower, error)
    if seconds is None and error is not None:
        seconds = error.retry_delay_s
    return None if seconds is None else max(MIN_REST_S, seconds)


def _retry_after(headers: Mapping[str, str], now: float | None) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return moment - (time.time() if now is None else now)


def _reset_window(headers: Mapping[str, str], error: ProviderError | None) -> float | None:
    windows = ("requests", "tokens")
    named = (error.type or "").lower() if error is not None else ""
    relevant = [
        window
        for window in windows
        if window == named or headers.get(f"x-ratelimit-remaining-{window}", "").strip() == "0"
    ]
    for candidates in (relevant, windows):
        resets = [
            parsed
            for window in candidates
            if (parsed := parse_duration(headers.get(f"x-ratelimit-reset-{window}", "")))
            is not None
        ]
        if resets:
            return max(resets)
    return None


def parse_duration(text: str) -> float | None:
    """Parse reset durations such as ``20s``, ``1m30s``, ``6ms``, ``1h2m``, ``18.642s``.

    None unless the whole text is a duration.
    """
    text = text.strip()
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(part.group(0) for part in parts) != text:
        return None
    return sum(float(p.group("value")) * _DURATION_FACTORS[p.group("unit")] for p in parts)
