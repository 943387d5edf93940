"""Chat commands: parsing ``/word argument`` and the help, the same in every transport.

Commands are case-insensitive and have Chinese aliases (``/重置``, ``/角色``, ``/模型`` …). A
``/word`` that is no command is answered with "unknown command" and the help, and never reaches
the model; a path such as ``/usr/bin/env`` or a lone ``/`` is ordinary text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class CommandName(Enum):
    """The commands the conversation service understands."""

    RESET = "reset"
    HELP = "help"
    ROLE = "role"
    MODEL = "model"
    HISTORY = "history"
    USAGE = "usage"
    KEY = "key"
    KEYS = "keys"
    DRAW = "draw"


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
    "新对话": CommandName.RESET,
    "help": CommandName.HELP,
    "start": CommandName.HELP,
    "帮助": CommandName.HELP,
    "role": CommandName.ROLE,
    "persona": CommandName.ROLE,
    "角色": CommandName.ROLE,
    "model": CommandName.MODEL,
    "模型": CommandName.MODEL,
    "history": CommandName.HISTORY,
    "历史": CommandName.HISTORY,
    "usage": CommandName.USAGE,
    "用量": CommandName.USAGE,
    "key": CommandName.KEY,
    "密钥": CommandName.KEY,
    "keys": CommandName.KEYS,
    "draw": CommandName.DRAW,
    "image": CommandName.DRAW,
    "画": CommandName.DRAW,
    "画图": CommandName.DRAW,
}

# A command is "/word" at the very start, optionally followed by an argument. A path such as
# "/usr/bin/env" or a lone "/" is ordinary text.
_COMMAND = re.compile(r"^/(?P<word>[^\s/]+)(?:\s+(?P<argument>.*))?$", re.DOTALL)

_INTRO = (
    "I am a ChatGPT-style assistant: just write to me and I answer, remembering our "
    "conversation. Reply to (quote) a message to ask me about it."
)
_EVERYONE = (
    "/reset — forget our conversation and start afresh (also /new, /重置)",
    "/role — list the personas; /role <name> to switch, /role custom <prompt> for your own, "
    "/role default to go back (also /角色)",
    "/model — list the models; /model <name> to choose yours (also /模型)",
    "/history — how much of our conversation I remember (also /历史)",
    "/usage — your requests and tokens today and this month (also /用量)",
    "/help — this help (also /帮助)",
)
_DRAW = ("/draw <description> — draw an image (also /image, /画)",)
_MEDIA_INTRO = (
    "You may also send me a voice message, an image or a file (text, code, CSV, JSON, PDF) "
    "and then ask about it."
)
_DONORS = (
    "/key add <key> — share an API key with the bot (in a private chat; or just send the key)",
    "/key mine — the keys you shared, their state and today's use",
    "/key remove <key id> — take one of your keys out of the pool",
)
_ADMINS = (
    "/keys — every key of the pool; /keys disable|enable|remove <key id>",
    "/usage also shows everyone's use, per key and per user",
)


def help_text(
    *, admin: bool = False, donations: bool = True, drawing: bool = True, media: bool = True
) -> str:
    """The help: every command with a one-line description; admin commands only for admins,
    /draw only when drawing is on, what may be sent besides text only where it is read."""
    lines = [_INTRO, *([_MEDIA_INTRO] if media else []), "", "Commands:", *_EVERYONE]
    if drawing:
        lines[-1:-1] = _DRAW
    if donations:
        lines += _DONORS
    if admin:
        lines += ["", "For admins:", *_ADMINS]
    return "\n".join(lines)


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


def unknown_command_text(word: str, help_for_user: str) -> str:
    """The reply to a ``/word`` that is not a command."""
    return f"Unknown command: /{word}. Here is what I understand:\n\n{help_for_user}"
