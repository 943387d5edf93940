"""Doctor's store checks: the store opens, takes a write, and whether a bot holds its lock.

The store is opened as the bot opens it (with ``BOT_SECRET_KEY`` when set, which also encrypts
keys still stored plain, as the bot's next start would). The write probe sets a preference and
deletes it again. A running bot holding the store's lock is a warning, not a failure: doctor next
to a running bot is normal (SQLite lets both open the file), but a second ``make run`` on this
store would refuse to start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bot.config import StoreSettings
from bot.doctor.report import Result
from bot.errors import StoreError
from bot.store import Store, StoredKey, create_store, lock_holder

NAME: Final = "store"
PROBE_SCOPE: Final = "doctor"
PROBE_SUBJECT: Final = "write-probe"


def store_path(settings: StoreSettings, cwd: Path | None = None) -> Path | None:
    """The SQLite file of ``store.url`` (None for other stores)."""
    return settings.sqlite_path(cwd) if settings.url.startswith("sqlite:") else None


def running_bot(settings: StoreSettings, cwd: Path | None = None) -> str | None:
    """Who holds the store's instance lock (a running bot: ``pid …, started …``), if anyone."""
    path = store_path(settings, cwd)
    if path is None:
        return None
    try:
        return lock_holder(path.with_name(path.name + ".lock"))
    except OSError:  # no lock file can be there (its directory is a file…): the store check says
        return None


@dataclass
class StoreCheck:
    """The opened store (None when it failed to open) and what was found about it."""

    store: Store | None
    results: list[Result]
    keys: list[StoredKey]
    keys_problem: str | None
    """Why the stored keys could not be read (e.g. encrypted without ``BOT_SECRET_KEY``)."""

    async def close(self) -> None:
        """Close the store if it was opened."""
        if self.store is not None:
            await self.store.close()


async def open_and_probe(
    settings: StoreSettings, *, secret_key: str | None, cwd: Path | None = None
) -> StoreCheck:
    """Open the store, write to it, read its keys; the caller closes the returned check."""
    path = store_path(settings, cwd)
    where = str(path) if path is not None else settings.url
    existed = path is not None and path.exists()
    store = create_store(settings, cwd=cwd, secret_key=secret_key)
    try:
        await store.open()
    except StoreError as exc:
        fix = "check store.url and that its directory can be created and written by this user"
        return StoreCheck(None, [Result.fail(NAME, f"cannot open {where}: {exc}", fix)], [], None)
    check = StoreCheck(store, [], [], None)
    try:
        await store.set_preference(PROBE_SCOPE, PROBE_SUBJECT, str(time.time()))
        await store.set_preference(PROBE_SCOPE, PROBE_SUBJECT, None)
    except StoreError as exc:
        fix = "check the free disk space and the permissions of the store file and its directory"
        check.results.append(Result.fail(NAME, f"{where} opens but takes no write: {exc}", fix))
    else:
        created = "" if existed or path is None else " (created now)"
        check.results.append(Result.ok(NAME, f"{where} opens and takes a write{created}"))
    try:
        check.keys = await store.load_keys()
    except StoreError as exc:
        check.keys_problem = str(exc)
    holder = running_bot(settings, cwd)
    if holder is not None:
        note = (
            f"{where} is in use by a running bot ({holder}); fine for doctor, but a second "
            "`make run` on this store refuses to start"
        )
        fix = "stop that bot (kill PID) before `make run` here, or give this one its own store.url"
        check.results.append(Result.warn("store lock", note, fix))
    return check
