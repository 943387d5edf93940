"""Structured logging: structlog for the bot, the stdlib for libraries, one redaction for both.

Every line, from ``structlog`` or from a library's stdlib logger (the SDK's ``Lark`` logger prints
the WebSocket URL with its access key at INFO and whole event payloads at DEBUG), passes the same
:class:`Redactor` before it is rendered: our events at the end of structlog's chain, library records
in the one root handler's pre-chain, and the SDK's records at their logger already, so that even a
handler added by someone else (pytest's capture) never sees a secret. Configure once, at startup,
with :func:`configure_logging`; keep the returned :class:`Redactor` to register secrets learnt later
(donated keys).

What counts as a key is :mod:`bot.keyshapes`' business; this module adds only what is specific to
logs (bearer tokens, Feishu tokens, ``name=value`` credential pairs). ``contains_api_key`` and
``mask_key`` stay importable from here for the modules that already use them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from bot.keyshapes import MIN_SECRET_LENGTH, contains_key, redact
from bot.keyshapes import mask_key as mask_key  # re-exported: bot.llm.keypool imports it here

SDK_LOGGER = "Lark"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Credentials in URLs, headers and JSON: access_key=…, ticket=…, "AppSecret": "…", Bearer …
_CREDENTIAL_PAIR = re.compile(
    r"(?P<name>access_key|ticket|app_secret|appsecret|app_access_token|tenant_access_token"
    r"|access_token|api_key|apikey|secret|password|token)"
    r"(?P<sep>\"?\s*[:=]\s*\"?|=)(?P<value>[^\s\"'&,;}]{6,})",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<name>Bearer\s+)(?P<value>[A-Za-z0-9._\-]{8,})", re.IGNORECASE)
# Feishu tokens: t-… (tenant), a-… (app), u-… (user) followed by a long opaque tail. ASCII
# boundaries, not \b, so a token right after CJK text is found too.
_FEISHU_TOKEN = re.compile(r"(?<![A-Za-z0-9_\-])[tau]-[A-Za-z0-9_\-]{24,}")
#: configured secrets shorter than this are ignored
_MIN_SECRET = 6

#: kept for the modules that import it from here: :func:`bot.keyshapes.contains_key`
contains_api_key = contains_key


class Redactor:
    """Masks configured secrets and anything shaped like a credential in text and nested values.

    Thread-safe: the SDK logs from its own thread while the bot may register a donated key.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Mask this exact value from now on (values shorter than 6 characters are ignored)."""
        secret = secret.strip()
        if len(secret) < _MIN_SECRET:
            return
        with self._lock:
            if secret not in self._secrets:
                self._secrets = (*self._secrets, secret)

    def text(self, value: str) -> str:
        """Return ``value`` with every key shape, configured secret and credential masked."""
        secrets = self._secrets
        # Named credentials first (a ticket= or token= value is hidden whole), then key shapes.
        value = _BEARER.sub(lambda match: f"{match.group('name')}***", value)
        value = _FEISHU_TOKEN.sub(lambda match: f"{match.group(0)[:2]}***", value)
        value = _CREDENTIAL_PAIR.sub(
            lambda match: f"{match.group('name')}{match.group('sep')}***", value
        )
        value = redact(value, secrets)
        # keyshapes ignores secrets under 8 characters; a configured one is still a secret.
        for secret in secrets:
            if len(secret) < MIN_SECRET_LENGTH and secret in value:
                value = value.replace(secret, "…")
        return value

    def value(self, value: Any) -> Any:
        """Mask secrets inside strings, exceptions, mappings and sequences."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set):
            return [self.value(item) for item in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.text(str(value))

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        """structlog processor: mask every field of the event."""
        return {key: self.value(item) for key, item in event_dict.items()}


class _RedactRecord(logging.Filter):
    """Masks secrets in a library's record itself, before any handler (ours or not) sees it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor.text(record.getMessage())
        record.args = None
        return True


class _LevelFloor(logging.Filter):
    """Drops records below a level even when a library resets its logger's level itself."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def configure_logging(
    *,
    level: str = "info",
    json: bool = False,
    sdk_level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Configure structlog and the stdlib root logger once; return the redactor in use.

    ``json`` renders one JSON object per line, else a human console format (colours on a TTY).
    The SDK's ``Lark`` logger loses its own stdout handler and is capped at ``sdk_level``,
    which can never be more verbose than ``level``.
    """
    stream = stream or sys.stderr
    redactor = Redactor(secrets)
    numeric_level = _LEVELS[level]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, redactor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    sdk_logger = logging.getLogger(SDK_LOGGER)
    for old_filter in list(sdk_logger.filters):
        sdk_logger.removeFilter(old_filter)
    sdk_logger.addFilter(_LevelFloor(max(_LEVELS[sdk_level], numeric_level)))
    sdk_logger.addFilter(_RedactRecord(redactor))
    adopt_sdk_logger()
    for noisy in ("httpx", "httpcore", "httpx2", "openai", "websockets", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, numeric_level))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            redactor,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    return redactor


def adopt_sdk_logger() -> None:
    """Route the Feishu SDK's logger through our handler (and redaction).

    Importing ``lark_oapi`` adds a stdout handler to the ``Lark`` logger and sets it to WARNING;
    call this after the import (the SDK is imported lazily) so its lines are ours again. The
    level floor and redaction filters set by :func:`configure_logging` stay in place.
    """
    sdk_logger = logging.getLogger(SDK_LOGGER)
    for old in list(sdk_logger.handlers):
        sdk_logger.removeHandler(old)
    sdk_logger.propagate = True
    sdk_logger.setLevel(logging.NOTSET)


def quiet_sdk_shutdown() -> None:
    """Silence what the Feishu SDK says while it is being stopped on purpose.

    ``FeishuChannel.stop`` closes the socket under the SDK's receive loop (logged at ERROR) and
    leaves tasks on its loops that asyncio reports when they are collected; none of it is a
    problem at shutdown, all of it would alarm a user reading the logs.
    """
    logging.getLogger(SDK_LOGGER).setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", module="")


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger for a module, with optional bound context."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**context) if context else logger


def bind_context(**context: Any) -> None:
    """Bind fields (event_id, conversation…) to every line logged by the current task."""
    structlog.contextvars.bind_contextvars(**context)
