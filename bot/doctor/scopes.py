"""The Feishu scopes the bot needs, and what breaks without each: the one table of them.

It matches the permission table of the README (*Set up the Feishu (or Lark) app*, step 3);
change both together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from bot.config import AccessSettings, Settings


@dataclass(frozen=True)
class NeededScope:
    """A scope and what the bot cannot do without it."""

    name: str
    breaks: str


REQUIRED_SCOPES: Final[tuple[NeededScope, ...]] = (
    NeededScope(
        "im:message",
        "the bot cannot read and send messages as the app: no replies, follow-up messages or "
        "welcomes, and quoted messages cannot be read",
    ),
    NeededScope("im:message:send_as_bot", "the bot cannot send messages as itself"),
    NeededScope(
        "im:message.p2p_msg:readonly", "the bot receives none of the messages sent to it privately"
    ),
    NeededScope(
        "im:message.group_at_msg:readonly",
        "the bot receives no group message that @mentions it",
    ),
    NeededScope(
        "cardkit:card:write",
        "answers cannot stream into a card: they arrive all at once as a plain card or text",
    ),
)
"""Scopes every installation needs."""

USER_ID_SCOPE: Final = NeededScope(
    "contact:user.employee_id:readonly",
    "events carry no user_id, so entries of access.allow / access.admins that are user_ids "
    "never match anyone",
)
"""Needed only when the access lists name user_ids (see :func:`needs_user_ids`)."""

RESOURCE_SCOPE: Final = NeededScope(
    "im:resource",
    "the images, files and voice messages users send cannot be downloaded, and drawings and "
    "formulas cannot be shown as images",
)
"""Needed for media; text answers work without it (a warning, not a failure)."""

SPEECH_SCOPE: Final = NeededScope(
    "speech_to_text:speech",
    "voice messages cannot be transcribed: llm.transcription_model is not set, so Feishu's "
    "speech-to-text is the only way",
)
"""Needed for voice messages when the endpoint does not transcribe them."""


def media_scopes(settings: Settings) -> list[NeededScope]:
    """The scopes the media features of ``settings`` use (missing ones are warnings)."""
    scopes = [RESOURCE_SCOPE]
    if settings.llm.speech_model() is None:
        scopes.append(SPEECH_SCOPE)
    return scopes


_ID_PREFIXES_WITHOUT_SCOPE: Final = ("ou_", "oc_")
"""open_ids and chat ids arrive in every event; any other id is taken for a user_id."""


def user_id_entries(access: AccessSettings) -> list[str]:
    """The ids of ``access.allow`` and ``access.admins`` that are neither open_ids nor chat ids."""
    ids = [*access.allow, *access.admins]
    return list(dict.fromkeys(i for i in ids if not i.startswith(_ID_PREFIXES_WITHOUT_SCOPE)))


def needs_user_ids(access: AccessSettings) -> bool:
    """Whether the access lists name user_ids, which only :data:`USER_ID_SCOPE` puts in events."""
    return bool(user_id_entries(access))
