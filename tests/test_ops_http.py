"""The health and metrics endpoints: what an operator's probe and Prometheus get.

A real server on 127.0.0.1 (an ephemeral port) over a real SQLite store and key pool; requests
go through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.config import parse_settings
from bot.errors import OpsServerError
from bot.llm.keypool import KeyPool, key_id_of
from bot.ops.health import HealthChecks
from bot.ops.http import OpsServer
from bot.ops.metrics import Metrics
from bot.store import InboxEntry, SQLiteStore

KEY_A = "sk-test-ops-key-a-0000000000000000000001"
KEY_B = "sk-test-ops-key-b-0000000000000000000002"


@dataclass
class Ops:
    """The server, and the live parts behind it that a test changes."""

    server: OpsServer
    store: SQLiteStore
    pool: KeyPool
    metrics: Metrics
    connection: list[str]

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.server.url + path) as response,
        ):
            body = await response.text()
            data = await response.json() if response.content_type == "application/json" else None
            return response.status, body, data


async def build(tmp_path: Path, keys: list[str], *, store_timeout_s: float = 2.0) -> Ops:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    pool = KeyPool(store)
    await pool.load(parse_settings({"llm": {"keys": [{"key": k} for k in keys]}}).llm.keys)
    connection = ["connected"]
    metrics = Metrics()
    health = HealthChecks(
        connection=lambda: connection[0],
        store=store,
        keys=pool.keys,
        store_timeout_s=store_timeout_s,
    )
    server = OpsServer("127.0.0.1", 0, metrics=metrics, health=health, store=store, keys=pool.keys)
    await server.start()
    return Ops(server, store, pool, metrics, connection)


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[Ops]:
    running = await build(tmp_path, [KEY_A, KEY_B])
    try:
        yield running
    finally:
        await running.server.stop()
        await running.store.close()


# ---- /healthz --------------------------------------------------------------------------------


async def test_healthz_is_200_when_connected_the_store_writes_and_a_key_is_usable(
    ops: Ops,
) -> None:
    status, _, data = await ops.get("/healthz")
    assert status == 200
    assert data == {
        "status": "ok",
        "failing": [],
        "checks": {
            "feishu": {"ok": True, "detail": "connected"},
            "store": {"ok": True, "detail": "writable"},
            "keys": {"ok": True, "detail": "2 active"},
        },
    }


async def test_healthz_is_503_naming_feishu_while_the_connection_is_being_restored(
    ops: Ops,
) -> None:
    ops.connection[0] = "reconnecting"
    status, _, data = await ops.get("/healthz")
    assert status == 503
    assert data["status"] == "failing"
    assert data["failing"] == ["feishu"]
    assert data["checks"]["feishu"] == {"ok": False, "detail": "reconnecting"}


async def test_a_cooling_key_still_counts_as_usable_but_disabled_keys_do_not(ops: Ops) -> None:
    await ops.pool.cool(key_id_of(KEY_A), 30, "429 rate_limit_exceeded")
    status, _, data = await ops.get("/healthz")
    assert status == 200
    assert data["checks"]["keys"] == {"ok": True, "detail": "1 active, 1 cooling"}

    await ops.pool.disable(key_id_of(KEY_B), "401 invalid_api_key")
    assert (await ops.get("/healthz"))[0] == 200
    await ops.pool.disable(key_id_of(KEY_A), "401 invalid_api_key")
    status, _, data = await ops.get("/healthz")
    assert status == 503
    assert data["failing"] == ["keys"]
    assert data["checks"]["keys"] == {"ok": False, "detail": "every key is disabled (2 disabled)"}


async def test_healthz_fails_without_any_key(tmp_path: Path) -> None:
    ops = await build(tmp_path, [])
    try:
        status, _, data = await ops.get("/healthz")
    finally:
        await ops.server.stop()
        await ops.store.close()
    assert status == 503
    assert data["failing"] == ["keys"]
    assert data["checks"]["keys"]["detail"].startswith("no API key")


async def test_healthz_names_the_store_when_it_takes_no_write(ops: Ops) -> None:
    await ops.store.close()
    status, _, data = await ops.get("/healthz")
    assert status == 503
    assert data["failing"] == ["store"]
    assert data["checks"]["store"] == {
        "ok": False,
        "detail": "a write failed: the store is not open",
    }


async def test_the_store_check_gives_up_on_a_write_that_hangs(ops: Ops) -> None:
    class HangingStore:
        async def mark_seen(self, key: str, ttl_s: float) -> bool:
            await asyncio.Event().wait()
            return True

    health = HealthChecks(
        connection=lambda: "connected",
        store=HangingStore(),  # type: ignore[arg-type]
        keys=ops.pool.keys,
        store_timeout_s=0.05,
    )
    check = await asyncio.wait_for(health.store(), 5)
    assert check.ok is False
    assert check.detail == "a write did not finish within 0.05 s"


async def test_each_store_probe_is_a_real_write_of_its_own_short_lived_mark(ops: Ops) -> None:
    await ops.get("/healthz")
    await ops.get("/healthz")
    for probe in (1, 2):
        assert await ops.store.is_seen(f"ops:probe:{os.getpid()}:{probe}")


# ---- /metrics --------------------------------------------------------------------------------


async def test_metrics_are_prometheus_text_with_keys_and_inbox_read_at_scrape_time(
    ops: Ops,
) -> None:
    ops.metrics.message_received()
    for number in (1, 2):
        entry = InboxEntry(f"om_{number}", "conversation", "{}", 1_764_000_000.0)
        assert await ops.store.accept_message(entry, 60)
    await ops.pool.disable(key_id_of(KEY_B), "401 invalid_api_key")

    status, body, _ = await ops.get("/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples[("feishu_gpt_bot_messages_received_total", ())] == 1
    assert samples[("feishu_gpt_bot_inbox_messages", ())] == 2
    assert samples[("feishu_gpt_bot_keys", (("state", "active"),))] == 1
    assert samples[("feishu_gpt_bot_keys", (("state", "disabled"),))] == 1
    assert samples[("feishu_gpt_bot_keys", (("state", "cooling"),))] == 0


async def test_the_metrics_content_type_is_prometheus_text(ops: Ops) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(ops.server.url + "/metrics") as response,
    ):
        assert response.content_type == "text/plain"
        assert "version=" in response.headers["Content-Type"]


async def test_a_scrape_while_the_store_is_unavailable_keeps_the_last_inbox_depth(
    ops: Ops,
) -> None:
    entry = InboxEntry("om_1", "conversation", "{}", 1_764_000_000.0)
    await ops.store.accept_message(entry, 60)
    await ops.get("/metrics")
    await ops.store.close()
    status, body, _ = await ops.get("/metrics")
    assert status == 200
    assert "feishu_gpt_bot_inbox_messages 1.0" in body


# ---- the server itself -----------------------------------------------------------------------


async def test_other_paths_are_not_found(ops: Ops) -> None:
    assert (await ops.get("/"))[0] == 404
    assert (await ops.get("/debug"))[0] == 404


async def test_a_port_in_use_is_a_clear_error_naming_the_setting(ops: Ops) -> None:
    second = OpsServer(
        "127.0.0.1",
        ops.server.port,
        metrics=ops.metrics,
        health=HealthChecks(connection=lambda: "connected", store=ops.store, keys=ops.pool.keys),
        store=ops.store,
        keys=ops.pool.keys,
    )
    with pytest.raises(OpsServerError) as caught:
        await second.start()
    assert str(caught.value).startswith(f"ops.http: cannot listen on 127.0.0.1:{ops.server.port}: ")
    assert str(caught.value).endswith("choose another port, or stop what uses it")


async def test_a_stopped_server_no_longer_answers(ops: Ops) -> None:
    url = ops.server.url
    await ops.server.stop()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url + "/healthz")
