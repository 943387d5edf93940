"""Signal handlers on the running event loop, installed for the duration of a ``with`` block."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator


@contextlib.contextmanager
def handling(signals: Iterable[signal.Signals], handler: Callable[[], None]) -> Iterator[None]:
    """Call ``handler`` on the loop when one of ``signals`` arrives, inside the block only.

    Where the loop cannot install handlers (not the main thread, or a platform without them),
    the block runs with the default behaviour instead.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for number in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(number, handler)
            installed.append(number)
    try:
        yield
    finally:
        for number in installed:
            loop.remove_signal_handler(number)
