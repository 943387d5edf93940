"""Sharing keys by chat: donations, ``/key …``, ``/keys …``, and that a key never leaks.

The conversation service with the real key pool, LLM client and key check, against the fake
OpenAI server over sockets; the clock is fake.
"""

from __future__ import annotations

import functools
import io
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.feishu.runner import keep_keys_checked
from bot.llm.keypool import KeyView, key_id_of
from bot.llm.validation import check_key
from bot.logging import configure_logging
from tests.chat_harness import KEY_A, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIThread

DONATED = "sk-proj-donatedDONATEDdonated0000000000wxyz"
ADMIN = "ou_admin_000000000000000000000000001"
DONOR = "ou_donor_000000000000000000000000002"
OTHER = "ou_other_000000000000000000000000003"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    thread: FakeOpenAIThread = FakeOpenAI().run_in_thread()
    try:
        yield thread.fake
    finally:
        thread.close()


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(level="debug", json=True, stream=stream)
    yield stream
    configure_logging(level="warning", stream=io.StringIO())


async def harness(fake: FakeOpenAI, tmp_path: Path, time: FakeTime, **sections: Any) -> ChatHarness:
    sections.setdefault("access", {"admins": [ADMIN]})
    settings = make_settings(fake.base_url, [KEY_A], **sections)
    return await ChatHarness(settings, tmp_path / "data" / "bot.db", time).start()


@pytest.fixture
async def bot(fake: FakeOpenAI, tmp_path: Path, time: FakeTime) -> AsyncIterator[ChatHarness]:
    built = await harness(fake, tmp_path, time)
    yield built
    await built.close()


def listed(bot: ChatHarness) -> list[KeyView]:
    """What the pool shows about its keys."""
    return bot.pool.keys()


def everything_recorded(bot_logs: str, fake: FakeOpenAI) -> str:
    prompts = "\n".join(str(request.messages) for request in fake.requests)
    return bot_logs + prompts


# ---- donations -------------------------------------------------------------------------------


async def test_a_donated_key_joins_the_pool_and_never_leaks(
    bot: ChatHarness, fake: FakeOpenAI, logs: io.StringIO
) -> None:
    answer = await bot.ask(f"我的key是{DONATED}", user=DONOR, conversation="p2p:donor")
    assert "Thank you" in answer.text
    assert "sk-proj-…wxyz" in answer.text
    assert key_id_of(DONATED) in answer.text
    assert "delete it" in answer.text
    assert DONATED not in answer.text
    (donated,) = [k for k in listed(bot) if k.source == "donated"]
    assert (donated.owner, donated.state) == (DONOR, "active")
    # any user's next request can use it
    bot.pool.owner_first = True
    assert (await bot.ask("hello", user=DONOR, conversation="p2p:donor")).text == "echo: hello"
    assert fake.requests[-1].key == DONATED
    # the key is nowhere: not in history, not sent to the model, not in the logs
    assert [t.content for t in await bot.store.load_turns("p2p:donor")] == [
        "hello",
        "echo: hello",
    ]
    assert DONATED not in everything_recorded(logs.getvalue(), fake)
    assert DONATED[-12:] not in logs.getvalue()


async def test_an_invalid_key_is_refused_with_the_reason_and_nothing_is_stored(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.script(DONATED, invalid=True)
    answer = await bot.ask(DONATED, user=DONOR)
    assert "invalid" in answer.text
    assert "Nothing was stored" in answer.text
    assert [k.source for k in listed(bot)] == ["config"]


async def test_a_key_that_cannot_be_checked_now_is_not_kept(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = make_settings(f"http://127.0.0.1:{port}/v1", [KEY_A])
    bot = await ChatHarness(settings, tmp_path / "bot.db", time).start()
    try:
        answer = await bot.ask(DONATED, user=DONOR)
    finally:
        await bot.close()
    assert "could not check" in answer.text
    assert "try again later" in answer.text
    assert [k.source for k in listed(bot)] == ["config"]


async def test_a_key_already_in_the_pool_is_recognised(bot: ChatHarness) -> None:
    await bot.ask(DONATED, user=DONOR)
    again = await bot.ask(f"`{DONATED}`", user=OTHER)
    assert "already in the pool" in again.text
    assert len(listed(bot)) == 2


async def test_a_key_posted_in_a_group_is_refused_and_not_stored(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    answer = await bot.ask(DONATED, user=DONOR, conversation="group:oc:om", in_group=True)
    assert "revoke" in answer.text
    mention = await bot.ask(f"try {DONATED} please", conversation="group:oc:om", in_group=True)
    assert "revoke" in mention.text
    assert len(listed(bot)) == 1
    assert fake.requests == []
    assert await bot.store.load_turns("group:oc:om") == []


async def test_donations_can_be_turned_off(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    bot = await harness(fake, tmp_path, time, keys={"accept_donations": False})
    try:
        answer = await bot.ask(DONATED, user=DONOR)
    finally:
        await bot.close()
    assert "does not take keys by chat" in answer.text
    assert len(listed(bot)) == 1


async def test_a_sentence_that_merely_contains_a_key_is_refused_not_donated(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    answer = await bot.ask(f"please debug why {DONATED} fails in my script", user=DONOR)
    assert "looks like an API key" in answer.text
    assert fake.requests == []
    assert len(listed(bot)) == 1


async def test_the_app_secret_in_a_message_is_never_sent_to_the_model(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    secret = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"  # Feishu app secrets have no key prefix
    bot = await harness(fake, tmp_path, time, feishu={"app_secret": secret})
    try:
        answer = await bot.ask(f"is this our app secret: {secret}?", user=DONOR)
    finally:
        await bot.close()
    assert "looks like an API key" in answer.text
    assert fake.requests == []


async def test_key_add_takes_a_key_of_any_shape(bot: ChatHarness) -> None:
    answer = await bot.ask("/key add custom-gateway-token-123456789", user=DONOR)
    assert "Thank you" in answer.text
    assert any(k.owner == DONOR for k in listed(bot))


# ---- /key and /keys --------------------------------------------------------------------------


async def test_key_mine_lists_only_the_users_own_keys_masked(bot: ChatHarness) -> None:
    await bot.ask(DONATED, user=DONOR)
    mine = await bot.ask("/key mine", user=DONOR)
    assert "sk-proj-…wxyz" in mine.text
    assert key_id_of(DONATED) in mine.text
    assert DONATED not in mine.text
    assert "sk-…0001" not in mine.text  # the configured key is not theirs
    assert "not shared a key" in (await bot.ask("/key mine", user=OTHER)).text


async def test_key_remove_works_only_for_the_owner(bot: ChatHarness) -> None:
    await bot.ask(DONATED, user=DONOR)
    key_id = key_id_of(DONATED)
    refused = await bot.ask(f"/key remove {key_id}", user=OTHER)
    assert "not one of your keys" in refused.text
    assert len(listed(bot)) == 2
    removed = await bot.ask(f"/key remove {key_id}", user=DONOR)
    assert "Removed" in removed.text
    assert len(listed(bot)) == 1


async def test_keys_is_for_admins_only(bot: ChatHarness) -> None:
    assert "only the bot's admins" in (await bot.ask("/keys", user=OTHER)).text
    listing = await bot.ask("/keys", user=ADMIN)
    assert key_id_of(KEY_A) in listing.text
    assert KEY_A not in listing.text


async def test_admins_disable_enable_and_remove_keys(bot: ChatHarness) -> None:
    await bot.ask(DONATED, user=DONOR)
    key_id = key_id_of(DONATED)
    assert "Disabled" in (await bot.ask(f"/keys disable {key_id}", user=ADMIN)).text
    assert {k.key_id: k.state for k in listed(bot)}[key_id] == "disabled"
    assert "Enabled" in (await bot.ask(f"/keys enable {key_id}", user=ADMIN)).text
    assert {k.key_id: k.state for k in listed(bot)}[key_id] == "active"
    config_key = key_id_of(KEY_A)
    assert "settings.yaml" in (await bot.ask(f"/keys remove {config_key}", user=ADMIN)).text
    assert "Removed" in (await bot.ask(f"/keys remove {key_id}", user=ADMIN)).text
    assert "no key with id" in (await bot.ask("/keys enable nope", user=ADMIN)).text


async def test_the_health_check_brings_back_a_dead_key_once_the_provider_accepts_it(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    key_id = key_id_of(KEY_A)
    fake.script(KEY_A, invalid=True)
    await bot.pool.disable(key_id, "401 invalid_api_key")
    check = functools.partial(check_key, bot.settings.llm)
    await keep_keys_checked(bot.pool, check, every_minutes=0)  # at start: still refused
    assert [k.state for k in listed(bot)] == ["disabled"]
    fake.script(KEY_A).invalid = False
    await keep_keys_checked(bot.pool, check, every_minutes=0)
    assert [k.state for k in listed(bot)] == ["active"]
    await bot.pool.disable(key_id, "disabled by an admin", by="manual")
    await keep_keys_checked(bot.pool, check, every_minutes=0)
    assert [k.state for k in listed(bot)] == ["disabled"]  # a manual disable stays
