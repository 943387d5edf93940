"""One bot per store: the instance lock refuses a second process and names the first."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bot.errors import StoreLocked
from bot.store.lock import InstanceLock, lock_holder
from tests.helpers import bot_environment

LOCK = Path("data/bot.db.lock")

HOLDER_SCRIPT = """
import sys
from pathlib import Path
from bot.store.lock import InstanceLock

lock = InstanceLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another bot process holding the lock; it releases when told, and exits at EOF."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def expect(self, line: str) -> None:
        assert self.process.stdout is not None
        got = self.process.stdout.readline().strip()
        if got != line:
            self.process.kill()
            _, errors = self.process.communicate()
            pytest.fail(f"holder printed {got!r}, not {line!r}; stderr: {errors}")

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("release\n")
        self.process.stdin.flush()
        self.expect("released")


@contextmanager
def holder_process(path: Path) -> Iterator[Holder]:
    """Start a process that takes the lock at ``path``; yields once it holds it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(path)],
        env=bot_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder = Holder(process)
    try:
        holder.expect("locked")
        yield holder
    finally:
        process.kill()
        process.communicate()


def test_a_second_bot_is_refused_with_the_pid_of_the_first() -> None:
    with holder_process(LOCK) as first, pytest.raises(StoreLocked) as caught:
        InstanceLock(LOCK).acquire()
    message = str(caught.value)
    assert message.startswith(
        f"the store data/bot.db is in use by another running bot (pid {first.pid}, started "
    )
    assert message.endswith("): stop it first, or give this one its own store.url")
    assert re.search(r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", message)
    assert caught.value.holder.startswith(f"pid {first.pid}, ")


def test_the_lock_is_free_once_its_holder_is_killed_with_sigkill() -> None:
    with holder_process(LOCK) as first:
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait() == -signal.SIGKILL
        with InstanceLock(LOCK):
            assert lock_holder(LOCK) == _our_holder_line()


def test_the_lock_is_free_once_its_holder_releases_it() -> None:
    with holder_process(LOCK) as first:
        first.release()
        assert first.process.poll() is None  # still running, no longer holding
        assert lock_holder(LOCK) is None
        second = InstanceLock(LOCK)
        second.acquire()
        second.release()


def test_two_locks_in_one_process_exclude_each_other_until_released() -> None:
    first, second = InstanceLock(LOCK), InstanceLock(LOCK)
    first.acquire()
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}, started"):
        second.acquire()
    first.release()
    second.acquire()
    assert second.held
    second.release()
    assert not second.held


def test_lock_holder_names_the_holder_and_is_none_when_free() -> None:
    assert lock_holder(LOCK) is None  # no file yet
    assert not LOCK.exists()  # and asking did not create one
    with holder_process(LOCK) as first:
        holder = lock_holder(LOCK)
        assert holder is not None
        assert holder.startswith(f"pid {first.pid}, started ")
    assert lock_holder(LOCK) is None
    assert LOCK.exists()  # never deleted: deleting would race with the next bot


def test_a_holder_that_left_no_readable_note_is_another_process() -> None:
    with holder_process(LOCK):
        LOCK.write_bytes(b"\xff\xfe not a note")  # flock is advisory: the bytes can change
        assert lock_holder(LOCK) == "another process"
        with pytest.raises(StoreLocked) as caught:
            InstanceLock(LOCK).acquire()
    assert str(caught.value) == (
        "the store data/bot.db is in use by another process: stop it first, "
        "or give this one its own store.url"
    )


def test_the_lock_file_is_private_and_its_directory_created(isolated: Path) -> None:
    (isolated / "loose.lock").write_text("left by an old version\n")
    (isolated / "loose.lock").chmod(0o644)
    with InstanceLock(LOCK), InstanceLock(Path("loose.lock")):
        assert stat.S_IMODE(LOCK.stat().st_mode) == 0o600
        assert stat.S_IMODE(LOCK.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((isolated / "loose.lock").stat().st_mode) == 0o600
        assert LOCK.read_text() == _our_holder_line() + "\n"


def _our_holder_line() -> str:
    text = LOCK.read_text().strip()
    assert text.startswith(f"pid {os.getpid()}, started ")
    return text
