"""Safe rendering of untrusted text (model answers, quoted user text) for Feishu.

Feishu parses markup inside the text we send: card markdown (the CardKit ``markdown`` element)
turns ``<at id=all></at>`` into a real @all, ``<person id=…>`` into someone's profile card and
``[label](lark://…)`` into a link that opens whatever the scheme says; a ``text`` message turns
``<at user_id="all"></at>`` into an @all as well. The model's answer is text we did not write
(a user can ask it to repeat anything), so before it is shown:

- :func:`safe_markdown` (card markdown, post fallbacks) neutralises the Feishu tags that notify,
  show a person or link past the URL check (``at``, ``person``, ``a``, ``link``, ``number_tag``;
  any case and spacing) by putting a zero-width space (U+200B) right after the ``<``, so the tag
  shows literally; keeps links and images only for ``http``/``https`` URLs (and images of a
  Feishu image key, ``img_…``, which the card renders); shows any other link as its label and
  the URL as plain text with a zero-width space before each ``:``, so nothing turns it back into
  a link; and defuses ``<scheme:…>`` autolinks and reference definitions the same way. Fenced
  code blocks and inline code spans are left byte for byte: Feishu shows them literally.
- :func:`safe_plain_text` (``text`` messages, which render no markdown) neutralises the tags
  everywhere, code or not.

Both are pure, never raise on any ``str`` (lone surrogates included) and are idempotent.

How code is found, and why it is conservative. We cannot run Feishu's markdown parser, and a
difference between its idea of "code" and ours is exactly what an attacker would use (text we
leave alone as code, Feishu renders as markup). So a span counts as code only when several
readings agree: fences as CommonMark reads them (opening and closing fence indented at most
three spaces, closing fence at least as long) *and* as a lenient reader would (fences inside
list items and quotes too, closed by any fence line of the same character); code spans paired
across a paragraph *and* line by line, and only when they stay on one line without a ``|``
(a table row would split them). Where the readings disagree the text is treated as markup and
neutralised, which at worst leaves an invisible character inside real code.

Each pass rewrites what it finds; rewriting a link can expose another (``[[a](x:)](y:)``), so
passes repeat until nothing changes. After a few rounds (only crafted input gets there) a last
pass breaks every remaining non-web ``](`` instead of rewriting links, which is always final.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import Final

__all__ = ["ZWSP", "safe_markdown", "safe_plain_text"]

#: Zero-width space: put after ``<`` it stops a tag, before ``:`` it stops a scheme.
ZWSP: Final = "\u200b"

#: Stands in for code in the copy of the text the patterns run on, so they never match there.
_CODE_MASK: Final = "\ue000"

#: Rewriting rounds before the last, link-breaking pass (ordinary text needs one or two).
_MAX_PASSES: Final = 6

Span = tuple[int, int]

# ---- patterns of what is defused -------------------------------------------------------------

_ESCAPED = r"\\[\s\S]"
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]"
#: ``<`` of a Feishu tag that notifies (at), shows a person, or links (a, link, number_tag).
_TAG = r"<(?=\s*+/?\s*+(?i:at|person|a|link|number_tag)(?![A-Za-z0-9]))"

_TAG_ALT = rf"(?P<tag>{_TAG})"
#: ``<scheme:`` of an autolink (the closing ``>`` is not needed to be dangerous).
_AUTO_ALT = rf"(?P<auto><(?P<ascheme>{_SCHEME}{{1,31}}+):)"
#: ``](`` of an inline link, whatever its label; the lookahead reads (the start of) the URL, the
#: optional group takes the scheme and its colon, so both can be defused in place.
_JUNCTION_ALT = (
    r"(?P<junction>\](?=\(\s*+(?P<jdest>[^\s)]{0,128}+)(?P<jmore>[^\s)]?))"
    rf"(?:\(\s*+<?(?P<jscheme>{_SCHEME}*+):)?)"
)
_LINK_ALT = (
    rf"(?P<link>(?P<bang>!?)\[(?P<label>(?:[^\[\]\\]|{_ESCAPED})*+)\]\(\s*+"
    rf"(?P<dest><(?:[^<>\n\\]|{_ESCAPED})*+>"
    rf"|(?:[^\s()\\]|{_ESCAPED}|\((?:[^\s()\\]|{_ESCAPED})*+\))*+)"
    rf"(?:\s++(?:\"(?:[^\"\\]|{_ESCAPED})*+\"|'(?:[^'\\]|{_ESCAPED})*+'"
    rf"|\((?:[^()\\]|{_ESCAPED})*+\)))?\s*+\))"
)
#: ``[label]:`` of a link reference definition; the lookahead reads its URL.
_REFDEF_ALT = (
    rf"(?P<refdef>^[ ]{{0,3}}+\[(?:[^\[\]\\]|{_ESCAPED})++\]"
    r"(?=:[ \t]*+(?:\n[ \t]*+)?(?P<rdest>\S*+)))"
)
_COLON_ALT = rf"(?P<colon>(?<!{ZWSP}):)"

#: A whole pass over markdown.
_FULL = re.compile("|".join([_REFDEF_ALT, _LINK_ALT, _AUTO_ALT, _JUNCTION_ALT, _TAG_ALT]), re.M)
#: The last pass: like _FULL but breaks links instead of rewriting them.
_GUARD = re.compile("|".join([_REFDEF_ALT, _AUTO_ALT, _JUNCTION_ALT, _TAG_ALT]), re.M)
#: Inside a link's label, URL and title.
_INNER = re.compile("|".join([_AUTO_ALT, _JUNCTION_ALT, _TAG_ALT]))
#: Inside a URL shown as plain text: every colon defused as well.
_INNER_COLONS = re.compile("|".join([_AUTO_ALT, _JUNCTION_ALT, _TAG_ALT, _COLON_ALT]))
_TAG_ONLY = re.compile(_TAG)

_WEB_URL = re.compile(r"(?i:https?):")
_IMAGE_KEY = re.compile(r"img_[A-Za-z0-9_\-]+")

# ---- patterns of code --------------------------------------------------------------------------

_FENCE_STRICT = re.compile(r"[ ]{0,3}+(?P<fence>`{3,}+|~{3,}+)(?P<info>.*)")
#: Also inside list items and block quotes (a fence after `- ` or `> `), at any indentation.
_FENCE_LENIENT = re.compile(
    r"(?:[ \t]*+(?:>|[-*+](?=[ \t])|[0-9]{1,9}+[.)](?=[ \t])))*+[ \t]*+"
    r"(?P<fence>`{3,}+|~{3,}+)(?P<info>.*)"
)
_SPACES = re.compile(r"[ \t\r]*")
_TICK_TOKEN = re.compile(r"\\[\s\S]|`+")
_TICK_RUN = re.compile(r"`+")
_NOT_NEWLINE = re.compile(r"[^\n]")


def safe_markdown(text: str) -> str:
    """``text`` made safe for Feishu card markdown; code blocks and inline code are untouched."""
    current = text
    for _ in range(_MAX_PASSES):
        rendered = _pass(current, _FULL)
        if rendered == current:
            return rendered
        current = rendered
    return _pass(current, _GUARD)


def safe_plain_text(text: str) -> str:
    """``text`` made safe for a Feishu ``text`` message: no ``<at>`` (or kin) stays a tag."""
    return _TAG_ONLY.sub("<" + ZWSP, text)


# ---- one pass ----------------------------------------------------------------------------------


def _pass(text: str, pattern: re.Pattern[str]) -> str:
    if "<" not in text and "]" not in text:
        return text  # nothing any pattern could match
    masked = _masked(text, _code_spans(text))
    return _scan(text, masked, 0, len(text), pattern)


def _scan(text: str, masked: str, start: int, end: int, pattern: re.Pattern[str]) -> str:
    """``text[start:end]`` with every match of ``pattern`` (found in ``masked``) rewritten."""
    out: list[str] = []
    pos = start
    while (match := pattern.search(masked, pos, end)) is not None:
        out.append(text[pos : match.start()])
        out.append(_rewrite(text, masked, match))
        pos = match.end()
    out.append(text[pos:end])
    return "".join(out)


def _rewrite(text: str, masked: str, match: re.Match[str]) -> str:
    original = text[match.start() : match.end()]
    kind = match.lastgroup
    if kind == "tag":
        return "<" + ZWSP
    if kind == "colon":
        return ZWSP + ":"
    if kind == "auto":
        if match["ascheme"].lower() in ("http", "https"):
            return original
        return "<" + ZWSP + original[1:-1] + ZWSP + ":"
    if kind == "junction":
        url = text[match.start("jdest") : match.end("jdest")]
        if _is_kept_url(url, whole=not match["jmore"]):
            return original
        if match["jscheme"] is None:
            return "]" + ZWSP
        return "]" + ZWSP + original[1:-1] + ZWSP + ":"
    if kind == "refdef":
        label = _scan(text, masked, match.start(), match.end(), _INNER)
        rdest = text[match.start("rdest") : match.end("rdest")]
        return label if _is_kept_url(rdest) else label + ZWSP
    return _rewrite_link(text, masked, match)


def _rewrite_link(text: str, masked: str, match: re.Match[str]) -> str:
    label_start, label_end = match.span("label")
    dest_start, dest_end = match.span("dest")
    label = _scan(text, masked, label_start, label_end, _INNER)
    if _is_kept_url(text[dest_start:dest_end]):
        return (
            text[match.start() : label_start]
            + label
            + text[label_end:dest_start]
            + _scan(text, masked, dest_start, match.end(), _INNER)
        )
    if dest_end - dest_start >= 2 and masked[dest_start] == "<" and masked[dest_end - 1] == ">":
        dest_start, dest_end = dest_start + 1, dest_end - 1
    url = _scan(text, masked, dest_start, dest_end, _INNER_COLONS)
    # Keep what precedes from combining with the label: an escape, a code span's backticks, a
    # bracket or tag opener.
    before = text[match.start() - 1] if match.start() else ""
    prefix = ZWSP if before and before in "\\`[<!" else ""
    return f"{prefix}{label} ({url})"


def _is_kept_url(url: str, *, whole: bool = True) -> bool:
    """http(s) URLs and Feishu image keys stay links; anything else is shown as text.

    ``whole`` is false when only the start of the URL was read (enough for its scheme).
    """
    url = url.strip()
    if url.startswith("<"):
        url = url[1:-1] if url.endswith(">") else url[1:]
        url = url.strip()
    if _WEB_URL.match(url) is not None:
        return True
    return whole and _IMAGE_KEY.fullmatch(url) is not None


# ---- finding code ------------------------------------------------------------------------------


def _code_spans(text: str) -> list[Span]:
    """Where ``text`` is code by every reading (see the module docstring), in order."""
    if "`" not in text and "~" not in text:
        return []
    lines = _line_spans(text)
    strict = _code_spans_read(text, lines, lenient=False)
    lenient = _code_spans_read(text, lines, lenient=True)
    return _intersect(strict, lenient)


def _code_spans_read(text: str, lines: list[Span], *, lenient: bool) -> list[Span]:
    fences = _fences(text, lines, lenient=lenient)
    by_paragraph: list[Span] = []
    by_line: list[Span] = []
    paragraph: Span | None = None
    fence_index = 0
    for start, end in lines:
        while fence_index < len(fences) and fences[fence_index][1] < start:
            fence_index += 1
        in_fence = fence_index < len(fences) and fences[fence_index][0] <= start
        if in_fence or _SPACES.fullmatch(text, start, end):
            if paragraph is not None:
                _inline_code(text, *paragraph, by_paragraph)
                paragraph = None
            continue
        _inline_code(text, start, end, by_line)
        paragraph = (start, end) if paragraph is None else (paragraph[0], end)
    if paragraph is not None:
        _inline_code(text, *paragraph, by_paragraph)
    return _union(fences, _intersect(by_paragraph, by_line))


def _fences(text: str, lines: list[Span], *, lenient: bool) -> list[Span]:
    """Fenced code blocks, fence lines included; an unclosed fence runs to the end."""
    pattern = _FENCE_LENIENT if lenient else _FENCE_STRICT
    blocks: list[Span] = []
    opened: tuple[str, int, int] | None = None  # fence character, fence length, start
    for start, end in lines:
        line = pattern.fullmatch(text, start, end)
        if line is None:
            continue
        fence, info = line["fence"], line["info"]
        if fence[0] == "`" and "`" in info:
            continue  # not a fence: a backtick fence's info string has no backtick
        if opened is None:
            opened = (fence[0], len(fence), start)
            continue
        closes = (
            fence[0] == opened[0]
            and len(fence) >= (3 if lenient else opened[1])
            and (not info.strip() if lenient else _SPACES.fullmatch(info) is not None)
        )
        if closes:
            blocks.append((opened[2], end))
            opened = None
    if opened is not None:
        blocks.append((opened[2], len(text)))
    return blocks


def _inline_code(text: str, start: int, end: int, out: list[Span]) -> None:
    """Append the code spans of ``text[start:end]``, paired as CommonMark pairs them.

    A span that crosses a line or holds a ``|`` is paired (so what follows pairs right) but
    not taken as code.
    """
    runs: dict[int, list[int]] = {}
    for run in _TICK_RUN.finditer(text, start, end):
        runs.setdefault(run.end() - run.start(), []).append(run.start())
    if not runs:
        return
    pos = start
    while (token := _TICK_TOKEN.search(text, pos, end)) is not None:
        if text[token.start()] == "\\":
            pos = token.end()  # an escaped character (an escaped backtick opens nothing)
            continue
        width = token.end() - token.start()
        closers = runs.get(width, [])
        index = bisect_left(closers, token.end())
        if index == len(closers):
            pos = token.end()  # no closing run of this width: the backticks are literal
            continue
        span_end = closers[index] + width
        single_line = text.find("\n", token.start(), span_end) < 0
        if single_line and text.find("|", token.start(), span_end) < 0:
            out.append((token.start(), span_end))
        pos = span_end


def _line_spans(text: str) -> list[Span]:
    spans: list[Span] = []
    start = 0
    while (newline := text.find("\n", start)) >= 0:
        spans.append((start, newline))
        start = newline + 1
    spans.append((start, len(text)))
    return spans


def _masked(text: str, code: list[Span]) -> str:
    """``text`` with code replaced by a placeholder character (newlines kept, lengths equal)."""
    if not code:
        return text
    parts: list[str] = []
    pos = 0
    for start, end in code:
        parts.append(text[pos:start])
        parts.append(_NOT_NEWLINE.sub(_CODE_MASK, text[start:end]))
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _intersect(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _union(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
