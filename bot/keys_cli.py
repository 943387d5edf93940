"""``python -m bot keys list|add|disable|enable|remove|check``: the key pool from the command line.

Every subcommand works on the configured store (``store.url``, settings loaded as ``run`` loads
them) through the same :class:`bot.llm.keypool.KeyPool` the bot uses, after the same sync of the
configured keys (``llm.keys``, ``OPENAI_API_KEYS``) that the bot does when it starts, so what is
listed is what the bot will have. Only masked keys (``sk-…abcd``) and key ids are ever printed.

The commands change the store, not a running bot: a bot reads its keys when it starts, keeps
them in memory and writes its own copy back as it uses them. So a change here takes effect at the
bot's next start, and a bot running meanwhile may write over it; the commands say so, naming the
running bot when the store's instance lock shows one.

Keys from ``settings.yaml`` or the environment are managed there: a disable here would be
undone at the next start (``enabled: true`` lifts a manual disable), so it is refused with the
setting to change instead. Keys added here are stored as donated keys (owner ``cli`` unless
``--owner`` says otherwise) and stay until removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from bot.config import KeyEntry, Settings
from bot.llm.keypool import KeyPool, KeyView, key_id_of
from bot.logging import Redactor, mask_key
from bot.store import SECRET_KEY_ENV, Store, StoredKey, create_store, lock_holder

if TYPE_CHECKING:
    from bot.llm.validation import KeyCheck

# The CLI's exit codes (bot.cli uses the same): success, a failure, bad configuration or usage.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEFAULT_OWNER = "cli"
DEFAULT_DISABLE_REASON = "disabled by hand"
CHECK_CONCURRENCY = 4
"""Keys validated at once by ``keys check``: a few, not a burst the provider would limit."""
FAILED_VERDICTS = frozenset({"invalid", "no_quota"})
"""Verdicts of ``keys check`` that make it fail: the key itself is unusable."""

_KEY_ID = re.compile(r"[0-9a-f]{12}")

KeyChecker = Callable[[str], Awaitable["KeyCheck"]]

SUMMARY = "list, add, disable, enable, remove and check the API keys of the pool"

DESCRIPTION = f"""\
List and manage the API keys the bot shares out (llm.keys, OPENAI_API_KEYS and added keys),
in the store named by store.url. Keys are only ever shown masked (sk-…abcd), with their id.

subcommands:
  list                       every key with its state and counters (--json: one object a line)
  add KEY                    validate a key and add it to the pool (KEY "-": read from stdin)
  disable KEY_ID             take a key out of service until enabled again
  enable KEY_ID              put a disabled or resting key back into service
  remove KEY_ID              delete an added key, or a key no longer in the settings
  check [KEY_ID]             validate every key (or one) with the provider; changes nothing

These commands change the store, not a running bot: a running bot picks the change up at its
next start (restart it to apply the change now; until then it works from its own copy of the
keys and may write over the change). Keys from settings.yaml or OPENAI_API_KEYS are disabled
and removed there; `keys` says which setting to change.

When {SECRET_KEY_ENV} is set the stored secrets are encrypted with it; set it to the same value
as the bot's, or the stored keys cannot be read."""

_NOTE = "A running bot picks this change up at its next start."


def configure_parser(
    parser: argparse.ArgumentParser, *, parents: Sequence[argparse.ArgumentParser], epilog: str
) -> None:
    """Add the ``keys`` subcommands to ``parser`` (the ``keys`` command's own parser).

    ``parents`` give each subcommand the common options; their defaults must be
    ``argparse.SUPPRESS``, so that an option given before the subcommand is not reset by it.
    """
    commands = parser.add_subparsers(
        dest="keys_command",
        metavar="SUBCOMMAND",
        required=True,
        help="one of the subcommands above; `python -m bot keys SUBCOMMAND --help` tells more",
    )

    def add(name: str, description: str) -> argparse.ArgumentParser:
        # No help= here: DESCRIPTION lists the subcommands with their arguments already.
        return commands.add_parser(
            name,
            parents=list(parents),
            description=textwrap.fill(description, width=92),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    listing = add(
        "list",
        "List every key of the pool: its id, the masked key, owner, source (config: "
        "settings.yaml, env: OPENAI_API_KEYS, donated: added by chat or `keys add`), state "
        "(active, cooling: resting after a rate limit or errors, disabled), the reason of that "
        "state, the requests it served, its failures and when it was last used. The keys of "
        "the settings are synced first, as the bot does when it starts.",
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per key and line (times as epoch seconds), for scripts",
    )

    adding = add(
        "add",
        "Add an API key to the pool as a donated key. It is first validated with a cheap call "
        "to llm.base_url (a key the provider refuses, or without quota, is not added). Pass "
        "KEY as - to read it from standard input, which keeps it out of the shell history and "
        "the process list: `python -m bot keys add - < key.txt`. A key already in the pool "
        f"is left as it is. {_NOTE}",
    )
    adding.add_argument("key", metavar="KEY", help='the API key, or "-" to read it from stdin')
    adding.add_argument(
        "--owner",
        metavar="NAME",
        default=DEFAULT_OWNER,
        help=f"who the key belongs to, as `keys list` shows it (default: {DEFAULT_OWNER})",
    )
    adding.add_argument(
        "--no-check",
        action="store_true",
        help="add the key without validating it (when the endpoint cannot be reached now)",
    )

    disabling = add(
        "disable",
        "Disable a key by hand: the bot stops using it until `keys enable`. Keys from "
        "settings.yaml are disabled there (enabled: false) and keys from OPENAI_API_KEYS by "
        f"taking them out of the variable; for those this command says so and fails. {_NOTE}",
    )
    disabling.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows")
    disabling.add_argument(
        "--reason",
        metavar="TEXT",
        default=DEFAULT_DISABLE_REASON,
        help=f"why, shown by `keys list` (default: {DEFAULT_DISABLE_REASON})",
    )

    enabling = add(
        "enable",
        "Enable a key that was disabled (by hand, or by the bot after the provider refused it) "
        "or is resting after a rate limit. A key disabled in settings.yaml (enabled: false) is "
        f"enabled there. {_NOTE}",
    )
    enabling.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows")

    removing = add(
        "remove",
        "Delete a key from the store for good, with its state and counters. Keys still in "
        "settings.yaml or OPENAI_API_KEYS are removed there instead (the bot then takes them "
        "out of service at its next start, and this command can delete them). "
        f"{_NOTE}",
    )
    removing.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `keys list` shows")

    checking = add(
        "check",
        "Validate every key of the pool, or the one given, with a cheap call to llm.base_url, "
        "and print the verdict for each: valid, invalid (refused: wrong or revoked), no_quota, "
        "wrong_endpoint (llm.base_url is not an OpenAI-compatible API) or unreachable. Nothing "
        "is changed. Fails (exit 1) when a key is invalid or has no quota, or when there is no "
        "key to check.",
    )
    checking.add_argument(
        "key_id", metavar="KEY_ID", nargs="?", help="check only this key (default: every key)"
    )


@dataclass
class _Session:
    """What a subcommand works with: the settings, the open store and the loaded pool."""

    settings: Settings
    store: Store
    pool: KeyPool
    redactor: Redactor
    out: TextIO
    err: TextIO

    def say(self, text: str) -> None:
        self.out.write(self.redactor.text(text) + "\n")

    def fail(self, text: str, code: int = EXIT_FAILURE) -> int:
        self.err.write("error: " + self.redactor.text(text) + "\n")
        return code

    def note_change(self, *, new_key: bool = False) -> None:
        """Tell when the change takes effect, naming a running bot when one holds the store.

        A running bot writes its own copy of a key it knows back to the store as it uses it,
        which can undo a change to that key; a key it does not know yet it never writes.
        """
        holder = _running_bot(self.settings)
        if holder is None:
            self.say(_NOTE)
            return
        running = f"A running bot ({holder}) uses this store: it picks this change up at its next"
        if new_key:
            self.say(f"{running} start. Restart it to use the key now.")
        else:
            self.say(
                f"{running} start. Restart it now: until then it works from its own copy of the "
                "keys and may write over this change."
            )


async def run(
    args: argparse.Namespace,
    settings: Settings,
    *,
    secret_key: str | None,
    redactor: Redactor,
    check: KeyChecker | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the ``keys`` subcommand named by ``args.keys_command``; return the exit code.

    ``secret_key`` is ``BOT_SECRET_KEY`` (read by the caller); ``check`` validates a secret
    (default: :func:`bot.llm.validation.check_key` with ``settings.llm``).
    """
    store = create_store(settings.store, secret_key=secret_key)
    await store.open()
    try:
        pool = KeyPool(store)
        await pool.load(settings.llm.keys)
        for stored in await store.load_keys():  # mask every key, should one reach a message
            redactor.add(stored.secret)
        session = _Session(settings, store, pool, redactor, out or sys.stdout, err or sys.stderr)
        command: str = args.keys_command
        if command == "list":
            return await _list(session, as_json=args.json)
        if command == "add":
            return await _add(
                session,
                args.key,
                args.owner,
                check=None if args.no_check else _checker(settings, check),
            )
        if command == "disable":
            return await _disable(session, args.key_id, args.reason)
        if command == "enable":
            return await _enable(session, args.key_id)
        if command == "remove":
            return await _remove(session, args.key_id)
        if command == "check":
            return await _check(session, args.key_id, _checker(settings, check))
        raise AssertionError(f"unknown keys subcommand {command!r}")  # argparse prevents it
    finally:
        await store.close()


def _checker(settings: Settings, check: KeyChecker | None) -> KeyChecker:
    if check is not None:
        return check
    from bot.llm.validation import check_key  # imports the HTTP client: only when validating

    async def check_with_settings(secret: str) -> KeyCheck:
        return await check_key(settings.llm, secret)

    return check_with_settings


# ---- list -------------------------------------------------------------------------------------


_COLUMNS = (
    "KEY ID",
    "KEY",
    "OWNER",
    "SOURCE",
    "STATE",
    "REASON",
    "REQUESTS",
    "FAILURES",
    "LAST USED",
)


async def _list(session: _Session, *, as_json: bool) -> int:
    views = session.pool.keys()
    records = {record.key_id: record for record in await session.store.load_keys()}
    if as_json:
        for view in views:
            session.say(json.dumps(_as_json(view, records.get(view.key_id)), ensure_ascii=False))
        return EXIT_OK
    if not views:
        session.say(
            "No API keys yet: add one with `python -m bot keys add KEY`, under llm.keys in "
            "settings.yaml, or in OPENAI_API_KEYS."
        )
        return EXIT_OK
    rows = [_row(view, records.get(view.key_id)) for view in views]
    session.say(_table([list(_COLUMNS), *rows]))
    return EXIT_OK


def _as_json(view: KeyView, record: StoredKey | None) -> dict[str, Any]:
    return {
        "key_id": view.key_id,
        "masked": view.masked,
        "owner": view.owner,
        "source": view.source,
        "state": view.state,
        "reason": view.reason,
        "disabled_by": view.disabled_by,
        "until": view.until,
        "requests": view.requests,
        "failures": view.failures,
        "last_used_at": record.last_used_at if record else None,
    }


def _row(view: KeyView, record: StoredKey | None) -> list[str]:
    reason = view.reason or "-"
    if view.state == "cooling" and view.until is not None:
        reason = f"{reason} (until {_time(view.until, '%H:%M:%S')})"
    elif view.state == "disabled" and view.disabled_by:
        reason = f"{reason} ({view.disabled_by})"
    last_used = record.last_used_at if record else None
    return [
        view.key_id,
        view.masked,
        view.owner,
        view.source,
        view.state,
        reason,
        str(view.requests),
        str(view.failures),
        _time(last_used, "%Y-%m-%d %H:%M") if last_used else "never",
    ]


def _time(moment: float, pattern: str) -> str:
    return time.strftime(pattern, time.localtime(moment))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# ---- add --------------------------------------------------------------------------------------


async def _add(session: _Session, given: str, owner: str, *, check: KeyChecker | None) -> int:
    if given == "-":
        given = await asyncio.to_thread(sys.stdin.readline)
    secret = given.strip()
    if not secret:
        return session.fail("the key is empty", EXIT_USAGE)
    session.redactor.add(secret)
    if any(character.isspace() for character in secret):
        return session.fail("a key is one word without spaces: add one key at a time", EXIT_USAGE)
    owner = owner.strip()
    if not owner:
        return session.fail("--owner must not be empty", EXIT_USAGE)
    existing = _find(session.pool, key_id_of(secret))
    if existing is not None:
        session.say(
            f"{existing.key_id} {existing.masked} is already in the pool "
            f"(owner {existing.owner}, {existing.source}, {existing.state}): nothing changed."
        )
        return EXIT_OK
    verdict = "not checked"
    if check is not None:
        result = await check(secret)
        if result.verdict != "valid":
            advice = _ADD_ADVICE.get(result.verdict, "check the key and llm.base_url")
            advice = advice.format(base_url=session.settings.llm.base_url)
            return session.fail(
                f"{mask_key(secret)} was not added: {result.verdict} ({result.detail}): {advice}"
            )
        verdict = "valid"
    view = await session.pool.add(secret, owner=owner, source="donated")
    session.say(f"Added {view.key_id} {view.masked} (owner {view.owner}, {verdict}).")
    session.note_change(new_key=True)
    return EXIT_OK


_ADD_ADVICE = {
    "invalid": "the provider refused it: check that it is whole and not revoked",
    "no_quota": "it has no quota left: add credit with the provider, then add it again",
    "wrong_endpoint": (
        "{base_url} does not answer like an OpenAI-compatible API: check llm.base_url, "
        "or add the key with --no-check"
    ),
    "unreachable": (
        "cannot reach {base_url}: check the network and llm.base_url, or add the key with "
        "--no-check"
    ),
}


# ---- disable, enable, remove ------------------------------------------------------------------


async def _disable(session: _Session, given: str, reason: str) -> int:
    view, code = _resolve(session, given)
    if view is None:
        return code
    entry = _configured(session.settings).get(view.key_id)
    if entry is not None:
        return session.fail(
            f"{view.key_id} {view.masked} {_where(view)}: {_how_to_disable(view)} "
            "(a disable here would be undone when the bot next starts)"
        )
    if view.state == "disabled":
        session.say(f"{view.key_id} {view.masked} is already disabled ({view.reason or '-'}).")
        return EXIT_OK
    reason = reason.strip() or DEFAULT_DISABLE_REASON
    await session.pool.disable(view.key_id, reason, by="manual")
    session.say(f"Disabled {view.key_id} {view.masked}: {reason}.")
    session.note_change()
    return EXIT_OK


async def _enable(session: _Session, given: str) -> int:
    view, code = _resolve(session, given)
    if view is None:
        return code
    if view.source != "donated":
        entry = _configured(session.settings).get(view.key_id)
        if entry is None:
            return session.fail(
                f"{view.key_id} {view.masked} is no longer in {_setting(view)}: put it back "
                "there to use it again, or delete it with `python -m bot keys remove "
                f"{view.key_id}`"
            )
        if not entry.enabled:
            return session.fail(
                f"{view.key_id} {view.masked} is disabled in settings.yaml: set `enabled: true` "
                "on it under llm.keys"
            )
    if view.state == "active":
        session.say(f"{view.key_id} {view.masked} is already active.")
        return EXIT_OK
    await session.pool.enable(view.key_id)
    session.say(f"Enabled {view.key_id} {view.masked}.")
    session.note_change()
    return EXIT_OK


async def _remove(session: _Session, given: str) -> int:
    view, code = _resolve(session, given)
    if view is None:
        return code
    if view.key_id in _configured(session.settings):
        return session.fail(
            f"{view.key_id} {view.masked} {_where(view)}: remove it from {_setting(view)} "
            "instead (the bot then takes it out of service at its next start, and "
            "`python -m bot keys remove` can delete it for good)"
        )
    await session.store.delete_key(view.key_id)
    session.say(f"Removed {view.key_id} {view.masked}.")
    session.note_change()
    return EXIT_OK


def _resolve(session: _Session, given: str) -> tuple[KeyView | None, int]:
    """The key named by a KEY_ID argument, or None and the exit code after saying why."""
    key_id = given.strip().lower()
    if not _KEY_ID.fullmatch(key_id):
        # Never echo the argument: it may be the key itself, pasted by mistake.
        return None, session.fail(
            "KEY_ID must be a key id: the 12 hex digits `python -m bot keys list` shows "
            "(never the key itself)",
            EXIT_USAGE,
        )
    view = _find(session.pool, key_id)
    if view is None:
        return None, session.fail(
            f"no key with id {key_id} in the pool: `python -m bot keys list` shows the ids"
        )
    return view, EXIT_OK


def _find(pool: KeyPool, key_id: str) -> KeyView | None:
    views = pool.keys()
    return next((view for view in views if view.key_id == key_id), None)


def _configured(settings: Settings) -> dict[str, KeyEntry]:
    """The keys of the settings (llm.keys and OPENAI_API_KEYS) by key id."""
    return {key_id_of(entry.key.get_secret_value()): entry for entry in settings.llm.keys}


def _setting(view: KeyView) -> str:
    return "OPENAI_API_KEYS" if view.source == "env" else "settings.yaml (llm.keys)"


def _where(view: KeyView) -> str:
    if view.source == "env":
        return "comes from the OPENAI_API_KEYS environment variable"
    return "is configured in settings.yaml"


def _how_to_disable(view: KeyView) -> str:
    if view.source == "env":
        return "take it out of OPENAI_API_KEYS to stop using it"
    return "set `enabled: false` on it under llm.keys"


# ---- check ------------------------------------------------------------------------------------


async def _check(session: _Session, given: str | None, check: KeyChecker) -> int:
    if given is not None:
        view, code = _resolve(session, given)
        if view is None:
            return code
        views = [view]
    else:
        views = session.pool.keys()
    if not views:
        return session.fail(
            "no API keys to check: add one with `python -m bot keys add KEY`, under llm.keys "
            "in settings.yaml, or in OPENAI_API_KEYS"
        )
    secrets = {record.key_id: record.secret for record in await session.store.load_keys()}
    limit = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def check_one(view: KeyView) -> KeyCheck:
        async with limit:
            return await check(secrets[view.key_id])

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(check_one(view)) for view in views]
    results = [task.result() for task in tasks]

    rows = [["KEY ID", "KEY", "OWNER", "STATE", "VERDICT", "DETAIL"]]
    for view, result in zip(views, results, strict=True):
        rows.append(
            [view.key_id, view.masked, view.owner, view.state, result.verdict, result.detail]
        )
    session.say(_table(rows))
    counts: dict[str, int] = {}
    for result in results:
        counts[result.verdict] = counts.get(result.verdict, 0) + 1
    summary = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items()))
    session.say(f"{len(results)} checked: {summary}.")
    if any(result.verdict in ("wrong_endpoint", "unreachable") for result in results):
        session.say(
            f"Some keys could not be judged: check llm.base_url ({session.settings.llm.base_url})"
            " and the network."
        )
    if any(result.verdict in FAILED_VERDICTS for result in results):
        session.say(
            "The bot takes a refused key out of service when it next uses it: replace it, or "
            "remove it (from the settings, or with `python -m bot keys remove KEY_ID`)."
        )
        return EXIT_FAILURE
    return EXIT_OK


def _running_bot(settings: Settings) -> str | None:
    """Who holds the store's instance lock (a running bot), if anyone; SQLite stores only."""
    if not settings.store.url.startswith("sqlite:"):
        return None
    path = settings.store.sqlite_path()
    return lock_holder(path.with_name(path.name + ".lock"))
