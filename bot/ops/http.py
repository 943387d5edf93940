"""The optional HTTP endpoints (``ops.http``): ``GET /healthz`` and ``GET /metrics``.

Served with aiohttp on the bot's own loop, bound to the one loopback address of the settings
(the config refuses any other: these endpoints show internals, such as key ids and queue
depths; a reverse proxy in front is the way to reach them from elsewhere).

``/healthz`` runs :class:`bot.ops.health.HealthChecks`: 200 with ``{"status": "ok", …}`` when
every check passes, else 503 naming the failing checks. ``/metrics`` answers the Prometheus
text format of :class:`bot.ops.metrics.Metrics`, after setting the gauges read at scrape time:
the keys by state (from the pool, in memory) and the inbox depth (one store read, bounded by
:data:`INBOX_TIMEOUT_S`; when it does not answer in time the last value stays).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bot.errors import OpsServerError, StoreError
from bot.llm.keypool import KeyView
from bot.logging import get_logger
from bot.ops.health import HealthChecks
from bot.ops.metrics import Metrics
from bot.store import Store

log = get_logger(__name__)

#: longest wait for the inbox count at a scrape
INBOX_TIMEOUT_S: Final = 2.0


class OpsServer:
    """``/healthz`` and ``/metrics`` on ``host:port``; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        health: HealthChecks,
        store: Store,
        keys: Callable[[], Iterable[KeyView]],
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._health = health
        self._store = store
        self._keys = keys
        self._runner: web.AppRunner | None = None
        self.port = port  # the bound port once started (differs when ``port`` is 0)

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; raise :class:`OpsServerError` when the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._serve_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OpsServerError(
                f"ops.http: cannot listen on {self._host}:{self._port}: "
                f"{exc.strerror or exc}: choose another port, or stop what uses it"
            ) from None
        self._runner = runner
        sockets = [address for address in runner.addresses if isinstance(address, tuple)]
        if sockets:
            self.port = int(sockets[0][1])
        log.info("ops_http_listening", url=self.url, endpoints="/healthz /metrics")

    async def stop(self) -> None:
        """Stop listening (requests in progress are cut short)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        report = await self._health.run()
        if not report.ok:
            log.info("health_failing", failing=report.failing)
        return web.json_response(report.to_json(), status=200 if report.ok else 503)

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        self._metrics.set_key_states(view.state for view in self._keys())
        try:
            inbox = await asyncio.wait_for(self._store.inbox_list(), INBOX_TIMEOUT_S)
        except (TimeoutError, StoreError) as exc:
            log.warning("metrics_inbox_unread", error=str(exc) or type(exc).__name__)
        else:
            self._metrics.set_inbox_depth(len(inbox))
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
