"""Chat commands: what ``/reset`` and ``/help`` mean, recognised the same way in every transport."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class CommandName(Enum):
    """The commands the conversation service understands."""

    RESET = "reset"
    HELP = "help"


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
}

# A command is "/word" at the very start, optionally followed by an argument. A path such as
# "/usr/bin/env" or a lone "/" is ordinary text.
_COMMAND = re.compile(r"^/(?P<word>[^\s/]+)(?:\s+(?P<argument>.*))?$", re.DOTALL)

HELP_TEXT = """\
I am a ChatGPT-style assistant: just write to me and I answer, remembering our conversation.

Commands:
/reset — forget our conversation and start afresh (also /new, /clear, /重置)
/help — this help (also /帮助)"""


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
