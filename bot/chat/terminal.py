"""The terminal chat: a REPL over the conversation service (``python -m bot chat``).

Answers stream as they arrive. Ctrl-C cancels the answer being written (at the prompt it only
reminds how to leave), Ctrl-D (end of input) exits. Reads stdin without a thread, so it also works
with piped input, one message per line. Log lines (stderr) never land inside a ``you>`` or
``bot>`` line: :class:`ChatConsole` ends the line first and shows its prefix again after.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import threading
from typing import TextIO, cast

from bot import signals
from bot.chat.replies import ReplyDelta, ReplyFailed, ReplyFinished, ReplyNotice, ReplyPreface
from bot.chat.service import ConversationService, IncomingMessage

CONVERSATION_ID = "terminal"
USER_ID = "terminal"

BANNER = "Chatting with {model}. /help for commands, Ctrl-C cancels an answer, Ctrl-D exits."


class _LineReader:
    """Reads whole lines from a file descriptor on the event loop (no blocking, no thread)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False

    async def readline(self) -> str | None:
        """The next line without its newline, or None at end of input."""
        while b"\n" not in self._buffer and not self._eof:
            await self._readable()
            chunk = os.read(self._fd, 65536)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").rstrip("\r")

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        try:
            loop.add_reader(self._fd, wake)
        except PermissionError:
            return  # a regular file (``< input.txt``): always readable, reads never block
        try:
            await ready
        finally:
            loop.remove_reader(self._fd)


class ChatConsole:
    """The chat's output, and a stream for log lines that keeps them on lines of their own.

    ``out`` receives the conversation (stdout) and ``log`` the log lines (stderr); on a terminal
    both show on one screen. A log line written while the conversation's line is unfinished
    (an answer streaming, or the ``you>`` prompt) first ends that line, then the prefix of the
    interrupted line is shown again (``bot> …`` or ``you>``) so the conversation goes on below.
    """

    def __init__(self, out: TextIO, log: TextIO) -> None:
        self._out = out
        self._log = log
        self._lock = threading.Lock()  # log lines may come from other threads
        self._at_line_start = True
        self._resume = ""
        self.log_stream = cast(TextIO, _LogStream(self))  # what a logging handler writes to

    def write(self, text: str, *, resume: str | None = None) -> None:
        """Show conversation text; ``resume`` is what to show again if a log line cuts in."""
        if not text:
            return
        with self._lock:
            self._out.write(text)
            self._out.flush()
            self._at_line_start = text.endswith("\n")
            if resume is not None:
                self._resume = resume

    def write_log(self, text: str) -> None:
        """Show log output on lines of its own."""
        with self._lock:
            interrupted = not self._at_line_start
            if interrupted:
                self._out.write("\n")
                self._out.flush()
            self._log.write(text)
            self._log.flush()
            if interrupted and self._resume:
                self._out.write(self._resume)
                self._out.flush()
            self._at_line_start = not (interrupted and self._resume)

    def log_isatty(self) -> bool:
        return self._log.isatty()


class _LogStream(io.TextIOBase):
    """The file object the log handler writes to (see :class:`ChatConsole`)."""

    def __init__(self, console: ChatConsole) -> None:
        self._console = console

    def write(self, text: str) -> int:
        self._console.write_log(text)
        return len(text)

    def isatty(self) -> bool:
        return self._console.log_isatty()


class TerminalChat:
    """The REPL. ``output`` receives the conversation; errors are part of it, never tracebacks."""

    def __init__(
        self,
        service: ConversationService,
        *,
        model: str,
        input_fd: int | None = None,
        output: TextIO | None = None,
        console: ChatConsole | None = None,
    ) -> None:
        self._service = service
        self._model = model
        self._input_fd = sys.stdin.fileno() if input_fd is None else input_fd
        self._console = console or ChatConsole(output or sys.stdout, sys.stderr)
        self._interactive = os.isatty(self._input_fd)
        self._answering: asyncio.Task[None] | None = None
        self._count = 0

    async def run(self) -> None:
        """Chat until end of input."""
        reader = _LineReader(self._input_fd)
        self._write(BANNER.format(model=self._model) + "\n")
        with signals.handling([signal.SIGINT], self._interrupt):
            while True:
                if self._interactive:
                    self._write("you> ", resume="you> ")
                line = await reader.readline()
                if line is None:
                    self._write("\n" if self._interactive else "")
                    return
                if not line.strip():
                    continue
                self._answering = asyncio.create_task(self._answer(line))
                with contextlib.suppress(asyncio.CancelledError):
                    await self._answering
                self._answering = None

    def _interrupt(self) -> None:
        if self._answering is not None and not self._answering.done():
            self._answering.cancel()
            self._write("\n[answer cancelled]\n")
        else:
            self._write("\n(Ctrl-D to exit)\n" + ("you> " if self._interactive else ""))

    async def _answer(self, text: str) -> None:
        self._count += 1
        message = IncomingMessage(
            conversation_id=CONVERSATION_ID,
            user_id=USER_ID,
            text=text,
            message_id=f"terminal-{os.getpid()}-{self._count}",
        )
        reply = self._service.handle(message)
        self._write("bot> ", resume="bot> …")
        streamed = False
        try:
            async for event in reply:
                if isinstance(event, ReplyDelta):
                    streamed = True
                    self._write(event.text)
                elif isinstance(event, ReplyNotice):
                    self._write(f"[{event.text}]\n")
                elif isinstance(event, ReplyPreface):
                    self._write(f"{event.text}\n")
                elif isinstance(event, ReplyFinished):
                    if not streamed:
                        self._write(event.text)
                    self._write(f"\n{event.note}\n" if event.note else "\n")
                elif isinstance(event, ReplyFailed):
                    self._write(f"{event.message}\n")
            await reply.commit()  # shown in full: keep the exchange in the history
        finally:
            await reply.aclose()

    def _write(self, text: str, *, resume: str | None = None) -> None:
        self._console.write(text, resume=resume)
