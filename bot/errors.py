"""The bot's error types, in one place.

Edges (the CLI, the chat service, the Feishu adapter) turn these into user-facing text;
nothing deeper formats messages for users. Messages never contain a secret.
"""

from __future__ import annotations


class BotError(Exception):
    """Base class of every error the bot raises on purpose."""


class ConfigError(BotError):
    """The configuration cannot be used; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(BotError):
    """The store cannot be opened or used (bad URL, unreadable file, failed migration)."""


class LLMError(BotError):
    """A request to the LLM failed in a way the caller must handle."""


class KeyRejected(LLMError):
    """An API key was refused by the provider (invalid, revoked, out of quota)."""


class AllKeysUnavailable(LLMError):
    """No API key can serve a request: every key is disabled, or cooling for too long."""


class RequestRejected(LLMError):
    """The provider refused the request itself (400/422), e.g. the context is too long."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)


class ReplyInterrupted(LLMError):
    """The stream broke after some text had already reached the user."""


class FeishuConnectError(BotError):
    """The long connection could not be established (bad credentials, unreachable domain)."""


class StoreLocked(BotError):
    """Another running process holds the store's instance lock; ``holder`` names it."""

    def __init__(self, message: str, *, holder: str) -> None:
        self.holder = holder
        super().__init__(message)


class OpsServerError(BotError):
    """The health and metrics endpoints cannot listen on ``ops.http`` (the port is in use)."""


class MediaError(BotError):
    """A voice message, image or file the bot cannot use; the text is safe to show the user."""


class MediaUnreadable(MediaError):
    """The bytes are not what they claim to be, or are damaged (no audio, no image, no text)."""


class MediaTooLarge(MediaError):
    """A media item is over a configured limit (size, duration, pixels, pages)."""


class MediaUnavailable(MediaError):
    """A media item could not be fetched, transcribed or published (the platform refused or
    did not answer); the text says so politely, naming a missing permission when that is it."""
