"""The Feishu SDK's async REST calls reuse one kept-alive HTTP client per event loop."""

from __future__ import annotations

import asyncio

import httpx

from bot.feishu import http_pool


async def test_the_sdk_transport_gets_one_shared_client_per_loop() -> None:
    from lark_oapi.core.http import transport

    shim = http_pool.install()
    assert http_pool.install() is shim  # idempotent
    assert transport.httpx is shim
    async with shim.AsyncClient() as first, shim.AsyncClient() as second:
        assert first is second
    assert not first.is_closed  # lent, not closed after use
    other_loop_client = await asyncio.to_thread(asyncio.run, _client_of_a_new_loop(shim))
    assert other_loop_client is not first
    await shim.aclose()
    assert first.is_closed
    async with shim.AsyncClient() as renewed:
        assert renewed is not first
    await shim.aclose()


async def _client_of_a_new_loop(shim: http_pool.HttpxShim) -> httpx.AsyncClient:
    async with shim.AsyncClient() as client:
        await shim.aclose()
        return client


async def test_a_client_with_its_own_settings_is_made_and_closed_as_before() -> None:
    shim = http_pool.install()
    async with shim.AsyncClient(timeout=3) as own:
        assert own.timeout.read == 3
    assert own.is_closed


def test_everything_else_of_httpx_passes_through() -> None:
    shim = http_pool.install()
    assert shim.Timeout is httpx.Timeout
    assert shim.HTTPError is httpx.HTTPError
