"""LaTeX formulas in an answer: finding them, showing them as code, drawing them as images.

Feishu card markdown does not render LaTeX, but it does render images written as
``![alt](image_key)``. So while an answer streams, every formula is shown as code
(:func:`formulas_as_code`); once the answer is complete, the bot draws each formula with
matplotlib's mathtext (:class:`FormulaRenderer`), uploads the PNGs and puts each image where its
formula was (:func:`place_images`). A formula mathtext cannot draw stays as code.

What counts as a formula (:func:`find_formulas`), scanning left to right, formulas never
overlapping:

- ``$$…$$`` and ``\\[…\\]`` are display formulas and may span lines, but not a blank line;
- ``\\(…\\)`` is an inline formula on one line;
- ``$…$`` is an inline formula on one line, by pandoc's rules: the opening ``$`` is followed by
  a non-space character, the closing ``$`` is the next ``$`` and must follow a non-space
  character and not be followed by a digit, or there is no formula there. This is what keeps
  prices prose: in "$5 and $6" or "costs $5, or $10" the second ``$`` follows a space, in
  "$3.50–$4" it is followed by a digit. Content that is only a number (``$5$``, ``$1,000.00$``)
  is not a formula either;
- a backslash escapes the next character, so ``\\$`` is never a delimiter;
- nothing inside code is a formula: fenced blocks (an unclosed fence, as in a streaming answer,
  runs to the end) and inline code spans;
- empty content (``$$ $$``) is not a formula, and an opening delimiter with no closing one yet
  (a streaming answer) is left as it is.

matplotlib is imported on the first render only: finding formulas and rewriting text never
import it, so a bot that never meets a formula pays no memory for it. Rendering is synchronous
and CPU-bound; callers on the event loop run it in a worker thread.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser, VectorParse

__all__ = ["Formula", "FormulaRenderer", "find_formulas", "formulas_as_code", "place_images"]

#: Longest source the renderer tries; anything longer is not a formula a reader wants as a
#: picture, and mathtext's time and image size grow with it.
MAX_SOURCE_CHARS: Final = 1000

#: Longest alt text of a formula image, ellipsis included.
MAX_ALT_CHARS: Final = 120

_INLINE_FONT_SIZE: Final = 14.0
_DISPLAY_FONT_SIZE: Final = 16.0
#: White margin around a drawn formula, in points.
_PAD_POINTS: Final = 3.0
#: Longest side of a formula image, in pixels: a formula wider than this would be shrunk to
#: nothing in a card, and reads better as code.
_MAX_SIDE_PIXELS: Final = 8000
#: What mathtext draws in place of a character no font of its set has (U+00A4, ¤).
_DUMMY_GLYPH: Final = 0xA4


@dataclass(frozen=True)
class Formula:
    """One formula found in a text."""

    #: the LaTeX between the delimiters, stripped
    source: str
    #: True for ``$$…$$`` and ``\\[…\\]``, False for ``$…$`` and ``\\(…\\)``
    display: bool
    #: span in the text, delimiters included
    start: int
    end: int


# ---- finding formulas ------------------------------------------------------------------------

Span = tuple[int, int]

#: A fence line: a code fence after any indentation, block quote markers and list markers (read
#: leniently, since a formula wrongly taken for code only stays as text).
_FENCE_LINE = re.compile(
    r"(?:[ \t]*>)*[ \t]*(?:(?:[-*+]|\d{1,9}[.)])[ \t]+)*(?P<fence>`{3,}|~{3,})(?P<info>.*)"
)
_BACKTICKS = re.compile(r"`+")
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
_SPECIAL = re.compile(r"[\\$]")
#: What a search for a closing delimiter stops at: an escape (skipped), the closer, or the end
#: of what the formula may span (a blank line for display formulas, a line break for inline).
_DISPLAY_DOLLAR_END = re.compile(r"\\[^\n]|(?P<close>\$\$)|(?P<stop>\n[ \t\r]*\n)")
_DISPLAY_BRACKET_END = re.compile(r"\\(?:(?P<close>\])|[^\n])|(?P<stop>\n[ \t\r]*\n)")
_INLINE_PAREN_END = re.compile(r"\\(?:(?P<close>\))|[^\n])|(?P<stop>\n)")
_INLINE_DOLLAR_END = re.compile(r"\\[^\n]|(?P<close>\$)|(?P<stop>\n)")
#: Content of ``$…$`` that is an amount, not mathematics.
_AMOUNT = re.compile(r"[-+]?[\d.,]*\d[\d.,]*")


def find_formulas(text: str) -> list[Formula]:
    """Every formula in text, in order, non-overlapping (the rules are in the module docstring)."""
    if "$" not in text and "\\" not in text:
        return []
    formulas: list[Formula] = []
    position = 0
    for code_start, code_end in _code_spans(text):
        formulas.extend(_formulas_between(text, position, code_start))
        position = code_end
    formulas.extend(_formulas_between(text, position, len(text)))
    return formulas


def _code_spans(text: str) -> list[Span]:
    """Fenced code blocks and inline code spans, in order and disjoint."""
    spans: list[Span] = []
    position = 0
    for fence_start, fence_end in _fences(text):
        spans.extend(_inline_code_spans(text, position, fence_start))
        spans.append((fence_start, fence_end))
        position = fence_end
    spans.extend(_inline_code_spans(text, position, len(text)))
    return spans


def _fences(text: str) -> list[Span]:
    """Fenced code blocks, fence lines included; an unclosed fence runs to the end of text."""
    if "```" not in text and "~~~" not in text:
        return []
    spans: list[Span] = []
    opened: tuple[str, int, int] | None = None  # fence character, fence length, block start
    line_start = 0
    for line in text.split("\n"):
        line_end = line_start + len(line)
        match = _FENCE_LINE.fullmatch(line)
        if match is not None:
            fence, info = match["fence"], match["info"]
            if opened is None:
                if not (fence[0] == "`" and "`" in info):  # else it is inline code, not a fence
                    opened = (fence[0], len(fence), line_start)
            elif fence[0] == opened[0] and len(fence) >= opened[1] and not info.strip():
                spans.append((opened[2], line_end))
                opened = None
        line_start = line_end + 1
    if opened is not None:
        spans.append((opened[2], len(text)))
    return spans


def _inline_code_spans(text: str, start: int, end: int) -> list[Span]:
    """Code spans in text[start:end]: a backtick run up to the next run of the same length,
    within a paragraph; a backslash before a run escapes its first backtick."""
    spans: list[Span] = []
    runs = [(m.start(), m.end()) for m in _BACKTICKS.finditer(text, start, end)]
    if len(runs) < 2:
        return spans
    paragraph_breaks = [m.start() for m in _BLANK_LINE.finditer(text, start, end)]
    index = 0
    while index < len(runs):
        run_start, run_end = runs[index]
        index += 1
        if _escaped(text, run_start, start):
            run_start += 1
            if run_start == run_end:
                continue
        length = run_end - run_start
        next_break = bisect_left(paragraph_breaks, run_end)
        paragraph_end = end if next_break == len(paragraph_breaks) else paragraph_breaks[next_break]
        for later in range(index, len(runs)):
            close_start, close_end = runs[later]
            if close_start >= paragraph_end:
                break
            if close_end - close_start == length:
                spans.append((run_start, close_end))
                index = later + 1
                break
    return spans


def _escaped(text: str, position: int, start: int) -> bool:
    """Whether text[position] follows an odd number of backslashes (not looking before start)."""
    backslashes = 0
    while position - backslashes - 1 >= start and text[position - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _formulas_between(text: str, start: int, end: int) -> list[Formula]:
    """The formulas in text[start:end], a stretch without code."""
    formulas: list[Formula] = []
    # After a search for an opener's closer fails at some point, any later opener of that kind
    # before the same point fails too: remembering it keeps the scan linear on hostile text.
    hopeless_until: dict[str, int] = {}
    position = start
    while True:
        special = _SPECIAL.search(text, position, end)
        if special is None:
            return formulas
        position = special.start()
        follower = text[position + 1] if position + 1 < end else ""
        if text[position] == "\\":
            if follower == "[":
                kind, pattern, display = "\\[", _DISPLAY_BRACKET_END, True
            elif follower == "(":
                kind, pattern, display = "\\(", _INLINE_PAREN_END, False
            else:
                position += 2  # an escaped character: never a delimiter
                continue
        elif follower == "$":
            kind, pattern, display = "$$", _DISPLAY_DOLLAR_END, True
        else:
            formula, position = _inline_dollar(text, position, end)
            if formula is not None:
                formulas.append(formula)
            continue
        content_start = position + 2
        if hopeless_until.get(kind, -1) > position:
            position = content_start
            continue
        close, stopped_at = _closer(text, pattern, content_start, end)
        if close is None:
            hopeless_until[kind] = stopped_at
            position = content_start
            continue
        source = text[content_start:close].strip()
        if source:
            formulas.append(Formula(source, display, position, close + 2))
        position = close + 2


def _closer(text: str, pattern: re.Pattern[str], start: int, end: int) -> tuple[int | None, int]:
    """Where the closer that pattern finds starts, or None and where the search stopped."""
    for match in pattern.finditer(text, start, end):
        if match["close"] is not None:
            return match.start(), match.end()
        if match["stop"] is not None:
            return None, match.start()
    return None, end


def _inline_dollar(text: str, opener: int, end: int) -> tuple[Formula | None, int]:
    """The ``$…$`` formula opened at text[opener], if any, and where to scan on."""
    after_opener = opener + 1
    if after_opener >= end or text[after_opener].isspace():
        return None, after_opener
    for match in _INLINE_DOLLAR_END.finditer(text, after_opener, end):
        if match["stop"] is not None:
            return None, after_opener
        if match["close"] is None:
            continue
        close = match.start()
        if text[close - 1].isspace() or (close + 1 < len(text) and text[close + 1].isdigit()):
            return None, after_opener  # "$5 and $6", "$3.50–$4": prose with prices
        source = text[after_opener:close]
        if _AMOUNT.fullmatch(source):
            return None, close + 1
        return Formula(source.strip(), False, opener, close + 1), close + 1
    return None, after_opener


# ---- rewriting text --------------------------------------------------------------------------


def formulas_as_code(text: str) -> str:
    """The text with each formula shown as code, as while an answer streams.

    An inline formula becomes inline code (with a longer backtick fence if its source has
    backticks); a display formula becomes a fenced ``latex`` block on its own lines.
    """
    return place_images(text, {})


def place_images(text: str, images: Mapping[str, str]) -> str:
    """The text with each formula whose source is a key of images shown as that image.

    An image is written ``![alt](image_key)``, a display formula's on a line of its own with a
    blank line before and after it; every other formula is shown as code, as by
    :func:`formulas_as_code`. The alt text is the source made safe for markdown.
    """
    formulas = find_formulas(text)
    if not formulas:
        return text
    stray_runs = _stray_backtick_runs(text)
    out: list[str] = []
    tail = ""  # the end of what is written so far: does a block need a line break before it?
    position = 0

    def write(piece: str) -> None:
        nonlocal tail
        out.append(piece)
        tail = (tail + piece)[-64:]

    for formula in formulas:
        image_key = images.get(formula.source)
        if not formula.display:
            write(text[position : formula.start])
            if image_key is not None:
                write(_image(formula.source, image_key))
            else:
                # A backtick right beside the code span would merge with its fence.
                write(" " if tail.endswith("`") else "")
                write(_inline_code(formula.source, stray_runs))
                write(" " if text.startswith("`", formula.end) else "")
            position = formula.end
            continue

        # A display formula goes on lines of its own, indented like the line it was on; an image
        # also needs blank lines around it, or it would be inline in the paragraph.
        gap = "\n\n" if image_key is not None else "\n"
        line_start = text.rfind("\n", 0, formula.start) + 1
        indent = text[line_start : formula.start]
        indent = indent[: len(indent) - len(indent.lstrip(" \t"))]
        if position <= line_start and not text[line_start : formula.start].strip(" \t"):
            write(text[position:line_start])
        else:
            write(text[position : formula.start].rstrip(" \t"))
        if tail:
            written = tail.rstrip(" \t")
            newlines = len(written) - len(written.rstrip("\n"))
            write("\n" * max(0, len(gap) - newlines))
        if image_key is not None:
            write(indent + _image(formula.source, image_key))
        else:
            write(indent + _code_block(formula.source, indent))

        line_end = text.find("\n", formula.end)
        line_end = len(text) if line_end == -1 else line_end
        rest_of_line = text[formula.end : line_end]
        if rest_of_line.strip(" \t"):
            write(gap)
            position = formula.end + len(rest_of_line) - len(rest_of_line.lstrip(" \t"))
        else:
            position = line_end
            next_end = text.find("\n", line_end + 1)
            next_line = text[line_end + 1 : len(text) if next_end == -1 else next_end]
            if image_key is not None and line_end < len(text) and next_line.strip():
                write("\n")
    write(text[position:])
    return "".join(out)


def _stray_backtick_runs(text: str) -> frozenset[int]:
    """Lengths of the backtick runs outside code spans (an escaped run counts one shorter too).

    A code span we write must not be fenced with one of these lengths: a stray run before it
    would pair with its fence and turn the wrong text into code.
    """
    code = _code_spans(text)
    lengths: set[int] = set()
    for run in _BACKTICKS.finditer(text):
        index = bisect_left(code, (run.start() + 1,)) - 1
        if index >= 0 and code[index][0] <= run.start() < code[index][1]:
            continue
        lengths.add(len(run[0]))
        if _escaped(text, run.start(), 0):
            lengths.add(len(run[0]) - 1)
    return frozenset(lengths)


def _inline_code(source: str, avoid: frozenset[int]) -> str:
    """Source as an inline code span, fenced by more backticks than any run inside it and by a
    number of them that no run in avoid has."""
    longest = max((len(run) for run in _BACKTICKS.findall(source)), default=0)
    length = longest + 1
    while length in avoid:
        length += 1
    fence = "`" * length
    if longest == 0:
        return f"{fence}{source}{fence}"
    return f"{fence} {source} {fence}"  # the spaces keep a backtick at either end off the fence


def _code_block(source: str, indent: str) -> str:
    """Source as a fenced ``latex`` block (its first line written after indent by the caller)."""
    longest = max((len(run) for run in _BACKTICKS.findall(source)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}latex\n{indent}{source}\n{indent}{fence}"


_ALT_BREAKERS = re.compile(r"[\[\]()<>]")


def _image(source: str, image_key: str) -> str:
    """Markdown for the image of a formula."""
    return f"![{_alt_text(source)}]({image_key})"


def _alt_text(source: str) -> str:
    """Source as alt text: on one line, without what ends the alt or the link early
    (brackets, parentheses) or reads as a Feishu tag (angle brackets), and at most
    :data:`MAX_ALT_CHARS` long."""
    alt = " ".join(_ALT_BREAKERS.sub(" ", source).split())
    if len(alt) > MAX_ALT_CHARS:
        alt = alt[: MAX_ALT_CHARS - 1].rstrip("\\ ") + "…"
    # A trailing backslash would escape the closing bracket.
    return alt.rstrip("\\ ") or "formula"


# ---- rendering -------------------------------------------------------------------------------


class FormulaRenderer:
    """Renders formulas to PNG with matplotlib's mathtext (Agg, no display, no LaTeX install).

    Results, failures included, are cached by (source, display) in an LRU of ``max_cached``
    entries. One lock covers the cache and every use of matplotlib, which is not thread-safe;
    a second thread asking for a formula being drawn waits and then finds it cached.
    """

    def __init__(self, *, dpi: int = 200, max_cached: int = 256) -> None:
        if dpi <= 0:
            raise ValueError(f"dpi must be positive, got {dpi}")
        if max_cached < 0:
            raise ValueError(f"max_cached must be 0 or more, got {max_cached}")
        self._dpi = dpi
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[str, bool], bytes | None] = OrderedDict()
        self._lock = threading.Lock()
        self._parser: MathTextParser[VectorParse] | None = None

    @property
    def cache_size(self) -> int:
        """How many results (images and failures) are cached."""
        with self._lock:
            return len(self._cache)

    def render(self, formula: Formula) -> bytes | None:
        """PNG bytes of the formula, or None when mathtext cannot draw it.

        None for a parse error or an unsupported command (``\\begin{pmatrix}``, ``\\\\``), a
        character none of mathtext's fonts has (Chinese in ``\\text{}``), a bare ``$`` in the
        source, a source longer than :data:`MAX_SOURCE_CHARS`, or an image that would be more
        than 8000 pixels wide or tall. Synchronous and CPU-bound.
        """
        key = (formula.source, formula.display)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            png = self._draw(formula) if _drawable(formula.source) else None
            if self._max_cached > 0:
                self._cache[key] = png
                if len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            return png

    def _draw(self, formula: Formula) -> bytes | None:
        """Draw with mathtext; the caller holds the lock."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.font_manager import FontProperties
        from matplotlib.mathtext import MathTextParser

        if self._parser is None:
            self._parser = MathTextParser("path")
        # LaTeX reads a line break as a space; mathtext refuses it.
        math = "$" + " ".join(formula.source.split()) + "$"
        size = _DISPLAY_FONT_SIZE if formula.display else _INLINE_FONT_SIZE
        font = FontProperties(size=size)
        layout = _parse(self._parser, math, font)
        if layout is None:
            return None
        width, height, depth = float(layout.width), float(layout.height), float(layout.depth)
        if "¤" not in formula.source and any(g[2] == _DUMMY_GLYPH for g in layout.glyphs):
            return None  # a character no font has would be drawn as ¤: show the code instead

        fig_width, fig_height = width + 2 * _PAD_POINTS, height + 2 * _PAD_POINTS
        if max(fig_width, fig_height) / 72 * self._dpi > _MAX_SIDE_PIXELS:
            return None
        figure = Figure(
            figsize=(fig_width / 72, fig_height / 72),
            dpi=self._dpi,
            facecolor="white",
            edgecolor="white",
        )
        FigureCanvasAgg(figure)  # attaches itself: drawing never goes through pyplot's backend
        figure.text(
            _PAD_POINTS / fig_width,
            (_PAD_POINTS + depth) / fig_height,
            math,
            fontproperties=font,
            color="black",
            usetex=False,
        )
        buffer = io.BytesIO()
        try:
            # The figure's own box, so that no savefig.* setting (bbox, pad) changes the image.
            figure.savefig(
                buffer,
                format="png",
                dpi=self._dpi,
                bbox_inches=figure.bbox_inches,
                facecolor="white",
                edgecolor="white",
                transparent=False,
            )
        except (ValueError, RecursionError, OverflowError):
            return None
        return buffer.getvalue()


def _drawable(source: str) -> bool:
    """Whether the source is worth giving to mathtext: not too long, and no bare ``$`` (mathtext
    would read it as the end of the formula)."""
    if len(source) > MAX_SOURCE_CHARS:
        return False
    return all(_escaped(source, m.start(), 0) for m in re.finditer(r"\$", source))


def _parse(
    parser: MathTextParser[VectorParse], math: str, font: FontProperties
) -> VectorParse | None:
    """The layout of math, or None when mathtext cannot parse it."""
    # mathtext warns that it substitutes a dummy symbol for a missing character; the caller
    # shows such a formula as code instead, so the warning would only mislead the logs.
    mathtext_log = logging.getLogger("matplotlib.mathtext")
    mathtext_log.addFilter(_not_missing_glyph)
    try:
        return parser.parse(math, dpi=72, prop=font)
    except (ValueError, RecursionError):
        # ValueError: a syntax error or unknown command; RecursionError: deep nesting (about
        # 30 levels of braces exhaust pyparsing's recursion).
        return None
    finally:
        mathtext_log.removeFilter(_not_missing_glyph)


def _not_missing_glyph(record: logging.LogRecord) -> bool:
    """Drops mathtext's warning about a character none of its fonts has."""
    return "does not have a glyph" not in str(record.msg)
