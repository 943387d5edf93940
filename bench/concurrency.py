"""Print how three bots answer bursts of concurrent conversations on this machine (issue 13).

Same fakes, same burst, three bots, each in its own process and measured the same way:

* ``bot``: this project (``python -m bot run``, ``chat.stream_update_ms`` as given);
* ``reference``: bench/_reference_bot.py, the same Feishu calls per answer done as leanly as
  Python allows (its own long-connection client, aiohttp pools, no store, no history): the floor
  of the machine and the fakes;
* ``nonstreaming``: bench/_nonstreaming_bot.py, the reference answering with one text reply once
  the whole answer is there (what the user waits for without streaming).

Scenario: the fake LLM streams a 20-chunk answer, 400 ms to the first token and 100 ms per chunk
after it; every Feishu REST call takes one emulated 30 ms round trip. A burst is ``n`` p2p text
messages from ``n`` distinct users sent back to back on the long connection (after one warm-up
message); it ends when every answer is complete. A fresh bot process and fresh fakes per burst.

Output: one table of ``name value unit`` lines, ``<bot>.c<n>.<measure>``, the bots' rows side by
side (a row a bot has no value for is left out: the inbox is this bot's only, update intervals
need cards); then the issue's goals for ``bot`` as computed ratios next to their limits
(``goal.c<n>.<goal>`` and ``goal.c<n>.<goal>.limit``). Numbers only, no thresholds: the issue
asks for the ``vs_reference`` goals at 200 concurrent, the others at every concurrency.

What the measures are (latencies in seconds from the moment the fake sent the event frame):

* ``ack``: frame sent -> ACK back (the fake's ``AckRecord.latency``); ``inbox_insert``: -> the
  bot's ``message_accepted`` ``accepted_at`` (dedup mark and inbox row written);
  ``inbox_after_ack``: ACK -> that write (the event is only in the arrival journal meanwhile;
  negative when the write was done before the fake read the ACK frame);
* ``llm_request`` / ``llm_first_token`` / ``llm_done``: the LLM request reached the fake OpenAI /
  the fake sent the first token / the fake finished the answer (its real times, which run late
  under load: ``fake_openai_late`` is how much later than its nominal 2.3 s it finished);
* ``first_text``: the first card content update showing answer text was applied (for the
  non-streaming bot: its text reply); ``first_text_after_first_token``: from the fake sending
  an answer's first token to that update (``info.c<n>.first_text_after_first_token_p99`` holds
  it to the first-text goal's round trip + 50 ms: the goal counted from the model's real first
  token instead of its nominal one, so without the wait for the model's request;
  ``info.c<n>.first_text_floor_p99``: the lean bots' own first tokens' p99 plus one round
  trip, a first text that a bot doing more per message than they do cannot beat in that run);
  ``final_text``: the whole answer was on screen;
  ``wall``: first frame sent -> last answer complete (card closed / text sent);
* ``feishu_calls_per_reply`` (mean, max; refused calls included), ``update_interval_p50``: the
  median gap between a card's content updates before its final text; ``feishu_*_peak``: the
  most calls in any one second, all answer-path calls and element content updates (Feishu
  documents 50/s per app for each); ``feishu_connections``: client sockets they came over;
  ``feishu_rate_limited``: calls refused with 429 / 99991400 (only ``--feishu-limits`` refuses);
  ``log_*``: how often this bot logged an event ACKed before its journal write
  (``arrival_not_journaled``), a retried Feishu call, a skipped card update;
* ``cpu_per_answer``: the bot's user + system CPU over the burst / answers, its child
  processes' included (the bot's long-connection process);
  ``rss_peak``: its VmHWM plus the memory its children hold privately (bench/_procstat.py),
  next to ``floor.rss_import_lark_oapi_openai``, the peak RSS of a process that only imports
  lark_oapi and openai (the goal's floor), and ``floor.rss_import_on_demand``, the same
  imports the way the bot makes them (bot/feishu/sdk_loader.py: API services load on first
  use) with the bot's client built; ``info.c<n>.rss_vs_on_demand_floor`` is the bot's peak
  over the latter, what the bot holds beyond its SDKs; ``rss_children``: the children's share
  of it (the bot's long-connection process);
* the fakes' health (they are two threads of this process, sharing one GIL; a bot can look no
  better than they are): ``fake_*_cpu`` and ``bench_process_cpu`` in cores over the burst,
  ``fake_*_lag``: how late their event loops ran a callback posted every 50 ms,
  ``fake_burst_send``: how long the fake took to send the whole burst.

Options: ``--concurrency 1,50,200`` and ``--bots bot,reference,nonstreaming`` pick subsets,
``--quick`` is a smoke run (1 and 10), ``--feishu-limits`` makes the fake Feishu enforce
Feishu's documented rate limits (50/s and 1000/min per app per API, 10/s per card), which the
plain fakes do not have.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._bots import BOT_KINDS, BotKind
from bench._burst import COUNTED_EVENTS, BurstResult, Sample, run_burst
from bench._fake_world import Scenario
from bench._procstat import import_floor_mib
from bench._stats import percentile

DEFAULT_CONCURRENCY = (1, 50, 200)
QUICK_CONCURRENCY = (1, 10)
SLACK_S = 0.05  # the first-text goal's allowance on top of TTFT + one Feishu round trip
GOALS_AT_REFERENCE = {"wall": 1.2, "cpu_per_answer": 3.0, "ack_p99": 1.5}
RSS_OVER_FLOOR = 1.25

Measure = Callable[[BurstResult], float | None]


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    measure: Measure


def _values(result: BurstResult, pick: Callable[[Sample], float | None]) -> list[float]:
    return [v for v in map(pick, result.samples) if v is not None]


def _pct(pick: Callable[[Sample], float | None], q: float) -> Measure:
    def measure(result: BurstResult) -> float | None:
        values = _values(result, pick)
        return percentile(values, q) if values else None

    return measure


def _since_sent(field: str, offset: float = 0.0) -> Callable[[Sample], float | None]:
    def pick(sample: Sample) -> float | None:
        value = getattr(sample, field)
        return None if value is None else value + offset - sample.sent

    return pick


def _ack(sample: Sample) -> float | None:
    return sample.ack_latency


def _after_ack(sample: Sample) -> float | None:
    """ACK back -> inbox write done: the window in which the event is only in the journal."""
    if sample.accepted is None or sample.ack_latency is None:
        return None
    return sample.accepted - sample.sent - sample.ack_latency


def _gaps(result: BurstResult) -> float | None:
    gaps = [gap for sample in result.samples for gap in sample.gaps]
    return statistics.median(gaps) if gaps else None


def _answered(result: BurstResult) -> list[Sample]:
    return [s for s in result.samples if s.done is not None]


def _per_answer(result: BurstResult) -> float | None:
    answered = len(_answered(result))
    return result.cpu_s / answered if answered else None


def _calls_mean(result: BurstResult) -> float | None:
    answered = _answered(result)
    return statistics.mean(s.calls for s in answered) if answered else None


def _calls_max(result: BurstResult) -> float | None:
    return max((s.calls for s in _answered(result)), default=None)


def _fake_cpu(name: str) -> Measure:
    return lambda r: r.health.cpu_s[name] / r.wall_s if r.wall_s > 0 else None


def _fakes_cpu(result: BurstResult) -> float | None:
    return sum(result.health.cpu_s.values()) / result.wall_s if result.wall_s > 0 else None


def _log_count(name: str) -> Measure:
    return lambda r: r.log_counts.get(name)


def _bench_cpu(result: BurstResult) -> float | None:
    return result.health.process_cpu_s / result.wall_s if result.wall_s > 0 else None


def _fake_lag(name: str, q: float) -> Measure:
    def measure(result: BurstResult) -> float | None:
        lags = result.health.lags[name]
        return percentile(lags, q) if lags else None

    return measure


def _late(scenario: Scenario) -> Callable[[Sample], float | None]:
    """How much later than nominal the fake LLM finished an answer (its loop ran late, or the
    bot read slowly)."""

    def pick(sample: Sample) -> float | None:
        if sample.llm_done is None or sample.llm_request is None:
            return None
        return sample.llm_done - sample.llm_request - scenario.llm_answer_s

    return pick


def _after_first_token(sample: Sample) -> float | None:
    """How long after the fake LLM sent an answer's first token the user saw text."""
    if sample.first_text is None or sample.llm_first_token is None:
        return None
    return sample.first_text - sample.llm_first_token


def rows(scenario: Scenario) -> list[Row]:
    """The table's measures, in print order."""
    return [
        Row("answers", "count", lambda r: len(_answered(r))),
        Row("answers_incomplete", "count", lambda r: r.incomplete),
        Row("ack_p50", "s", _pct(_ack, 50)),
        Row("ack_p99", "s", _pct(_ack, 99)),
        Row("inbox_insert_p50", "s", _pct(_since_sent("accepted"), 50)),
        Row("inbox_insert_p99", "s", _pct(_since_sent("accepted"), 99)),
        Row("inbox_after_ack_p99", "s", _pct(_after_ack, 99)),
        Row("first_text_p50", "s", _pct(_since_sent("first_text"), 50)),
        Row("first_text_p99", "s", _pct(_since_sent("first_text"), 99)),
        Row("llm_request_p50", "s", _pct(_since_sent("llm_request"), 50)),
        Row("llm_request_p99", "s", _pct(_since_sent("llm_request"), 99)),
        Row("llm_first_token_p50", "s", _pct(_since_sent("llm_first_token"), 50)),
        Row("llm_first_token_p99", "s", _pct(_since_sent("llm_first_token"), 99)),
        Row("first_text_after_first_token_p50", "s", _pct(_after_first_token, 50)),
        Row("first_text_after_first_token_p99", "s", _pct(_after_first_token, 99)),
        Row("final_text_p50", "s", _pct(_since_sent("final_text"), 50)),
        Row("final_text_p99", "s", _pct(_since_sent("final_text"), 99)),
        Row("llm_done_p50", "s", _pct(_since_sent("llm_done"), 50)),
        Row("llm_done_p99", "s", _pct(_since_sent("llm_done"), 99)),
        Row("feishu_calls_per_reply", "calls", _calls_mean),
        Row("feishu_calls_per_reply_max", "calls", _calls_max),
        Row("update_interval_p50", "s", _gaps),
        Row("feishu_rate_limited", "count", lambda r: r.rate_limited),
        Row("feishu_calls_peak", "per_s", lambda r: r.calls_peak_per_s),
        Row("feishu_content_calls_peak", "per_s", lambda r: r.content_peak_per_s),
        Row("feishu_connections", "count", lambda r: r.connections),
        *(Row(f"log_{name}", "count", _log_count(name)) for name in COUNTED_EVENTS),
        Row("cpu_per_answer", "s", _per_answer),
        Row("wall", "s", lambda r: r.wall_s),
        Row("rss_peak", "MiB", lambda r: r.rss_mib),
        Row("rss_children", "MiB", lambda r: r.children_mib),
        Row("fake_burst_send", "s", lambda r: max(s.sent for s in r.samples) - r.started),
        Row("fake_feishu_cpu", "cores", _fake_cpu("fake_feishu")),
        Row("fake_openai_cpu", "cores", _fake_cpu("fake_openai")),
        Row("fakes_cpu", "cores", _fakes_cpu),
        Row("bench_process_cpu", "cores", _bench_cpu),
        Row("fake_feishu_lag_p99", "s", _fake_lag("fake_feishu", 99)),
        Row("fake_feishu_lag_max", "s", _fake_lag("fake_feishu", 100)),
        Row("fake_openai_lag_p99", "s", _fake_lag("fake_openai", 99)),
        Row("fake_openai_lag_max", "s", _fake_lag("fake_openai", 100)),
        Row("fake_openai_late_p99", "s", _pct(_late(scenario), 99)),
    ]


def fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}"


def line(name: str, value: float, unit: str) -> None:
    print(f"{name} {fmt(value)} {unit}")


def print_header(
    scenario: Scenario, floor_mib: float, on_demand_floor_mib: float, feishu_limits: bool
) -> None:
    print(
        "# bench/concurrency.py: bursts of concurrent p2p conversations, three bots, one machine\n"
        "# (loopback, fakes in threads of this process, bots in subprocesses; see the module\n"
        "# docstring). Latencies in s from the fake sending the event frame."
    )
    line("scenario.llm_first_token", scenario.ttft_s, "s")
    line("scenario.llm_chunk_delay", scenario.chunk_delay_s, "s")
    line("scenario.llm_chunks", scenario.chunks, "count")
    line("scenario.llm_answer_duration", scenario.llm_answer_s, "s")
    line("scenario.feishu_round_trip", scenario.rtt_s, "s")
    line("scenario.stream_update", scenario.update_ms / 1000, "s")
    line("scenario.feishu_limits", int(feishu_limits), "on")
    line("floor.rss_import_lark_oapi_openai", floor_mib, "MiB")
    line("floor.rss_import_on_demand", on_demand_floor_mib, "MiB")


def print_table(
    results: dict[tuple[BotKind, int], BurstResult],
    bots: Sequence[BotKind],
    concurrency: Sequence[int],
    scenario: Scenario,
) -> None:
    for n in concurrency:
        for row in rows(scenario):
            for kind in bots:
                result = results.get((kind, n))
                value = row.measure(result) if result is not None else None
                if value is not None:
                    line(f"{kind}.c{n}.{row.name}", value, row.unit)


def _goal(name: str, value: float | None, limit: float, unit: str) -> None:
    if value is None:
        return
    line(name, value, unit)
    line(f"{name}.limit", limit, unit)


def _first_text_floor(
    results: dict[tuple[BotKind, int], BurstResult],
    n: int,
    scenario: Scenario,
    first_token_p99: Measure,
) -> float | None:
    """The earliest first-text p99 the lean bots' own model tokens allowed in this run.

    A first text is shown one Feishu call after the model's first token at the soonest. The
    reference and non-streaming bots do nothing else before they ask the model, so their first
    tokens' p99 plus one round trip is a floor that a bot doing more per message does not get
    under in the same run; the first-text goal's limit can lie below it.
    """
    measured = []
    for kind in ("reference", "nonstreaming"):
        result = results.get((kind, n))
        if result is not None:
            first_token = first_token_p99(result)
            if first_token is not None:
                measured.append(first_token)
    return min(measured) + scenario.rtt_s if measured else None


def print_goals(
    results: dict[tuple[BotKind, int], BurstResult],
    concurrency: Sequence[int],
    scenario: Scenario,
    floor_mib: float,
    on_demand_floor_mib: float,
) -> None:
    table = {row.name: row.measure for row in rows(scenario)}
    first_text_limit = scenario.ttft_s + scenario.rtt_s + SLACK_S
    calls_limit = 2 + math.ceil(scenario.llm_answer_s * 1000 / scenario.update_ms)
    for n in concurrency:
        bot = results.get(("bot", n))
        if bot is None:
            continue
        reference = results.get(("reference", n))
        if reference is not None:
            for name, limit in GOALS_AT_REFERENCE.items():
                mine, floor = table[name](bot), table[name](reference)
                ratio = mine / floor if mine is not None and floor else None
                _goal(f"goal.c{n}.{name}_vs_reference", ratio, limit, "x")
        _goal(f"goal.c{n}.first_text_p99", table["first_text_p99"](bot), first_text_limit, "s")
        # The same bound counted from when the model really sent its first token (it sends
        # late under load), which leaves out the time before the bot asked the model.
        _goal(
            f"info.c{n}.first_text_after_first_token_p99",
            table["first_text_after_first_token_p99"](bot),
            scenario.rtt_s + SLACK_S,
            "s",
        )
        floor = _first_text_floor(results, n, scenario, table["llm_first_token_p99"])
        if floor is not None:
            line(f"info.c{n}.first_text_floor_p99", floor, "s")
        _goal(f"goal.c{n}.rss_vs_import_floor", bot.rss_mib / floor_mib, RSS_OVER_FLOOR, "x")
        # Not a goal: how much the bot holds beyond the SDK as it loads it.
        line(f"info.c{n}.rss_vs_on_demand_floor", bot.rss_mib / on_demand_floor_mib, "x")
        _goal(f"goal.c{n}.feishu_calls_per_reply_max", _calls_max(bot), calls_limit, "calls")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Print how this bot, a lean reference bot and a non-streaming baseline "
        "answer bursts of concurrent conversations between the test fakes (issue 13)."
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, DEFAULT_CONCURRENCY)),
        help="comma-separated burst sizes (default: %(default)s)",
    )
    parser.add_argument(
        "--bots",
        default=",".join(BOT_KINDS),
        help="comma-separated subset of %(default)s (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: bursts of {' and '.join(map(str, QUICK_CONCURRENCY))}",
    )
    parser.add_argument(
        "--update-ms",
        type=int,
        default=300,
        help="chat.stream_update_ms of every bot (default: %(default)s)",
    )
    parser.add_argument(
        "--feishu-limits",
        action="store_true",
        help="make the fake Feishu enforce Feishu's documented rate limits",
    )
    args = parser.parse_args(argv)
    args.concurrency = (
        list(QUICK_CONCURRENCY)
        if args.quick
        else [int(n) for n in args.concurrency.split(",") if n.strip()]
    )
    bots = [b.strip() for b in args.bots.split(",") if b.strip()]
    unknown = sorted(set(bots) - set(BOT_KINDS))
    if unknown or not bots:
        parser.error(f"--bots: unknown {unknown}; choose from {','.join(BOT_KINDS)}")
    args.bots = [kind for kind in BOT_KINDS if kind in bots]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scenario = Scenario(update_ms=args.update_ms)
    started = time.monotonic()
    floor_mib = import_floor_mib()
    on_demand_floor_mib = import_floor_mib(on_demand=True)
    results: dict[tuple[BotKind, int], BurstResult] = {}
    for n in args.concurrency:
        for kind in args.bots:
            print(f"# running {kind} c{n}…", file=sys.stderr, flush=True)
            result = run_burst(kind, n, scenario, feishu_limits=args.feishu_limits)
            results[(kind, n)] = result
            for failure in result.failures[:3]:
                print(f"# {kind} c{n}: {failure}", file=sys.stderr)
    print_header(scenario, floor_mib, on_demand_floor_mib, args.feishu_limits)
    print_table(results, args.bots, args.concurrency, scenario)
    print_goals(results, args.concurrency, scenario, floor_mib, on_demand_floor_mib)
    print(f"# total benchmark time {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
