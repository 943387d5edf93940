"""Print where a burst's ACK latency comes from: machine, SDK, journal or the bot (issue 13).

Five receivers of the same bursts on the same fakes, each in its own process, fresh per receiver:

* ``reference``: bench/_reference_bot.py (its own aiohttp long-connection client, ACK at once,
  then it answers): the floor of the machine and the fakes, as in bench/concurrency.py;
* ``sdk``: bench/_sdk_floor_bot.py, the SDK's ``FeishuChannel`` on its own WebSocket thread, with
  a handler that does nothing: what the SDK itself costs between a frame and its ACK;
* ``ws``: the SDK's bare WebSocket client without the channel, with a handler that returns at
  once;
* ``ws_journal``: the bot's own long-connection process (bot/feishu/ingress_child.py), which
  journals every message event, handing its events to a process that drops them: the floor of
  the bot's long connection;
* ``bot``: ``python -m bot run``, which answers every message meanwhile; its long connection
  and journal run in a process of their own (bot/feishu/ingress.py), so its floor is
  ``ws_journal``'s.

A burst is ``n`` p2p text messages sent back to back (bench/_burst.py's sending: one frame after
the other, as fast as the socket takes them); between bursts the answering receivers finish
their answers. ``ack`` is frame sent -> ACK back (the fake's ``AckRecord.latency``).

Output: ``ack_floor.<receiver>.c<n>.<measure> value unit`` lines: ``ack_p50`` and ``ack_p99`` (the
median over the bursts), ``ack_p99_min`` / ``ack_p99_max`` (their spread), then
``ack_p99_vs_reference`` (median over median). Numbers only, no thresholds. Options:
``--concurrency 200``, ``--bursts 3``, ``--receivers reference,sdk,ws,ws_journal,bot``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._bots import READY_TIMEOUT_S, BotKind, CommandProcess, feishu_options, start_bot
from bench._burst import _events, _message_ids, _questions, _send, _wait_done
from bench._fake_world import FakeWorld, Scenario, fake_world, start_round_trips
from bench._stats import percentile
from tests.e2e_harness import BotProcess

RECEIVERS: Final = ("reference", "sdk", "ws", "ws_journal", "bot")
#: the receivers that answer what they receive (bench/_bots.py starts them)
ANSWERING: Final[dict[str, BotKind]] = {"reference": "reference", "bot": "bot"}
ACK_TIMEOUT_S = 60.0
POLL_S = 0.02


def _start(receiver: str, world: FakeWorld, scenario: Scenario, workdir: Path) -> BotProcess:
    kind = ANSWERING.get(receiver)
    if kind is not None:
        process = start_bot(kind, world, scenario, workdir)
        start_round_trips(world, scenario)
        return process
    fs = world.fs
    command = [sys.executable, "-m", "bench._sdk_floor_bot", *feishu_options(fs)]
    if receiver.startswith("ws"):
        command.append("--raw")
    if receiver.endswith("_journal"):
        command += ["--journal", str(workdir / "journal.db")]
    process = CommandProcess(workdir, command).start()
    try:
        process.wait_for_event("bot_ready", timeout=READY_TIMEOUT_S)
        fs.wait_for_connections_blocking(1, timeout=READY_TIMEOUT_S)
    except BaseException:
        process.kill()
        raise
    return process


def _burst_acks(world: FakeWorld, tag: str, n: int) -> tuple[list[float], list[str]]:
    """Send one burst; return its ACK latencies (once every frame is ACKed) and frame ids."""
    frames = _send(world, _events(world.fs, tag, _questions(tag, n)))
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while True:
        deliveries = [world.fs.delivery(frame) for frame in frames]
        if all(d.acks for d in deliveries):
            latencies = [d.acks[0].latency for d in deliveries]
            return [latency for latency in latencies if latency is not None], frames
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(not d.acks for d in deliveries)} frames were never ACKed")
        time.sleep(POLL_S)


def measure(receiver: str, n: int, bursts: int) -> list[tuple[float, float]]:
    """``(p50, p99)`` of the ACK latency of each of ``bursts`` bursts of ``n`` messages."""
    scenario = Scenario()
    answers = receiver in ANSWERING
    results = []
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-ack-{receiver}-") as tmp,
        fake_world(scenario, feishu_limits=False) as world,
    ):
        process = _start(receiver, world, scenario, Path(tmp))
        try:
            for index in range(bursts + 1):  # the first, a single message, warms up
                tag = f"{receiver}-{index}"
                acks, frames = _burst_acks(world, tag, n if index else 1)
                if answers:
                    _wait_done(world, process, _message_ids(world, frames), 60 + 0.5 * n)
                if process.exited():
                    raise RuntimeError(f"the {receiver} receiver exited:\n{process.output}")
                if index:
                    results.append((percentile(acks, 50), percentile(acks, 99)))
        finally:
            process.stop()
    return results


def report(receiver: str, n: int, results: Sequence[tuple[float, float]]) -> float:
    """Print one receiver's lines; return its median p99."""
    name = f"ack_floor.{receiver}.c{n}"
    p99s = [p99 for _, p99 in results]
    p99 = statistics.median(p99s)
    print(f"{name}.ack_p50 {statistics.median(p50 for p50, _ in results):.4g} s")
    print(f"{name}.ack_p99 {p99:.4g} s")
    print(f"{name}.ack_p99_min {min(p99s):.4g} s")
    print(f"{name}.ack_p99_max {max(p99s):.4g} s")
    return p99


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    receivers = [r for r in options.receivers.split(",") if r]
    unknown = set(receivers) - set(RECEIVERS)
    if unknown:
        parser.error(f"unknown receivers: {', '.join(sorted(unknown))}")
    n = options.concurrency
    print(f"# bench/ack_floor.py: ACK latency of {options.bursts} bursts of {n}, per receiver")
    p99s = {}
    for receiver in receivers:
        print(f"# running {receiver}…", file=sys.stderr, flush=True)
        p99s[receiver] = report(receiver, n, measure(receiver, n, options.bursts))
    if "reference" in p99s:
        for receiver, p99 in p99s.items():
            if receiver != "reference":
                ratio = p99 / p99s["reference"]
                print(f"ack_floor.{receiver}.c{n}.ack_p99_vs_reference {ratio:.3g} x")


if __name__ == "__main__":
    main()
