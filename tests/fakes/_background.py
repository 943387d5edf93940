"""Shared plumbing of the test fakes: cross-thread signalling, hold points, server lifecycle.

* :class:`SignalEvent` is a one-way flag that can be set from any thread and awaited from any
  event loop (or waited on with a blocking call); :func:`wait_any` awaits the first of several.
* :class:`Latch` is a hold point: an ``arrived`` signal plus a release; the fakes' ``Gate``
  (and ``Hang``) classes build on it.
* :class:`ServerLifecycle` gives a fake server ``async with`` support and its bound ``port``.
* :class:`ServerThread` runs an async server object (anything with ``start()`` / ``stop()``
  coroutines, such as ``FakeFeishu`` or ``FakeOpenAI``) on a private event loop in a daemon
  thread, so synchronous test code and subprocess-based tests can use it.
* :func:`read_form` reads a multipart body into text fields and :class:`FormFile` parts;
  :func:`form_summary` records it without the bytes.

The public classes of the fakes (``FakeFeishuThread``, ``FakeOpenAIThread``, ``Gate``, their
``SignalEvent``) are built on this module and re-exported by ``feishu_server`` /
``openai_server``; import them from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from aiohttp import web

#: connections the kernel completes for a fake server while its loop is too busy to accept them.
#: aiohttp's default (128) is below a burst of 200 answers opening their connections at once:
#: the kernel dropped the handshakes over it and those clients tried again after a second (the
#: TCP retransmission timeout), which a real server's accept queue would not have made them do.
LISTEN_BACKLOG = 1024

__all__ = [
    "LISTEN_BACKLOG",
    "AsyncServer",
    "Latch",
    "ServerLifecycle",
    "ServerThread",
    "SignalEvent",
    "resolve_future",
    "wait_any",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Thread-safe signalling
# --------------------------------------------------------------------------------------------


def resolve_future(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` with ``None`` unless it is already done (use on the future's loop)."""
    if not fut.done():
        fut.set_result(None)


class SignalEvent:
    """A one-way flag that can be set from any thread and awaited from any event loop.

    ``await event.wait()`` works in whichever loop the caller runs (the fake's loop or the
    test's loop when the fake runs in a thread); :meth:`wait_blocking` is for synchronous code.
    Wrap the await in :func:`asyncio.wait_for` to bound it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flag = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        """Return whether the event has been set."""
        return self._flag.is_set()

    def set(self) -> None:
        """Set the flag and wake every waiter (sync and async, in any thread)."""
        with self._lock:
            if self._flag.is_set():
                return
            self._flag.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # the waiter's loop is already closed
                loop.call_soon_threadsafe(resolve_future, fut)

    def _add_waiter(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> bool:
        with self._lock:
            if self._flag.is_set():
                return False
            self._waiters.append((loop, fut))
            return True

    def _remove_waiter(self, fut: asyncio.Future[None]) -> None:
        with self._lock:
            self._waiters = [(lp, f) for lp, f in self._waiters if f is not fut]

    async def wait(self) -> bool:
        """Wait until the flag is set; always returns ``True``."""
        await wait_any(self)
        return True

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block the calling thread until set; return ``False`` on timeout."""
        return self._flag.wait(timeout)

    def __repr__(self) -> str:
        return f"<SignalEvent set={self.is_set()}>"


async def wait_any(*events: SignalEvent) -> SignalEvent:
    """Wait until any of ``events`` is set and return the first one found set."""
    for event in events:
        if event.is_set():
            return event
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    registered: list[SignalEvent] = []
    try:
        for event in events:
            if not event._add_waiter(loop, fut):
                return event
            registered.append(event)
        await fut
    finally:
        for event in registered:
            event._remove_waiter(fut)
    for event in events:
        if event.is_set():
            return event
    raise AssertionError("unreachable: woken without any event set")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Hold points
# --------------------------------------------------------------------------------------------


class Latch:
    """A hold point: :attr:`arrived` tells that a request reached it, :meth:`release` frees it.

    The fakes set ``arrived`` and wait on the private ``_released`` event themselves (possibly
    racing it against their own shutdown). Thread-safe: every method works from any thread,
    ``wait_arrived`` from any event loop.
    """

    def __init__(self) -> None:
        self.arrived = SignalEvent()
        """Set when a request reached the hold point."""
        self._released = SignalEvent()

    def release(self) -> None:
        """Let the held request(s) continue. Safe to call from any thread, idempotent."""
        self._released.set()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released.is_set()

    async def wait_arrived(self, timeout: float = 5.0) -> None:
        """Await :attr:`arrived` with a timeout (raises :class:`TimeoutError`)."""
        await asyncio.wait_for(self.arrived.wait(), timeout)

    def wait_arrived_blocking(self, timeout: float = 5.0) -> None:
        """Block until :attr:`arrived` is set (raises :class:`TimeoutError`)."""
        if not self.arrived.wait_blocking(timeout):
            raise TimeoutError(f"no request arrived at {self!r} within {timeout}s")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} arrived={self.arrived.is_set()} released={self.released}>"


# --------------------------------------------------------------------------------------------
# Server lifecycle and background-thread runner
# --------------------------------------------------------------------------------------------


class ServerLifecycle:
    """Base of the fake servers: ``async with`` support and the bound :attr:`port`.

    ``async with`` runs :meth:`start` and :meth:`stop`, which a subclass implements (``start()``
    sets ``_port`` once the server is bound).
    """

    _port: int | None = None

    async def start(self) -> None:
        """Bind and start serving (idempotent)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Shut the server down (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (only once started)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port


class AsyncServer(Protocol):
    """What :class:`ServerThread` runs: an object with ``start()`` and ``stop()`` coroutines."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=AsyncServer)


class ServerThread(Generic[S]):
    """Runs an :class:`AsyncServer` (:attr:`fake`) on a private event loop in a daemon thread.

    :meth:`start` blocks until ``fake.start()`` has completed on that loop (an exception from
    it is re-raised as :class:`RuntimeError`); :meth:`close` runs ``fake.stop()``, stops the
    loop and joins the thread. :meth:`call` runs a coroutine on the loop from another thread.
    Usable as a context manager.
    """

    def __init__(self, fake: S, *, start_timeout: float = 10.0) -> None:
        self.fake = fake
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self.fake.start())
            except BaseException as exc:  # propagated by start()
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def start(self) -> Self:
        """Start the thread and wait until the server accepts connections."""
        if self._thread is not None:
            return self
        name = type(self).__name__
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError(f"{name} did not start in time")
        if self._error is not None:
            raise RuntimeError(f"{type(self.fake).__name__} failed to start") from self._error
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the server, stop the loop and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = None
        if not loop.is_closed() and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.fake.stop(), loop)
            try:
                future.result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, factory: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
        """Run ``factory()`` on the server's loop and return its result (blocking).

        Raises :class:`RuntimeError` when the thread was never started or when called from the
        server's own loop (that would deadlock), :class:`TimeoutError` after ``timeout``.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{type(self.fake).__name__} is not started")
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("a *_blocking call was made on the fake's own event loop")

        async def run() -> T:
            return await factory()

        coro = run()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise
        return future.result(timeout)


@dataclass(frozen=True)
class FormFile:
    """One file part of a multipart request, as received."""

    filename: str | None
    content_type: str | None
    data: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """Length of :attr:`data` in bytes."""
        return len(self.data)


async def read_form(request: web.Request) -> tuple[dict[str, str], dict[str, FormFile]]:
    """Text fields and file parts of a multipart (or urlencoded) body; empty for others."""
    fields: dict[str, str] = {}
    files: dict[str, FormFile] = {}
    try:
        form = await request.post()
    except ValueError:
        return fields, files
    for name, value in form.items():
        if isinstance(value, web.FileField):
            files[name] = FormFile(value.filename, value.content_type, value.file.read())
        elif isinstance(value, str):
            fields[name] = value
        else:
            fields[name] = bytes(value).decode("utf-8", errors="replace")
    return fields, files


def form_summary(fields: dict[str, str], files: dict[str, FormFile]) -> dict[str, object]:
    """A form as a JSON-friendly record: its text fields, and each file part as its
    ``filename``, ``content_type`` and ``size`` (the bytes stay in the :class:`FormFile`)."""
    summary: dict[str, object] = dict(fields)
    for name, part in files.items():
        summary[name] = {
            "filename": part.filename,
            "content_type": part.content_type,
            "size": part.size,
        }
    return summary
