"""Doctor's output: one plain-text line per result, the fix indented below, a summary.

``✓ name: detail`` passed, ``✗ name: problem`` failed (then ``    fix: …``), ``! name: note``
a warning or a check not run, ``· name: step`` a manual step. Every line goes through the
:class:`~bot.logging.Redactor` first, so a secret that slipped into a result is masked anyway.
"""

from __future__ import annotations

from typing import Final, TextIO

from bot.doctor.report import Report, Result, Status
from bot.logging import Redactor

SYMBOLS: Final[dict[Status, str]] = {"ok": "✓", "fail": "✗", "warn": "!", "manual": "·"}
FIX_INDENT: Final = "    "


def render_result(result: Result) -> list[str]:
    """The lines of one result."""
    lines = [f"{SYMBOLS[result.status]} {result.name}: {result.detail}"]
    if result.fix:
        lines.append(f"{FIX_INDENT}fix: {result.fix}")
    return lines


def summary(report: Report) -> str:
    """The last line: what passed and failed, and what to do next."""
    passed, failed, warnings = report.count("ok"), report.count("fail"), report.count("warn")
    notes = f", {warnings} note{'s' if warnings != 1 else ''}" if warnings else ""
    if failed:
        return (
            f"doctor: {failed} failed, {passed} passed{notes}. Fix the ✗ items above, then run "
            "`make doctor` again."
        )
    return (
        f"doctor: all {passed} checks passed{notes}. Do the · steps above if you have not yet, "
        "then `make run`."
    )


class Printer:
    """Writes results as they come (flushed at once: network checks take a moment)."""

    def __init__(self, out: TextIO, redactor: Redactor) -> None:
        self._out = out
        self._redactor = redactor

    def result(self, result: Result) -> None:
        """Print one result."""
        for line in render_result(result):
            self.line(line)

    def line(self, text: str) -> None:
        """Print one line, secrets masked."""
        self._out.write(self._redactor.text(text) + "\n")
        self._out.flush()

    def summary(self, report: Report) -> None:
        """Print the summary line."""
        self.line(summary(report))
