"""Chat commands: what ``/reset`` and ``/help`` mean, recognised the same way in every transport."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class CommandName(Enum):
    """The commands the conversation service understands."""

    RESET = "reset"
    HELP = "help"
    KEY = "key"
    KEYS = "keys"


@dataclass(frozen=True)
class Command:
    """A parsed command; ``name`` is None for an unknown ``/word`` (answered with help)."""

    name: CommandName | None
    word: str
    argument: str


_ALIASES: dict[str, CommandName] = {
    "reset": CommandName.RESET,
    "clear": CommandName.RESET,
    "new": CommandName.RESET,
    "重置": CommandName.RESET,
    "清空": CommandName.RESET,
    "help": CommandName.HELP,
    "帮助": CommandName.HELP,
    "key": CommandName.KEY,
    "keys": CommandName.KEYS,
}

# A command is "/word" at the very start, optionally followed by an argument. A path such as
# "/usr/bin/env" or a lone "/" is ordinary text.
_COMMAND = re.compile(r"^/(?P<word>[^\s/]+)(?:\s+(?P<argument>.*))?$", re.DOTALL)

HELP_TEXT = """\
I am a ChatGPT-style assistant: just write to me and I answer, remembering our conversation.

Commands:
/reset — forget our conversation and start afresh (also /new, /clear, /重置)
/help — this help (also /帮助)
/key add <key> — share an API key with the bot (in a private chat; or just send the key)
/key mine — the keys you shared, their state and today's use
/key remove <key id> — take one of your keys out of the pool
/keys — every key of the pool (admins; also /keys disable|enable|remove <key id>)"""


def parse_command(text: str) -> Command | None:
    """The command in ``text``, or None when it is an ordinary message."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    word = match.group("word")
    return Command(
        name=_ALIASES.get(word.lower()),
        word=word,
        argument=(match.group("argument") or "").strip(),
    )


def unknown_command_text(word: str) -> str:
    """The reply to a ``/word`` that is not a command."""
    return f"I don't know the command /{word}.\n\n{HELP_TEXT}"
