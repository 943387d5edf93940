"""One running bot per store: an OS file lock beside the database (``data/bot.db.lock``).

Two bots on one store would both answer every message and interleave their history, so the bot
takes an exclusive ``flock`` on the lock file before it opens the store, and refuses to start when
another process holds it. ``flock`` belongs to the open file, so the OS drops it when the holder
exits, even by ``kill -9`` or a crash: there is never a stale lock to clean up, and the file is
never deleted (deleting it would let a second bot lock a new file while the first still runs).

The holder writes ``pid 1234, started 2026-11-25T14:00:00Z`` into the file, only so the refusal
can name it; the lock itself is the ``flock``, never the file's content.
"""

from __future__ import annotations

import fcntl
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from bot.errors import StoreError, StoreLocked

UNKNOWN_HOLDER = "another process"
"""How a holder is named when the lock file does not say who it is (yet)."""

_HOLDER_LINE = re.compile(r"pid \d+, started [0-9T:.+Z-]+")


class InstanceLock:
    """The exclusive lock of one store, held from :meth:`acquire` to :meth:`release`.

    Also a context manager. ``path`` is the lock file (created 0600, its directory 0700).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreLocked` naming the process that holds it.

        Never waits. Does nothing when this object already holds the lock. A lock file that
        cannot be created or locked at all (permissions, a file system without locks) is a
        :class:`bot.errors.StoreError`.
        """
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # an older file, or a umask, may have left it readable by others
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {started}\n".encode(), 0)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise StoreLocked(_refusal(self.path, holder), holder=holder) from None
        except OSError as exc:
            os.close(fd)  # closing also drops the lock if it was taken
            raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Unlock and close the file (kept on disk); nothing when the lock is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def lock_holder(path: Path) -> str | None:
    """Who holds the lock at ``path`` (``pid …, started …`` or ``another process``), else None.

    Probes with a non-blocking lock on a fresh descriptor and lets go at once; does not create
    the file. A lock held by this very process through an :class:`InstanceLock` counts as held.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(fd: int) -> str:
    """The holder line of the lock file, or :data:`UNKNOWN_HOLDER` when it says nothing usable."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_HOLDER
    line = text.strip()
    return line if _HOLDER_LINE.fullmatch(line) else UNKNOWN_HOLDER


def _refusal(lock_path: Path, holder: str) -> str:
    store = lock_path.with_suffix("") if lock_path.suffix == ".lock" else lock_path
    advice = "stop it first, or give this one its own store.url"
    if holder == UNKNOWN_HOLDER:
        return f"the store {store} is in use by {UNKNOWN_HOLDER}: {advice}"
    return f"the store {store} is in use by another running bot ({holder}): {advice}"
