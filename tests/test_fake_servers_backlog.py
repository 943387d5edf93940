"""The fakes keep a burst of connections waiting while they are busy, as real servers do."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.fakes._background import LISTEN_BACKLOG
from tests.fakes.feishu_server import FakeFeishu
from tests.fakes.openai_server import FakeOpenAI

BURST = 300
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def _kernel_allows_the_burst() -> bool:
    try:
        return int(SOMAXCONN.read_text()) >= BURST
    except (OSError, ValueError):
        return True  # not Linux: nothing caps the backlog below what the fakes ask for


@pytest.mark.skipif(not _kernel_allows_the_burst(), reason="net.core.somaxconn caps the backlog")
@pytest.mark.parametrize("fake", [FakeFeishu, FakeOpenAI], ids=["feishu", "openai"])
async def test_a_busy_fake_keeps_a_burst_of_connections_waiting(
    fake: type[FakeFeishu] | type[FakeOpenAI],
) -> None:
    assert LISTEN_BACKLOG >= BURST
    async with fake() as server:
        # Nothing here yields to the loop, so the fake (on this loop) accepts none of them: the
        # kernel completes each handshake in its accept queue, or drops it when that is full.
        connected: list[socket.socket] = []
        try:
            for _ in range(BURST):
                connected.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        finally:
            for each in connected:
                each.close()
        assert len(connected) == BURST
