"""Keeps the app's tenant access token fresh in the SDK's cache, fetched off the event loop.

Why: lark-oapi fetches a missing or expired tenant token with blocking ``requests`` inside the
REST call that needs it, even in its ``a…`` methods, so on whichever event loop made that call.
A one-second token fetch then froze every streaming answer of the bot's loop for a second,
about every two hours. The keeper fetches the token in a worker thread before the SDK would
need one and puts it into the SDK's process-wide cache (:mod:`bot.feishu.sdk_compat`), so every
SDK client of the process, on any loop or thread, finds a valid token and never fetches.

How: :meth:`TenantTokenKeeper.start` fetches a token once (so wrong credentials or an
unreachable domain end the start with one line saying how to fix them), then one background
task owned by the keeper refreshes it ``refresh_margin_s`` before the SDK would consider it
expired, replacing the cache entry in one step (it is never empty in between). A failed refresh
is logged and retried after 5 s, 10 s, 20 s … at most 60 s apart while the old token stays in
the cache (and on after it expired: the SDK then fetches on the calling loop again until a retry
succeeds). :meth:`aclose` cancels and awaits the task; a fetch still running in its thread is
then abandoned, its result unused. Callers that ask for a refresh while one is under way
(:meth:`refresh_now`, e.g. several answers told at once that the token is invalid) share its
result instead of fetching again.

Feishu answers a token request with the token it already issued while that one has 30 minutes
or more left (``expire`` then says how long); below 30 minutes it issues a new one and both stay
valid. With the default margin (1200 s, plus the SDK's 600 s) the refresh comes right at that
boundary and may get the old token back with a short ``expire``: the next refresh is then
scheduled halfway through what is left, never closer than 5 s, and gets a new token.

Times come from ``clock``, which must tell Unix time like :func:`time.time` (the SDK's cache
compares expiries with ``time.time()``); tests inject it together with ``sleep``.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import TracebackType
from typing import Any, Final, Self

from bot.errors import FeishuConnectError
from bot.feishu import sdk_compat
from bot.logging import get_logger
from bot.timing import Clock, Sleep

log = get_logger(__name__)

FIRST_RETRY_S: Final = 5.0
"""The wait after the first failed refresh; doubled after each further failure."""
MAX_RETRY_S: Final = 60.0
"""The longest wait between two refresh attempts after failures."""


class TenantTokenKeeper:
    """Fetches the tenant access token in a worker thread and keeps the SDK's cache fresh."""

    def __init__(
        self,
        app_id: str,
        app_secret: str,
        domain: str,
        *,
        refresh_margin_s: float = 1200,
        request_timeout_s: float = 10,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._app_id = app_id
        self._app_secret = app_secret
        self._domain = domain
        self._refresh_margin_s = refresh_margin_s
        self._request_timeout_s = request_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._token: str | None = None
        self._refreshes = 0  # successful refreshes so far: lets waiters share one
        self._next_attempt_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the first token, store it for the SDK, start refreshing in the background.

        Raises :class:`FeishuConnectError` when Feishu rejects the credentials or cannot be
        reached; nothing keeps running then.
        """
        if self._task is not None:
            raise RuntimeError("the tenant token keeper is already started")
        self._client = sdk_compat.build_client(
            app_id=self._app_id,
            app_secret=self._app_secret,
            domain=self._domain,
            timeout_s=self._request_timeout_s,
        )
        await self._refresh()
        self._task = asyncio.create_task(
            self._keep_fresh(), name=f"tenant-token-keeper:{self._app_id}"
        )

    async def aclose(self) -> None:
        """Stop refreshing: cancel the background task and wait for it (idempotent).

        The token in the cache stays; once it expires the SDK fetches one itself again.
        """
        task, self._task = self._task, None
        if task is None or task.done():
            if task is not None:
                await task  # re-raises what ended it, if anything did
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller is being cancelled too

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- refreshing ------------------------------------------------------------------------

    async def refresh_now(self) -> None:
        """Fetch a new token now and store it; raises :class:`FeishuConnectError` on failure.

        If a refresh is already under way, its token is the answer once it succeeds. The
        background refresh is rescheduled from the new token's expiry.
        """
        if self._client is None:
            raise RuntimeError("start the tenant token keeper before refreshing")
        await self._refresh()

    async def _keep_fresh(self) -> None:
        failures = 0
        while True:
            # Re-read after every sleep: refresh_now() may have moved the next attempt.
            while (wait := self._next_attempt_at - self._clock()) > 0:
                await self._sleep(wait)
            try:
                await self._refresh()
            except FeishuConnectError as exc:
                failures += 1
                retry_in = min(FIRST_RETRY_S * 2 ** (failures - 1), MAX_RETRY_S)
                self._next_attempt_at = self._clock() + retry_in
                log.warning(
                    "tenant_token_refresh_failed",
                    app_id=self._app_id,
                    error=str(exc),
                    failures=failures,
                    retry_in_s=retry_in,
                    cached_token_valid_for_s=self._cached_validity(),
                )
            else:
                failures = 0

    async def _refresh(self) -> None:
        seen = self._refreshes
        async with self._lock:
            if self._refreshes != seen:
                return  # a refresh finished while this one waited: its token is fresh
            fetched_at = self._clock()
            token, expire_s = await asyncio.to_thread(self._fetch)
            expires_at = fetched_at + expire_s - sdk_compat.SDK_TOKEN_EARLY_EXPIRY_S
            sdk_compat.store_tenant_token(self._app_id, token, expires_at)
            renewed, self._token = token != self._token, token
            self._refreshes += 1
            lifetime = expires_at - fetched_at
            self._next_attempt_at = max(
                expires_at - self._refresh_margin_s,
                fetched_at + max(lifetime / 2, FIRST_RETRY_S),
            )
        log.info(
            "tenant_token_refreshed",
            app_id=self._app_id,
            expires_in_s=expire_s,
            next_refresh_in_s=round(self._next_attempt_at - self._clock()),
            renewed=renewed,
        )

    def _cached_validity(self) -> int | None:
        expiry = sdk_compat.cached_tenant_token_expiry(self._app_id)
        return None if expiry is None else round(expiry - self._clock())

    def _fetch(self) -> tuple[str, int]:
        """Ask Feishu for a tenant token (blocking: runs in a worker thread)."""
        from lark_oapi.api.auth.v3 import (
            InternalTenantAccessTokenRequest,
            InternalTenantAccessTokenRequestBody,
        )

        body = (
            InternalTenantAccessTokenRequestBody.builder()
            .app_id(self._app_id)
            .app_secret(self._app_secret)
            .build()
        )
        request = InternalTenantAccessTokenRequest.builder().request_body(body).build()
        try:
            response = self._client.auth.v3.tenant_access_token.internal(request)
        except Exception as exc:  # requests' errors and unreadable answers alike
            raise FeishuConnectError(
                f"cannot reach Feishu at {self._domain}: {type(exc).__name__}: {exc}. "
                "Check the network and feishu.domain"
            ) from None
        status = getattr(response.raw, "status_code", None)
        if not response.success():
            if isinstance(status, int) and status >= 500:
                raise FeishuConnectError(
                    f"Feishu at {self._domain} could not issue a tenant token: {response.msg} "
                    f"(code {response.code}, HTTP {status}). It is retried; if it persists, "
                    "check Feishu's status page"
                )
            raise FeishuConnectError(
                f"Feishu rejected app_id/app_secret: {response.msg} (code {response.code}). "
                "Copy both from the developer console → your app → Credentials & Basic Info"
            )
        return _token_and_expiry(response, self._domain)


def _token_and_expiry(response: Any, domain: str) -> tuple[str, int]:
    """Read ``tenant_access_token`` and ``expire``: the typed response has no fields for them
    (Feishu puts them beside ``code``, the SDK's model expects them under ``data``)."""
    data = getattr(response, "data", None)
    token = getattr(data, "tenant_access_token", None)
    expire = getattr(data, "expire", None)
    if token is None or expire is None:
        try:
            answer = json.loads(response.raw.content)
        except (AttributeError, TypeError, ValueError):
            answer = {}
        if isinstance(answer, dict):
            token, expire = answer.get("tenant_access_token"), answer.get("expire")
    if not isinstance(token, str) or not token or type(expire) is not int or expire <= 0:
        raise FeishuConnectError(
            f"Feishu at {domain} answered the tenant token request without a token and its "
            "expiry; check that feishu.domain points at the Feishu (or Lark) open platform"
        )
    return token, expire
