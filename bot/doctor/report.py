"""What each doctor check found (:class:`Result`) and the whole run (:class:`Report`).

Plain data: the checks build results, :mod:`bot.doctor.render` turns them into lines. A result
never holds a secret; the renderer masks known secrets once more all the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "fail", "warn", "manual"]
"""``ok`` passed; ``fail`` must be fixed (doctor exits 1); ``warn`` worth knowing, or a check
that could not run (does not fail doctor); ``manual`` a step to do by hand in the console."""


@dataclass(frozen=True)
class Result:
    """One line of the checklist: a check's name, what it found and, when needed, the fix."""

    status: Status
    name: str
    detail: str
    fix: str | None = None

    @classmethod
    def ok(cls, name: str, detail: str) -> Result:
        """A check that passed."""
        return cls("ok", name, detail)

    @classmethod
    def fail(cls, name: str, problem: str, fix: str) -> Result:
        """A check that failed, with the fix in the user's words."""
        return cls("fail", name, problem, fix)

    @classmethod
    def warn(cls, name: str, note: str, fix: str | None = None) -> Result:
        """A note that does not fail doctor (also: a check that was not run, and why)."""
        return cls("warn", name, note, fix)

    @classmethod
    def manual(cls, name: str, step: str) -> Result:
        """A step doctor cannot check through the API: done by hand in the console."""
        return cls("manual", name, step)


@dataclass
class Report:
    """Every result of a doctor run, in the order they were found."""

    results: list[Result] = field(default_factory=list)

    def add(self, result: Result) -> Result:
        """Record a result and return it."""
        self.results.append(result)
        return result

    def count(self, status: Status) -> int:
        """How many results have this status."""
        return sum(1 for result in self.results if result.status == status)

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return self.count("fail") > 0

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, else 1 (warnings and manual steps do not count)."""
        return 1 if self.failed else 0
