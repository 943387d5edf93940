"""The README's troubleshooting quotes what the program really prints.

Every error text, doctor line, chat reply and log event the troubleshooting table quotes must
come from the code. A quote may elide what varies with ``…``. Each part around an elision must
be made of the string literals of ``bot/`` (f-string parts count), apart from a few words the
program fills in at run time (a scope name, a code): at least 80 % of its characters are
covered by literal text, and at most three words are not.
"""

from __future__ import annotations

import ast
import re
from functools import cache

from tests.helpers import REPO_ROOT

#: a quote in the troubleshooting table: `error: …`, `✗ doctor line`, "a reply", `log_event`
_ERROR = re.compile(r"`(?:error: |[✗!✓] )([^`]+)`")
_REPLY = re.compile(r"[\"“]([^\"”]{8,})[\"”]")
_LOG_EVENT = re.compile(r"log lines? ((?:`[a-z_]+`(?:,? (?:and |or )?)?)+)")
_EVENT_NAME = re.compile(r"`([a-z_]+)`")
_ELISION = re.compile(r"\s*(?:…|\.\.\.)\s*")
#: a settings error starts with the field it names (``feishu.domain: …``), added by the loader;
#: a doctor line with the name of its check (``scope im:message: …``, ``llm key …: …``)
_FIELD = re.compile(r"^[a-z_]+(?:\.[\w…\[\]]+)+: ")
_CHECK_NAME = re.compile(r"^(?:scope \S+|llm key …|model …|[a-z]+(?: [a-z]+)?): ")


#: literal text shorter than this is not evidence (it could be a coincidence)
_MIN_PIECE = 10
_MAX_FILLED_WORDS = 3


@cache
def program_strings() -> tuple[str, ...]:
    """Every string literal of ``bot/``, f-string parts included."""
    found: list[str] = []
    for path in sorted((REPO_ROOT / "bot").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
    return tuple(found)


def troubleshooting_rows() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def quotes_of(row: str) -> list[str]:
    """The quotes of a row's symptom and what-prints columns."""
    columns = " ".join(row.split(" | ")[:2])
    quotes = [m.group(1) for m in _ERROR.finditer(columns)]
    quotes += [m.group(1) for m in _REPLY.finditer(re.sub(r"`[^`]*`", "", columns))]
    return quotes


@cache
def _corpus() -> str:
    return "\x00".join(program_strings())


def _literal_run(text: str, start: int) -> int:
    """The length of the longest piece of ``text`` from ``start`` found in one literal."""
    corpus = _corpus()
    low, high = 0, len(text) - start
    while low < high:
        middle = (low + high + 1) // 2
        if text[start : start + middle] in corpus:
            low = middle
        else:
            high = middle - 1
    return low


def uncovered(part: str) -> list[str]:
    """The words of ``part`` that no literal provides (the program's run-time values), or the
    whole part when too little of it is literal text."""
    filled: list[str] = []
    covered = position = 0
    while position < len(part):
        run = _literal_run(part, position)
        if run >= _MIN_PIECE or (run >= 3 and position + run == len(part)):
            covered += run
            position += run
            continue
        end = part.find(" ", position + 1)
        end = len(part) if end < 0 else end
        filled.append(part[position:end])
        position = end
    if len(filled) > _MAX_FILLED_WORDS or covered < 0.8 * len(part.strip()):
        return filled or [part]
    return []


def missing_parts(quote: str) -> list[str]:
    """The parts of a quote the program does not print."""
    quote = _CHECK_NAME.sub("", _FIELD.sub("", quote))
    parts = [part.strip(" .():") for part in _ELISION.split(quote)]
    short = [p for p in parts if 3 <= len(p) < _MIN_PIECE and p not in _corpus()]
    return short + [part for part in parts if len(part) >= _MIN_PIECE and uncovered(part)]


def test_the_troubleshooting_section_quotes_at_least_the_main_errors() -> None:
    quotes = [quote for row in troubleshooting_rows() for quote in quotes_of(row)]
    assert len(quotes) >= 25


def test_an_invented_quote_is_caught() -> None:
    assert missing_parts("the bot is on fire and nobody knows why")
    assert missing_parts("Feishu rejected the App Secret because it is Tuesday")
    assert not missing_parts("the app has no bot feature (11205: app do not have bot)")


def test_every_quoted_error_and_reply_is_printed_by_the_program() -> None:
    problems = {}
    for row in troubleshooting_rows():
        for quote in quotes_of(row):
            missing = missing_parts(quote)
            if missing:
                problems[quote] = missing
    assert problems == {}


def test_every_log_event_the_troubleshooting_names_is_logged() -> None:
    strings = set(program_strings())
    named = [
        name
        for row in troubleshooting_rows()
        for group in _LOG_EVENT.finditer(row)
        for name in _EVENT_NAME.findall(group.group(1))
    ]
    assert named
    assert [name for name in named if name not in strings] == []
