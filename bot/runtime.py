"""Interpreter settings for a long-running bot process under load (``bench/concurrency.py``).

Threads besides the bot's event loop need the GIL promptly: the one that hands the events of the
long-connection process (:mod:`bot.feishu.ingress`) to the channel, the channel's background
loop, and the store's thread. With CPython's default 5 ms switch interval a thread that wakes
from I/O waits up to 5 ms for a busy loop to let go of the GIL, several times per event: at 200
concurrent conversations that queued events for seconds. A 0.5 ms interval cut the ACK p99 by
a third or more and the first visible text by a quarter, without costing CPU per answer
(measured when the ACK was still sent from this process).

After start-up the SDKs' modules and the settings are hundreds of thousands of objects that live
as long as the process; ``gc.freeze()`` moves them out of the collector's reach, so a full
collection during a burst no longer walks all of them (a 0.27 s pause, measured at 200).

Serving allocates quickly (every chunk, card update and log line), and almost all of it dies by
reference counting within milliseconds. With CPython's default first-generation threshold of
700 allocations the collector still ran about 200 times in a burst of 200 answers and promoted
short-lived objects into the older generations, whose collections then took up to 40–60 ms
with the GIL held: 0.22–0.50 s of collector time per burst. At 20 000 it ran 5 times, for
0.05–0.06 s, with no change in peak RSS.
"""

from __future__ import annotations

import gc
import sys
from typing import Final

#: the GIL switch interval while serving, in seconds (CPython's default: 0.005)
SWITCH_INTERVAL_S: Final = 0.0005
#: the collector's thresholds while serving (CPython's default: 700, 10, 10)
GC_THRESHOLDS: Final = (20_000, 10, 10)


def tune_for_serving() -> None:
    """Apply the settings above; call once, when start-up is done and before serving."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
