"""Runs the doctor checks in order and collects their results into a :class:`Report`.

Order (what a newcomer sets up first comes first): the config; Feishu credentials (a tenant
token), the bot feature, the granted scopes, the long connection; the LLM keys, models and one
streamed answer; the store; the manual steps. Without a tenant token the later Feishu checks are
not run (a note says so). The store is opened before the LLM checks, because the keys donated
by chat live in it, but reported in its place. ``on_result`` sees every result as it is found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

from bot.config import Settings
from bot.doctor import DEFAULT_TIMEOUT_S, feishu, longconn
from bot.doctor.console import FEISHU_DOMAIN, LARK_DOMAIN
from bot.doctor.llm import KeyToCheck, check_llm, keys_of
from bot.doctor.manual import manual_steps
from bot.doctor.report import Report, Result
from bot.doctor.scopes import media_scopes
from bot.doctor.store import open_and_probe, running_bot
from bot.llm.keypool import key_id_of
from bot.logging import Redactor
from bot.store import SECRET_KEY_ENV, StoredKey

DEFAULT_COUNTERPARTS: Final[Mapping[str, str]] = {
    FEISHU_DOMAIN: LARK_DOMAIN,
    LARK_DOMAIN: FEISHU_DOMAIN,
}
"""Which platform to ask about an app id the configured one does not know."""


@dataclass(frozen=True)
class DoctorOptions:
    """How doctor runs: timeouts, where the store lives, what to ask where."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    """Each network request's timeout (connect and read)."""
    secret_key: str | None = None
    """``BOT_SECRET_KEY``, to read encrypted stored keys."""
    cwd: Path | None = None
    """Where a relative ``sqlite:///`` path resolves (default: the working directory)."""
    config_path: Path | None = None
    """The settings file, for the config line."""
    counterparts: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_COUNTERPARTS))
    """``domain -> other platform's domain`` asked about an unknown app id."""
    clock: Callable[[], float] = time.perf_counter
    """Measures the time to the first token."""
    watching: bool = False
    """``--watch`` follows: the manual steps need not suggest it."""


async def run_doctor(
    settings: Settings,
    options: DoctorOptions | None = None,
    *,
    on_result: Callable[[Result], None] | None = None,
    redactor: Redactor | None = None,
) -> Report:
    """Run every check against ``settings`` (already loaded and with Feishu credentials).

    ``redactor`` learns the stored keys' secrets as they are read, for whoever prints.
    """
    options = options or DoctorOptions()
    report = Report()

    def emit(result: Result) -> None:
        report.add(result)
        if on_result is not None:
            on_result(result)

    where = str(options.config_path) if options.config_path else "the settings"
    emit(
        Result.ok(
            "config",
            f"{where} loaded: app {settings.feishu.app_id} on {settings.feishu.domain}, "
            f"model {settings.llm.model} at {settings.llm.base_url}, store {settings.store.url}",
        )
    )
    holder = running_bot(settings.store, options.cwd)
    async with httpx.AsyncClient(timeout=options.timeout_s) as http:
        for result in await _feishu_checks(http, settings, options, running=holder):
            emit(result)

    store = await open_and_probe(settings.store, secret_key=options.secret_key, cwd=options.cwd)
    try:
        keys = keys_of(settings)
        if store.store is None:
            emit(Result.warn("donated keys", "not checked: the store did not open (see below)"))
        elif store.keys_problem is not None:
            fix = (
                f"run doctor with the {SECRET_KEY_ENV} the bot runs with (it cannot be "
                "recovered: keys stored with a lost one must be shared again)"
            )
            emit(Result.fail("donated keys", f"cannot read them: {store.keys_problem}", fix))
        else:
            keys += _donated(store.keys, known={key_id_of(k.secret) for k in keys})
        if redactor is not None:
            for key in keys:
                redactor.add(key.secret)
        for result in await check_llm(
            settings, keys, timeout_s=options.timeout_s, clock=options.clock
        ):
            emit(result)
        for result in store.results:
            emit(result)
    finally:
        await store.close()
    for result in manual_steps(settings.feishu.domain, watching=options.watching):
        emit(result)
    return report


async def _feishu_checks(
    http: httpx.AsyncClient, settings: Settings, options: DoctorOptions, *, running: str | None
) -> list[Result]:
    domain = settings.feishu.domain
    token_check = await feishu.check_tenant_token(
        http, settings.feishu, counterpart=options.counterparts.get(domain)
    )
    results = [token_check.result]
    token = token_check.token
    if token is None:
        skipped = "not checked: no tenant token (fix `feishu app` above first)"
        names = (feishu.NAME_BOT, feishu.NAME_SCOPES, longconn.NAME)
        return results + [Result.warn(name, skipped) for name in names]
    results.append(await feishu.check_bot(http, domain, token))
    results += await feishu.check_scopes(
        http, domain, token, settings.access, media_scopes(settings)
    )
    results.append(
        await longconn.check_long_connection(
            http, settings.feishu, timeout_s=options.timeout_s, running_bot=running
        )
    )
    return results


def _donated(stored: list[StoredKey], *, known: set[str]) -> list[KeyToCheck]:
    """The keys shared by chat (or ``keys add``), minus any that are also configured."""
    keys = []
    for key in stored:
        if key.source != "donated" or key.key_id in known:
            continue
        skip = None
        if key.state == "disabled" and key.disabled_by == "manual":
            skip = "disabled by hand; `python -m bot keys enable` puts it back"
        keys.append(KeyToCheck(key.secret, f"donated by {key.owner}", skip))
    return keys
