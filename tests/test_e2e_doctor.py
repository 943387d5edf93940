"""`python -m bot doctor` as a user runs it: exit codes 0, 1 and 2, and `--watch` seeing a message.

Subprocesses against the fakes running in threads: the SDK's long connection (`--watch`) is one
per process and cannot be stopped, so doctor ends its process itself.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty, Queue

import pytest

from tests.fakes.feishu_server import SAMPLE_SENDER_OPEN_ID, FakeFeishu, FakeFeishuThread
from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIThread
from tests.helpers import BOT_COMMAND, bot_environment, run_bot, write_settings

pytestmark = pytest.mark.slow

APP_SECRET = "e2e-app-secret-7c1d9a3f"
KEY = "sk-e2e-doctor-key-00000000000000000000000009"


@pytest.fixture
def feishu() -> Iterator[FakeFeishuThread]:
    with FakeFeishu(app_id="cli_e2e_doctor_01", app_secret=APP_SECRET).run_in_thread() as fake:
        yield fake


@pytest.fixture
def llm() -> Iterator[FakeOpenAIThread]:
    with FakeOpenAI().run_in_thread() as fake:
        yield fake


@pytest.fixture
def config(isolated: Path, feishu: FakeFeishuThread, llm: FakeOpenAIThread) -> Path:
    return write_settings(
        isolated / "settings.yaml",
        {
            "feishu": {"app_id": feishu.fake.app_id, "domain": feishu.domain},
            "llm": {"base_url": llm.base_url},
        },
    )


def environment(**extra: str) -> dict[str, str]:
    return bot_environment(FEISHU_APP_SECRET=APP_SECRET, OPENAI_API_KEYS=KEY, **extra)


def assert_no_secrets(text: str) -> None:
    for secret in (APP_SECRET, KEY):
        assert secret not in text
        assert secret[-8:] not in text


def test_doctor_exits_0_when_every_check_passes(config: Path, isolated: Path) -> None:
    done = run_bot("doctor", "--config", str(config), cwd=isolated, env=environment())

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith(f"✓ config: {config} loaded: ")
    assert "✗" not in done.stdout
    assert done.stdout.splitlines()[-1].startswith("doctor: all 9 checks passed.")
    assert done.stderr == ""
    assert_no_secrets(done.stdout + done.stderr)


def test_doctor_exits_1_when_a_check_fails(
    config: Path, isolated: Path, feishu: FakeFeishuThread
) -> None:
    feishu.fake.bot_enabled = False

    done = run_bot("doctor", "--config", str(config), cwd=isolated, env=environment())

    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ bot: the app has no bot feature (11205: app do not have bot)" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("doctor: 1 failed, 8 passed.")
    assert_no_secrets(done.stdout + done.stderr)


def test_doctor_exits_2_with_one_line_per_config_problem(config: Path, isolated: Path) -> None:
    env = bot_environment(OPENAI_API_KEYS=KEY)  # no FEISHU_APP_SECRET

    done = run_bot("doctor", "--config", str(config), cwd=isolated, env=env)

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: feishu.app_secret: is empty: set it in settings.yaml or the FEISHU_APP_SECRET "
        "environment variable"
    ]


class Lines:
    """A subprocess's stdout, read line by line on a thread so that reads can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: Queue[str | None] = Queue()
        assert process.stdout is not None
        stdout = process.stdout

        def pump() -> None:
            for line in stdout:
                self._queue.put(line.rstrip("\n"))
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, start: str, timeout: float = 30) -> str:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except Empty:
                seen = "\n".join(self.seen)
                raise AssertionError(f"no line starting {start!r} in:\n{seen}") from None
            if line is None:
                raise AssertionError(f"output ended before {start!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if line.startswith(start):
                return line


def test_watch_shows_who_sent_a_message_and_in_which_chat_but_not_the_text(
    config: Path, isolated: Path, feishu: FakeFeishuThread
) -> None:
    process = subprocess.Popen(
        [*BOT_COMMAND, "doctor", "--config", str(config), "--watch", "--watch-timeout", "30"],
        cwd=isolated,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = Lines(process)
        waiting = out.until("· watch: ")
        assert "send the bot a message now" in waiting
        assert "a running bot would not get it" in waiting
        feishu.fake.wait_for_connections_blocking(1, timeout=20)
        frame_id = feishu.deliver("p2p_text", text="what is the meaning of life")

        arrived = out.until("✓ watch: ")
        assert process.wait(timeout=20) == 0
        assert arrived == (
            f"✓ watch: im.message.receive_v1 arrived from {SAMPLE_SENDER_OPEN_ID} in a p2p chat: "
            "Feishu delivers messages to this machine"
        )
        assert feishu.fake.wait_for_ack_blocking(frame_id).code == 200
        assert process.stderr is not None
        out.until("doctor: all 10 checks passed.")
        text = "\n".join(out.seen) + process.stderr.read()
        assert "meaning of life" not in text
        assert_no_secrets(text)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_watch_fails_when_no_message_arrives_in_time(config: Path, isolated: Path) -> None:
    done = run_bot(
        "doctor",
        "--config",
        str(config),
        "--watch",
        "--watch-timeout",
        "1",
        cwd=isolated,
        env=environment(),
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ watch: no message arrived within 1 s" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("doctor: 1 failed, 9 passed.")
