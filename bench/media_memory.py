"""Print what media cost the bot in memory: peak RSS without formulas, and with them (issue 11).

The bot reads voice, images, files and formulas with PyAV, Pillow, pypdf and matplotlib, and
imports each only when it first meets that kind of media. This bench checks that promise where
it matters most, matplotlib (the largest: numpy, fonts, the Agg renderer): the same burst as
``bench/concurrency.py`` (a fresh bot process and fresh fakes per run), once with plain answers
and once with every answer holding a display formula, which the bot draws and uploads.

Output (``name value unit`` lines):

* ``floor.rss_import_lark_oapi_openai``: a process that only imports the two SDKs;
* ``media.c<n>.plain.rss_peak`` / ``media.c<n>.formula.rss_peak``: the bot's VmHWM over the run;
* ``media.c<n>.formula.rss_extra``: what drawing formulas added;
* ``media.c<n>.plain.rss_vs_import_floor``: the ratio issue 13 bounds at 1.25;
* ``media.c<n>.<run>.cpu_per_answer``, ``.incomplete``: so a broken run is not mistaken for a
  lean one.

Options: ``--concurrency 1,20``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._burst import run_burst
from bench._fake_world import Scenario
from bench._procstat import import_floor_mib

FORMULA = " $$\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$$"


@dataclass(frozen=True)
class FormulaScenario(Scenario):
    """The usual answer, ending in a display formula."""

    @property
    def answer(self) -> str:
        return super().answer + FORMULA


def line(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.3f} {unit}" if isinstance(value, float) else f"{name} {value} {unit}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="1,20", help="comma-separated burst sizes")
    args = parser.parse_args(argv)
    sizes = [int(each) for each in args.concurrency.split(",") if each.strip()]
    floor = import_floor_mib()
    print("# bench/media_memory.py: the bot's peak RSS without and with formulas")
    line("floor.rss_import_lark_oapi_openai", floor, "MiB")
    for n in sizes:
        runs = {"plain": Scenario(), "formula": FormulaScenario()}
        rss: dict[str, float] = {}
        for name, scenario in runs.items():
            result = run_burst("bot", n, scenario)
            rss[name] = result.rss_mib
            line(f"media.c{n}.{name}.rss_peak", result.rss_mib, "MiB")
            line(f"media.c{n}.{name}.cpu_per_answer", result.cpu_s / max(1, n), "s")
            line(f"media.c{n}.{name}.incomplete", float(result.incomplete), "answers")
        line(f"media.c{n}.formula.rss_extra", rss["formula"] - rss["plain"], "MiB")
        line(f"media.c{n}.plain.rss_vs_import_floor", rss["plain"] / floor, "x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
