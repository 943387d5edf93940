"""Owners and admins are told privately when a key leaves or re-enters the pool.

The real key pool and Feishu SDK client, the fake Feishu over sockets.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.feishu.key_notices import KeyNotices
from bot.llm.keypool import KeyPool
from bot.store import SQLiteStore
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread
from tests.feishu_clients import feishu_api

ADMIN = "ou_admin_000000000000000000000000001"
DONOR = "ou_donor_000000000000000000000000002"
DONATED = "sk-donated-key-0000000000000000000000abcd"


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    app = FakeFeishu(app_id=f"cli_notices_{uuid.uuid4().hex[:12]}")
    with app.run_in_thread() as running:
        yield running


@pytest.fixture
async def pool(fake: FakeFeishuThread, tmp_path: Path) -> AsyncIterator[KeyPool]:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    async with feishu_api(fake) as api:
        key_pool = KeyPool(store)
        await key_pool.load([])
        key_pool.on_state_change = KeyNotices(
            api, [ADMIN, "not-an-open-id"], health_check_minutes=30
        )
        yield key_pool
    await store.close()


def texts_to(fs: FakeFeishu, open_id: str) -> list[str]:
    return [fs.message_text(m.message_id) for m in fs.sent_messages() if m.receive_id == open_id]


async def test_the_donor_and_the_admins_are_told_once_when_a_key_dies_and_returns(
    fake: FakeFeishuThread, pool: KeyPool
) -> None:
    view = await pool.add(DONATED, owner=DONOR, source="donated")
    await pool.disable(view.key_id, "401 invalid_api_key")
    await pool.disable(view.key_id, "401 invalid_api_key")  # no second notice
    fs = fake.fake
    (to_donor,) = texts_to(fs, DONOR)
    assert to_donor.startswith("Your API key sk-…abcd")
    assert view.key_id in to_donor
    assert "401 invalid_api_key" in to_donor
    assert f"/key remove {view.key_id}" in to_donor
    (to_admin,) = texts_to(fs, ADMIN)
    assert f"/keys enable {view.key_id}" in to_admin
    for text in (to_donor, to_admin):
        assert DONATED not in text

    async def works(secret: str) -> bool:
        return True

    await pool.recheck(works)
    assert texts_to(fs, DONOR)[-1].startswith("API key sk-…abcd")
    assert "back in the pool" in texts_to(fs, ADMIN)[-1]


async def test_a_manual_disable_tells_nobody(fake: FakeFeishuThread, pool: KeyPool) -> None:
    view = await pool.add(DONATED, owner=DONOR, source="donated")
    await pool.disable(view.key_id, "disabled by an admin", by="manual")
    assert fake.fake.sent_messages() == []


async def test_a_notice_feishu_refuses_does_not_disturb_the_pool(
    fake: FakeFeishuThread, pool: KeyPool
) -> None:
    fake.fake.fail("message_create", 1, "internal error", http_status=500, times=None)
    view = await pool.add(DONATED, owner=DONOR, source="donated")
    await pool.disable(view.key_id, "401 invalid_api_key")
    listed = pool.keys()
    assert [k.state for k in listed if k.key_id == view.key_id] == ["disabled"]
