"""CPU time and peak memory of processes and threads, read from Linux's /proc (no psutil).

CPU times are user + system, in seconds (clock-tick resolution, usually 10 ms). Peak memory is
``VmHWM`` (the resident set's high-water mark) in MiB.

A process's children count as its own: the bot runs its long connection in a child process
(bot/feishu/ingress.py). Their CPU time is added, and so is the memory only they hold
(``Private_Clean`` + ``Private_Dirty`` of ``smaps_rollup``): pages a child shares with others
(its shared libraries) are in the bot's resident set already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_PRINT_PEAK = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""
_IMPORT_FLOOR_CODE = "import lark_oapi, openai\n" + _PRINT_PEAK
_ON_DEMAND_FLOOR_CODE = (
    "from bot.feishu import sdk_compat, sdk_loader\n"
    "sdk_loader.load_api_services_on_demand()\n"
    "import openai\n"
    "from lark_oapi.channel import FeishuChannel\n"
    "sdk_compat.build_client(app_id='a', app_secret='s', domain='https://open.feishu.cn',"
    " timeout_s=1)\n" + _PRINT_PEAK
)


def _stat_cpu_s(path: Path) -> float:
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = path.read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * _TICK_S


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of all threads of ``pid`` so far."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4 of proc(5): ppid
                found.append(int(entry.name))
    return found


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of ``pid`` and its live children."""
    return process_cpu_s(pid) + sum(process_cpu_s(child) for child in children(pid))


def private_mib(pid: int) -> float:
    """The memory only ``pid`` holds (private clean + dirty pages), in MiB."""
    kib = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def tree_peak_mib(pid: int) -> float:
    """``pid``'s peak resident memory plus what its live children hold privately now, in MiB."""
    return peak_rss_mib(pid) + sum(private_mib(child) for child in children(pid))


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process so far."""
    return _stat_cpu_s(Path(f"/proc/self/task/{native_id}/stat"))


def peak_rss_mib(pid: int) -> float:
    """``VmHWM`` of ``pid``: the most resident memory it has held, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def import_floor_mib(*, on_demand: bool = False) -> float:
    """Peak RSS of a fresh interpreter that only imports ``lark_oapi`` and ``openai``.

    ``on_demand``: imports them the way the bot does instead (bot/feishu/sdk_loader.py: the
    SDK's API services load on first use) and builds the bot's client, which loads the three
    services the bot answers with.
    """
    done = subprocess.run(
        [sys.executable, "-c", _ON_DEMAND_FLOOR_CODE if on_demand else _IMPORT_FLOOR_CODE],
        cwd=Path(__file__).resolve().parent.parent,  # the project's root: `bot` is importable
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout.strip()) / 1024
