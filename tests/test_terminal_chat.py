"""`python -m bot chat` as a user runs it: a subprocess against the fake OpenAI server."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.service import ConversationService
from bot.chat.terminal import ChatConsole, TerminalChat
from bot.config import ChatSettings
from bot.llm.events import Completed, StreamEvent, TextDelta
from bot.logging import configure_logging
from bot.store import SQLiteStore
from tests.chat_harness import KEY_A
from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIThread
from tests.helpers import BOT_COMMAND, bot_environment, run_bot, write_settings


@pytest.fixture
def server() -> Iterator[FakeOpenAIThread]:
    thread = FakeOpenAI().run_in_thread()
    yield thread
    thread.close()


@pytest.fixture
def settings_file(tmp_path: Path, server: FakeOpenAIThread) -> Path:
    return write_settings(
        tmp_path / "settings.yaml",
        {"llm": {"base_url": server.base_url, "keys": [{"key": KEY_A}]}},
    )


def chat(workdir: Path, lines: str) -> subprocess.CompletedProcess[str]:
    """``python -m bot chat`` with ``lines`` piped in, to completion."""
    return subprocess.run(
        [*BOT_COMMAND, "chat"],
        input=lines,
        cwd=workdir,
        env=bot_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_piped_chat_streams_answers_and_exits_at_end_of_input(
    tmp_path: Path, settings_file: Path, server: FakeOpenAIThread
) -> None:
    result = chat(tmp_path, "hello there\n/help\nsecond message\n")
    assert result.returncode == 0, result.stderr
    assert "bot> echo: hello there\n" in result.stdout
    assert "/reset — forget our conversation" in result.stdout
    assert "bot> echo: second message\n" in result.stdout
    assert KEY_A not in result.stdout + result.stderr
    contents = [m["content"] for m in server.fake.requests[-1].messages]
    assert contents[1:] == ["hello there", "echo: hello there", "second message"]


def test_terminal_history_survives_a_restart(
    tmp_path: Path, settings_file: Path, server: FakeOpenAIThread
) -> None:
    for line in ("the password is swordfish\n", "what was the password?\n"):
        assert chat(tmp_path, line).returncode == 0
    contents = [m["content"] for m in server.fake.requests[-1].messages]
    assert "the password is swordfish" in contents
    assert (tmp_path / "data" / "bot.db").exists()


def test_chat_works_without_feishu_credentials_or_keys(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"llm": {"base_url": "http://127.0.0.1:9/v1"}})
    result = chat(tmp_path, "hello\n")
    assert result.returncode == 0
    assert "I have no API key yet" in result.stdout
    assert "Traceback" not in result.stderr


def test_chat_with_invalid_config_exits_2(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"llm": {"model": ""}})
    result = run_bot("chat", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: llm.model:")


class _Output:
    """Collects a subprocess's stdout on a thread and lets the test wait for text in it."""

    def __init__(self, stream: object) -> None:
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        read = stream.read1  # type: ignore[attr-defined]
        while chunk := read(4096):
            with self._changed:
                self.text += chunk.decode()
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float = 10) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: needle in self.text, timeout):
                raise AssertionError(f"{needle!r} not in output: {self.text!r}")


def test_ctrl_c_cancels_the_current_answer_and_the_chat_goes_on(
    tmp_path: Path, settings_file: Path, server: FakeOpenAIThread
) -> None:
    server.fake.script(KEY_A, reply="a very long answer that never ends", chunk_size=2)
    held = server.fake.hold_next(after_chunks=1)
    process = subprocess.Popen(
        [*BOT_COMMAND, "chat"],
        cwd=tmp_path,
        env=bot_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    output = _Output(process.stdout)
    try:
        process.stdin.write(b"start a long answer\n")
        process.stdin.flush()
        held.wait_arrived_blocking(10)
        output.wait_for("bot> a ")
        process.send_signal(signal.SIGINT)
        output.wait_for("[answer cancelled]")
        held.release()
        server.fake.script(KEY_A, reply="short")
        process.stdin.write(b"and now?\n")
        process.stdin.close()
        assert process.wait(timeout=30) == 0
        output.wait_for("bot> short\n")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- log lines and the conversation ---------------------------------------------------------


class _Screen(io.StringIO):
    """stdout and stderr of one terminal: both land here, in the order written."""

    def isatty(self) -> bool:
        return False


class _ChattyModel:
    """Streams an answer and logs a warning in the middle of it."""

    async def stream(self, messages: Any, **_: Any) -> AsyncIterator[StreamEvent]:
        yield TextDelta("Packets ")
        logging.getLogger("bot.llm.keypool").warning("key_cooling key_id=k1")
        yield TextDelta("turn around.")
        yield Completed(usage=None, key_id="k1", finish_reason="stop")


async def test_a_log_line_never_lands_inside_the_bot_line(tmp_path: Path) -> None:
    screen = _Screen()
    console = ChatConsole(screen, screen)
    configure_logging(level="warning", stream=console.log_stream)
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"tell me about NAT\n")
        os.close(write_fd)
        service = ConversationService(store, _ChattyModel(), ChatSettings())
        await TerminalChat(service, model="m", input_fd=read_fd, console=console).run()
    finally:
        os.close(read_fd)
        await store.close()
        configure_logging(level="warning")  # back to stderr for the tests after this one
    lines = screen.getvalue().splitlines()
    (warning,) = [line for line in lines if "key_cooling" in line]
    assert warning.lstrip().startswith(("20", "[", "{"))  # the log line starts its own line
    at = lines.index(warning)
    assert lines[at - 1] == "bot> Packets "
    assert lines[at + 1] == "bot> …turn around."


def test_console_resumes_the_prompt_after_a_log_line() -> None:
    screen = _Screen()
    console = ChatConsole(screen, screen)
    console.write("you> ", resume="you> ")
    console.log_stream.write("a warning\n")
    console.write("hello\n")
    console.log_stream.write("between lines\n")
    assert screen.getvalue() == "you> \na warning\nyou> hello\nbetween lines\n"
