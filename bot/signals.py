"""Signal handling: a quiet stop from the very first instruction, and loop handlers while serving.

``python -m bot`` calls :func:`stop_quietly_on_sigterm` before it imports anything heavy, so a
SIGTERM that arrives while the bot is still starting (imports take a second or two) ends it with
exit code 0 instead of killing it by signal. While the bot serves, :func:`handling` replaces that
with a handler on the event loop that starts a graceful shutdown, and puts it back afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable, Iterator
from types import FrameType


class StopRequested(BaseException):
    """SIGTERM arrived outside the serving loop: unwind and exit 0."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested


def stop_quietly_on_sigterm() -> None:
    """Turn SIGTERM into :class:`StopRequested` (caught by the CLI: exit 0)."""
    signal.signal(signal.SIGTERM, _raise_stop)


@contextlib.contextmanager
def handling(signals: Iterable[signal.Signals], handler: Callable[[], None]) -> Iterator[None]:
    """Call ``handler`` on the loop when one of ``signals`` arrives, inside the block only.

    Where the loop cannot install handlers (not the main thread, or a platform without them),
    the block runs with the default behaviour instead. The handlers in place before the block
    are restored after it.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for number in signals:
        previous = signal.getsignal(number)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(number, handler)
            installed.append((number, previous))
    try:
        yield
    finally:
        for number, previous in installed:
            loop.remove_signal_handler(number)
            if previous is not None:
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(number, previous)
