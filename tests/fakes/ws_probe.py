"""A tiny real-SDK client for the fake Feishu, run as a subprocess by the tests.

``lark_oapi.ws.client`` binds a module-level event loop at import time and its ``start()`` never
returns; the SDK also caches tenant tokens process-wide. So every test that needs a live
long-connection client runs this script in its own process::

    python -m tests.fakes.ws_probe --domain http://127.0.0.1:PORT --app-id .. --app-secret ..
        [--mode channel|raw] [--batch-delay-ms N] [--retry-base-ms N] [--block-on TEXT]

``--mode channel`` (default) starts :class:`lark_oapi.channel.FeishuChannel` with
``start_background()``; ``--mode raw`` runs the bare ``lark_oapi.ws.Client`` with an
``EventDispatcherHandler`` (whose handler runs synchronously before the ACK).

Protocol: every line on stdout is one JSON object with an ``"event"`` key (``ready``,
``start_failed``, ``message``, ``handler_blocked``, ``handler_done``, ``result``, ``reject``,
``reconnecting``, ``reconnected``, ``error``, ``stopped``). Commands are JSON lines on stdin:

* ``{"cmd": "send", "id": 1, "to": "oc_..", "message": {"text": "hi"}, "opts": {...}}``
* ``{"cmd": "stream", "id": 2, "to": "oc_..", "chunks": ["a", "b"], "mode": "append"|"set",
  "fail": false, "opts": {...}}`` (a ``{"markdown": producer}`` stream)
* ``{"cmd": "release"}`` lets handlers blocked on a message containing ``HOLD`` (channel mode)
  or the ``--block-on`` text (raw mode) continue
* ``{"cmd": "stop"}`` stops the channel and exits.

:class:`ProbeProcess` is the test-side helper that starts the script and reads its lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_OUT_LOCK = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line to stdout (thread-safe)."""
    line = json.dumps({"event": event, **fields}, ensure_ascii=False, default=str)
    with _OUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _exception_fields(exc: BaseException) -> dict[str, Any]:
    cause = exc.__cause__
    code = getattr(exc, "code", None)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "code": getattr(code, "value", code),
        "cause_type": type(cause).__qualname__ if cause is not None else None,
        "cause_code": getattr(cause, "code", None),
        "cause": str(cause) if cause is not None else None,
    }


def _inbound_fields(msg: Any) -> dict[str, Any]:
    raw = msg.raw if isinstance(msg.raw, dict) else {}
    return {
        "message_id": msg.message_id,
        "create_time": msg.create_time,
        "chat_id": msg.chat_id,
        "chat_type": msg.chat_type,
        "thread_id": msg.conversation.thread_id,
        "sender": {
            "open_id": msg.sender.open_id,
            "union_id": msg.sender.union_id,
            "user_id": msg.sender.user_id,
            "display_name": msg.sender.display_name,
            "is_bot": msg.sender.is_bot,
        },
        "mentions": [
            {"key": m.key, "open_id": m.open_id, "name": m.name, "is_bot": m.is_bot}
            for m in msg.mentions
        ],
        "mentioned_all": msg.mentioned_all,
        "mentioned_bot": msg.mentioned_bot,
        "reply_to": msg.reply_to_message_id,
        "content_kind": getattr(msg.content, "kind", None),
        "content_text": msg.content_text,
        "content_attr_text": getattr(msg.content, "text", None),
        "raw_content_type": msg.raw_content_type,
        "raw_root_id": raw.get("root_id"),
        "raw_parent_id": raw.get("parent_id"),
        "batched": len(msg.batched_sources or []),
        "thread": threading.current_thread().name,
    }


def _stdin_commands() -> queue.Queue[dict[str, Any] | None]:
    """Read JSON commands from stdin in a daemon thread; ``None`` marks EOF."""
    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def pump() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                commands.put(json.loads(line))
        commands.put(None)

    threading.Thread(target=pump, name="probe-stdin", daemon=True).start()
    return commands


async def _run_channel(args: argparse.Namespace) -> None:
    from lark_oapi.channel import (
        FeishuChannel,
        OutboundConfig,
        RetryConfig,
        SafetyConfig,
        TextBatchConfig,
    )
    from lark_oapi.core.enum import LogLevel

    channel = FeishuChannel(
        app_id=args.app_id,
        app_secret=args.app_secret,
        domain=args.domain,
        log_level=LogLevel.INFO,
        safety=SafetyConfig(text_batch=TextBatchConfig(delay_ms=args.batch_delay_ms)),
        outbound=OutboundConfig(
            retry=RetryConfig(max_attempts=args.retry_attempts, base_delay_ms=args.retry_base_ms)
        ),
    )
    release = threading.Event()

    async def on_message(msg: Any) -> None:
        emit("message", **_inbound_fields(msg))
        if "HOLD" in msg.content_text:
            emit("handler_blocked", message_id=msg.message_id)
            await asyncio.to_thread(release.wait, 30)
            emit("handler_done", message_id=msg.message_id)

    channel.on("message", on_message)
    channel.on("reconnecting", lambda: emit("reconnecting"))
    channel.on("reconnected", lambda: emit("reconnected"))
    channel.on("reject", lambda e: emit("reject", message_id=e.message_id, reason=e.reason))
    channel.on("error", lambda e: emit("error", **_exception_fields(e)))

    started = time.monotonic()
    try:
        await channel.start_background(timeout=args.start_timeout)
    except Exception as exc:
        emit("start_failed", elapsed=time.monotonic() - started, **_exception_fields(exc))
        os._exit(3)
    identity = channel.bot_identity
    emit(
        "ready",
        elapsed=time.monotonic() - started,
        bot_open_id=identity.open_id if identity else None,
        bot_name=identity.name if identity else None,
    )

    commands = _stdin_commands()
    tasks: set[asyncio.Task[None]] = set()
    while True:
        command = await asyncio.to_thread(commands.get)
        if command is None or command.get("cmd") == "stop":
            await channel.stop_background()
            emit("stopped")
            os._exit(0)
        if command["cmd"] == "release":
            release.set()
        elif command["cmd"] in ("send", "stream"):
            run = _send if command["cmd"] == "send" else _stream
            task = asyncio.ensure_future(run(channel, command))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def _send(channel: Any, command: dict[str, Any]) -> None:
    try:
        result = await channel.send(command["to"], command["message"], command.get("opts"))
    except Exception as exc:
        emit("result", id=command.get("id"), ok=False, exception=_exception_fields(exc))
        return
    error = result.error
    emit(
        "result",
        id=command.get("id"),
        ok=result.success,
        message_id=result.message_id,
        chunk_ids=result.chunk_ids,
        error=None
        if error is None
        else {
            "code": error.code.value,
            "raw_code": error.raw_code,
            "retryable": error.retryable,
            "hint": error.hint,
            "retry_after_seconds": error.retry_after_seconds,
        },
    )


async def _stream(channel: Any, command: dict[str, Any]) -> None:
    chunks: list[str] = command["chunks"]
    mode = command.get("mode", "append")

    async def producer(ctl: Any) -> None:
        for chunk in chunks:
            if mode == "set":
                await ctl.set_content(chunk)
            else:
                await ctl.append(chunk)
            await asyncio.sleep(command.get("pause", 0))
        if command.get("fail"):
            raise RuntimeError("producer failed on purpose")

    try:
        result = await channel.stream(command["to"], {"markdown": producer}, command.get("opts"))
    except Exception as exc:
        emit("result", id=command.get("id"), ok=False, exception=_exception_fields(exc))
        return
    emit("result", id=command.get("id"), ok=result.success, message_id=result.message_id)


def _run_raw(args: argparse.Namespace) -> None:
    import lark_oapi as lark

    release = threading.Event()

    def on_message(data: Any) -> None:
        message = data.event.message
        text = json.loads(message.content or "{}").get("text", "")
        emit(
            "message",
            message_id=message.message_id,
            event_id=data.header.event_id,
            text=text,
            conn_id=client._conn_id,
            thread=threading.current_thread().name,
        )
        if args.block_on and args.block_on in text:
            emit("handler_blocked", message_id=message.message_id)
            release.wait(30)  # blocks the SDK's loop: the ACK waits for this handler
            emit("handler_done", message_id=message.message_id)

    handler = (
        lark.EventDispatcherHandler.builder("", "")
        .register_p2_im_message_receive_v1(on_message)
        .build()
    )
    client = lark.ws.Client(
        args.app_id,
        args.app_secret,
        event_handler=handler,
        domain=args.domain,
        log_level=lark.LogLevel.INFO,
    )
    commands = _stdin_commands()

    def control() -> None:
        while True:
            command = commands.get()
            if command is None or command.get("cmd") == "stop":
                emit("stopped")
                os._exit(0)
            if command.get("cmd") == "release":
                release.set()

    threading.Thread(target=control, name="probe-control", daemon=True).start()
    try:
        client.start()
    except Exception as exc:
        emit("start_failed", **_exception_fields(exc))
        os._exit(3)


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse arguments, run the probe until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--app-secret", required=True)
    parser.add_argument("--mode", choices=("channel", "raw"), default="channel")
    parser.add_argument("--batch-delay-ms", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--retry-attempts", type=int, default=3, help="RetryConfig.max_attempts")
    parser.add_argument("--retry-base-ms", type=int, default=500, help="RetryConfig.base_delay_ms")
    parser.add_argument("--block-on", default="", help="raw mode: block handlers on this text")
    args = parser.parse_args(argv)
    # Import the SDK here, on the main thread and before any loop runs: ws/client.py binds its
    # module-level ``loop`` at import time.
    import lark_oapi  # noqa: F401

    if args.mode == "raw":
        _run_raw(args)
    else:
        asyncio.run(_run_channel(args))


# --------------------------------------------------------------------------------------------
# Test-side helper
# --------------------------------------------------------------------------------------------


class ProbeProcess:
    """Start ``ws_probe`` in a subprocess and read its JSON lines with timeouts."""

    def __init__(
        self,
        domain: str,
        *,
        app_id: str,
        app_secret: str,
        mode: str = "channel",
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = str(REPO_ROOT)
        environment["PYTHONUNBUFFERED"] = "1"
        environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost"
        command = [
            sys.executable,
            "-m",
            "tests.fakes.ws_probe",
            "--domain",
            domain,
            "--app-id",
            app_id,
            "--app-secret",
            app_secret,
            "--mode",
            mode,
            *extra_args,
        ]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._consumed: set[int] = set()
        self._cond = threading.Condition()
        self._next_id = 0
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "raw", "line": raw.rstrip("\n")}
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"event": "eof"})
            self._cond.notify_all()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.rstrip("\n"))

    def expect(
        self,
        event: str,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Return (and consume) the first unconsumed line of ``event`` matching ``fields``."""

        def find() -> dict[str, Any] | None:
            for index, line in enumerate(self.lines):
                if index in self._consumed or line.get("event") != event:
                    continue
                if all(line.get(k) == v for k, v in fields.items()) and (
                    where is None or where(line)
                ):
                    self._consumed.add(index)
                    return line
            return None

        with self._cond:
            found = self._cond.wait_for(find, timeout)
        if found is None:
            tail = "\n".join(self.stderr[-40:])
            raise TimeoutError(
                f"probe: no {event!r} line matching {fields} within {timeout}s; "
                f"lines={self.lines!r}\nstderr tail:\n{tail}"
            )
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        """All lines of ``event`` received so far (consumed or not)."""
        with self._cond:
            return [line for line in self.lines if line.get("event") == event]

    def send(self, command: Mapping[str, Any]) -> None:
        """Write one command line to the probe's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()

    def request(self, command: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a ``send``/``stream`` command and wait for its ``result`` line."""
        self._next_id += 1
        self.send({**command, "id": self._next_id})
        return self.expect("result", timeout, id=self._next_id)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit and return its code."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop the probe (politely, then by killing it)."""
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "stop"})
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    main()
