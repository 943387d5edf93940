"""CPU time and peak memory of processes and threads, read from Linux's /proc (no psutil).

CPU times are user + system, in seconds (clock-tick resolution, usually 10 ms). Peak memory is
``VmHWM`` (the resident set's high-water mark) in MiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_IMPORT_FLOOR_CODE = """
import lark_oapi, openai
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""


def _stat_cpu_s(path: Path) -> float:
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = path.read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * _TICK_S


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of all threads of ``pid`` so far."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process so far."""
    return _stat_cpu_s(Path(f"/proc/self/task/{native_id}/stat"))


def peak_rss_mib(pid: int) -> float:
    """``VmHWM`` of ``pid``: the most resident memory it has held, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def import_floor_mib() -> float:
    """Peak RSS of a fresh interpreter that only imports ``lark_oapi`` and ``openai``."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_FLOOR_CODE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout.strip()) / 1024
