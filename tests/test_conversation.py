"""The conversation core end to end: service → LLM client → real openai SDK → fake server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.chat.pacing import ModelRequestsFirst
from bot.chat.replies import ReplyDelta, ReplyEvent, ReplyFinished
from bot.llm.keypool import key_id_of
from bot.logging import configure_logging
from tests.chat_harness import KEY_A, KEY_B, ChatHarness, FakeTime, collect, make_settings
from tests.fakes.openai_server import (
    FakeOpenAI,
    Reply,
    ResetAfter,
    context_length_exceeded,
    insufficient_quota,
    invalid_api_key,
    rate_limit_exceeded,
    server_error,
)
from tests.helpers import holding_the_store_thread


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


async def start(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime, keys: list[str], **sections: object
) -> ChatHarness:
    settings = make_settings(fake.base_url, keys, **sections)
    return await ChatHarness(settings, tmp_path / "bot.db", time).start()


@pytest.fixture
async def bot(fake: FakeOpenAI, tmp_path: Path, time: FakeTime) -> AsyncIterator[ChatHarness]:
    harness = await start(fake, tmp_path, time, [KEY_A, KEY_B])
    yield harness
    await harness.close()


@pytest.fixture
async def one_key_bot(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> AsyncIterator[ChatHarness]:
    harness = await start(fake, tmp_path, time, [KEY_A])
    yield harness
    await harness.close()


# ---- multi-turn history ----------------------------------------------------------------------


async def test_answer_streams_in_pieces_and_finishes_with_the_whole_text(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.reply = "Hello! How can I help you today?"
    answer = await bot.ask("hi")
    assert len([e for e in answer.events if isinstance(e, ReplyDelta)]) > 1
    assert answer.streamed == "Hello! How can I help you today?"
    assert answer.finished is not None
    assert answer.finished.text == answer.streamed
    assert answer.finished.exchange.usage is not None


async def test_the_answer_ends_before_the_key_pool_has_saved_its_count(
    one_key_bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.reply = "Hello there."
    reply = one_key_bot.service.handle(one_key_bot.message("hi"))
    events: list[ReplyEvent] = []

    async def until_finished() -> None:
        async for event in reply:
            events.append(event)
            if isinstance(event, ReplyFinished):
                return

    with holding_the_store_thread(one_key_bot.store):  # every write waits, as under a burst
        await asyncio.wait_for(until_finished(), 5)  # the answer does not wait for the count
    await collect(reply)  # the rest of the reply: the count is saved meanwhile
    assert "".join(e.text for e in events if isinstance(e, ReplyDelta)) == "Hello there."
    (view,) = one_key_bot.pool.keys()
    assert view.requests == 1
    stored = {k.key_id: k for k in await one_key_bot.store.load_keys()}
    assert stored[key_id_of(KEY_A)].requests == 1


async def test_multi_turn_history_reaches_the_llm_in_order(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    await bot.ask("my name is Ada")
    await bot.ask("what is my name?")
    last = fake.requests[-1].messages
    assert [(m["role"], m["content"]) for m in last] == [
        ("system", "You are a helpful assistant."),
        ("user", "my name is Ada"),
        ("assistant", "echo: my name is Ada"),
        ("user", "what is my name?"),
    ]


async def test_conversations_do_not_share_history(bot: ChatHarness, fake: FakeOpenAI) -> None:
    await bot.ask("secret plan", conversation="alice")
    await bot.ask("hello", conversation="bob", user="u2")
    contents = [m["content"] for m in fake.requests[-1].messages]
    assert "secret plan" not in contents


async def test_history_survives_a_restart(fake: FakeOpenAI, tmp_path: Path, time: FakeTime) -> None:
    first = await start(fake, tmp_path, time, [KEY_A])
    await first.ask("remember the number 42")
    await first.close()
    second = await start(fake, tmp_path, time, [KEY_A])
    await second.ask("which number?")
    await second.close()
    contents = [m["content"] for m in fake.requests[-1].messages]
    assert contents[1:] == [
        "remember the number 42",
        "echo: remember the number 42",
        "which number?",
    ]


async def test_reset_forgets_the_conversation(bot: ChatHarness, fake: FakeOpenAI) -> None:
    await bot.ask("something to forget")
    answer = await bot.ask("/reset")
    assert "forgot" in answer.text
    assert len(fake.requests) == 1  # the command itself never reaches the LLM
    await bot.ask("fresh start")
    assert [m["content"] for m in fake.requests[-1].messages][1:] == ["fresh start"]


async def test_help_and_unknown_commands_answer_without_the_llm(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    assert "/reset" in (await bot.ask("/help")).text
    unknown = await bot.ask("/frobnicate now")
    assert unknown.text.startswith("Unknown command: /frobnicate.")
    assert fake.requests == []


async def test_a_message_with_an_api_key_is_neither_sent_to_the_llm_nor_kept(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    answer = await bot.ask("here is my key sk-proj-abcdefghijklmnopqrstuvwx0123 thanks")
    assert "looks like an API key" in answer.text
    assert fake.requests == []
    assert await bot.store.load_turns("c1") == []


async def test_a_path_is_an_ordinary_message_not_a_command(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    answer = await bot.ask("/usr/bin/env python3 does not start")
    assert answer.text == "echo: /usr/bin/env python3 does not start"


async def test_history_is_trimmed_to_the_budget_keeping_the_newest_turns(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    bot = await start(fake, tmp_path, time, [KEY_A], chat={"max_history_tokens": 150})
    for index in range(12):
        await bot.ask(f"message number {index} " + "word " * 10)
    await bot.ask("the current question")
    await bot.close()
    sent = fake.requests[-1].messages
    contents = [m["content"] for m in sent]
    assert contents[-1] == "the current question"
    assert "message number 0" not in " ".join(contents)
    assert "message number 11" in " ".join(contents)
    assert sent[1]["role"] == "user"  # never an answer without its question
    from bot.chat.tokens import estimate_message_tokens

    assert sum(estimate_message_tokens(c) for c in contents) <= 150


async def test_an_oversized_message_gets_a_clear_answer_and_no_llm_call(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    bot = await start(fake, tmp_path, time, [KEY_A], chat={"max_history_tokens": 200})
    answer = await bot.ask("word " * 2000)
    await bot.close()
    assert answer.failed is not None
    assert answer.failed.message.startswith("Your message is too long for me")
    assert fake.requests == []


async def test_idle_conversation_starts_afresh(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    bot = await start(fake, tmp_path, time, [KEY_A], chat={"idle_reset_minutes": 10})
    await bot.ask("old topic")
    time.advance(11 * 60)
    await bot.ask("new topic")
    await bot.close()
    assert [m["content"] for m in fake.requests[-1].messages][1:] == ["new topic"]


async def test_context_length_exceeded_trims_harder_once_then_tells_the_user(
    one_key_bot: ChatHarness, fake: FakeOpenAI
) -> None:
    for index in range(4):
        await one_key_bot.ask(f"earlier {index}")
    fake.enqueue(context_length_exceeded())
    answer = await one_key_bot.ask("long question")
    assert answer.text == "echo: long question"
    assert len(fake.requests[-1].messages) < len(fake.requests[-2].messages)
    fake.enqueue(context_length_exceeded(), context_length_exceeded())
    refused = await one_key_bot.ask("again")
    assert refused.failed is not None
    assert "/reset" in refused.failed.message
    assert one_key_bot.key_state(KEY_A) == "active"  # the key is not to blame


# ---- keys: rate limits, dead keys, waiting ---------------------------------------------------


async def test_rate_limited_key_cools_down_and_the_request_moves_to_the_next_key(
    bot: ChatHarness, fake: FakeOpenAI, time: FakeTime
) -> None:
    fake.enqueue(rate_limit_exceeded(retry_after=20))
    answer = await bot.ask("hello")
    assert answer.text == "echo: hello"
    assert answer.notices == []
    first, second = fake.requests
    assert first.key != second.key
    assert time.sleeps == []  # switching keys costs no wait
    assert bot.key_state(first.key) == "cooling"

    for _ in range(3):
        await bot.ask("while cooling")
    assert {r.key for r in fake.requests[2:]} == {second.key}

    time.advance(21)
    bot.pool.keys()  # the cooled key is usable again
    assert bot.key_state(first.key) == "active"


async def test_cooled_key_is_used_again_after_retry_after(
    one_key_bot: ChatHarness, fake: FakeOpenAI, time: FakeTime
) -> None:
    fake.enqueue(rate_limit_exceeded(retry_after=7))
    answer = await one_key_bot.ask("hello")
    assert answer.text == "echo: hello"
    assert time.sleeps == [7]
    assert answer.notices == ["All API keys are busy right now; your answer starts in about 7 s."]
    assert [r.key for r in fake.requests] == [KEY_A, KEY_A]


@pytest.mark.parametrize(
    "error", [insufficient_quota(), invalid_api_key()], ids=["quota", "invalid"]
)
async def test_dead_key_is_disabled_and_never_used_again(
    bot: ChatHarness, fake: FakeOpenAI, error: object
) -> None:
    fake.enqueue(error)  # type: ignore[arg-type]
    answer = await bot.ask("hello")
    assert answer.text == "echo: hello"
    dead = fake.requests[0].key
    assert bot.key_state(dead) == "disabled"
    for user in ("u1", "u2", "u3", "u4", "u5"):
        await bot.ask("more", conversation=user, user=user)
    assert all(r.key != dead for r in fake.requests[1:])


async def test_disabled_key_stays_disabled_after_a_restart(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    first = await start(fake, tmp_path, time, [KEY_A, KEY_B])
    fake.enqueue(invalid_api_key())
    await first.ask("hello")
    dead = fake.requests[0].key
    await first.close()
    second = await start(fake, tmp_path, time, [KEY_A, KEY_B])
    assert second.key_state(dead) == "disabled"
    await second.close()


async def test_all_keys_cooling_waits_for_the_earliest_and_tells_the_user(
    bot: ChatHarness, fake: FakeOpenAI, time: FakeTime
) -> None:
    fake.enqueue(rate_limit_exceeded(retry_after=12), rate_limit_exceeded(retry_after=5))
    answer = await bot.ask("hello")
    assert answer.text == "echo: hello"
    assert answer.notices == ["All API keys are busy right now; your answer starts in about 5 s."]
    assert time.sleeps == [5]
    assert fake.requests[2].key == fake.requests[1].key  # the key that cooled for 5 s


async def test_waiting_longer_than_max_wait_fails_politely(
    bot: ChatHarness, fake: FakeOpenAI, time: FakeTime
) -> None:
    fake.enqueue(rate_limit_exceeded(retry_after=120), rate_limit_exceeded(retry_after=90))
    answer = await bot.ask("hello")
    assert answer.failed is not None
    assert answer.failed.message.startswith("All API keys are rate limited right now")
    assert time.sleeps == []


async def test_all_keys_disabled_is_a_typed_failure_with_a_polite_message(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.invalidate(KEY_A, KEY_B)
    answer = await bot.ask("hello")
    assert answer.failed is not None
    assert answer.failed.reason == "every API key is disabled"
    assert "out of service" in answer.failed.message
    assert {bot.key_state(KEY_A), bot.key_state(KEY_B)} == {"disabled"}


async def test_no_key_at_all_says_how_to_add_one(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> None:
    bot = await start(fake, tmp_path, time, [])
    answer = await bot.ask("hello")
    await bot.close()
    assert answer.failed is not None
    assert "no API key yet" in answer.failed.message
    assert "OPENAI_API_KEYS" in answer.failed.message


async def test_server_errors_back_off_and_retry(
    one_key_bot: ChatHarness, fake: FakeOpenAI, time: FakeTime
) -> None:
    fake.enqueue(server_error(), server_error())
    answer = await one_key_bot.ask("hello")
    assert answer.text == "echo: hello"
    assert len(time.sleeps) == 2
    assert all(0 < s <= 8 for s in time.sleeps)
    assert one_key_bot.key_state(KEY_A) == "active"


async def test_persistent_server_errors_end_in_an_apology(
    one_key_bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.persistent = server_error()
    answer = await one_key_bot.ask("hello")
    assert answer.failed is not None
    assert answer.failed.message.startswith("Sorry, the model is not answering right now")
    assert len(fake.requests) == 4  # llm.max_attempts


async def test_a_timeout_is_retried(fake: FakeOpenAI, tmp_path: Path, time: FakeTime) -> None:
    bot = await start(fake, tmp_path, time, [KEY_A], llm={"request_timeout_s": 0.3})
    gate = fake.hold_next()
    answer = await bot.ask("hello")
    gate.release()
    await bot.close()
    assert answer.text == "echo: hello"
    assert len(fake.requests) == 2


async def test_each_user_sticks_to_one_key(bot: ChatHarness, fake: FakeOpenAI) -> None:
    for _ in range(4):
        await bot.ask("hi", user="carol", conversation="carol")
    assert len({r.key for r in fake.requests}) == 1
    for index in range(12):
        await bot.ask("hi", user=f"user{index}", conversation=f"user{index}")
    assert {r.key for r in fake.requests} == {KEY_A, KEY_B}  # users spread over keys


async def test_broken_stream_keeps_the_partial_exchange_marked_cut_so_continue_works(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(ResetAfter(chunks=2))
    fake.default.reply = "abcdefghijklmnopqrstuvwxyz"
    answer = await bot.ask("tell me the alphabet")
    assert answer.finished is not None
    assert answer.finished.complete is False
    assert answer.finished.text == "abcdefgh"  # two chunks of four characters
    assert "cut off" in (answer.finished.note or "")
    assert len(fake.requests) == 1
    history = await bot.store.load_turns("c1")
    assert [(t.role, t.content, t.status) for t in history] == [
        ("user", "tell me the alphabet", "complete"),
        ("assistant", "abcdefgh", "cut"),
    ]
    await bot.ask("continue")
    assert [m["content"] for m in fake.requests[-1].messages][1:] == [
        "tell me the alphabet",
        "abcdefgh",
        "continue",
    ]


@pytest.mark.parametrize(
    ("finish_reason", "note"),
    [("length", "length limit"), ("content_filter", "content filter")],
)
async def test_an_answer_stopped_early_by_the_provider_says_so(
    bot: ChatHarness, fake: FakeOpenAI, finish_reason: str, note: str
) -> None:
    fake.enqueue(Reply(text="partial answer", finish_reason=finish_reason))
    answer = await bot.ask("write a novel")
    assert answer.finished is not None
    assert answer.finished.text == "partial answer"
    assert note in (answer.finished.note or "")
    assert answer.finished.complete is False


async def test_nothing_is_saved_until_the_reply_is_committed(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    reply = bot.service.handle(bot.message("not delivered"))
    events = [event async for event in reply]
    assert events
    await reply.aclose()  # the transport could not deliver it
    assert await bot.store.load_turns("c1") == []
    assert await bot.store.usage_for_day("2025-11-24") == []


async def test_the_next_message_waits_until_the_previous_reply_is_committed(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    first = bot.service.handle(bot.message("first"))
    second = bot.service.handle(bot.message("second"))
    _ = [event async for event in first]  # streamed, but not delivered yet
    assert second.queued
    await first.commit()
    assert not second.queued
    assert (await collect(second)).text == "echo: second"
    prompt = [m["content"] for m in fake.requests[-1].messages][1:]
    assert prompt == ["first", "echo: first", "second"]


async def test_servers_that_reject_stream_options_are_remembered(
    one_key_bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.reject_stream_options = True
    assert (await one_key_bot.ask("one")).text == "echo: one"
    assert (await one_key_bot.ask("two")).text == "echo: two"
    options = [r.stream_options for r in fake.requests]
    assert options == [{"include_usage": True}, None, None]


async def test_usage_is_counted_per_user_and_key(bot: ChatHarness, fake: FakeOpenAI) -> None:
    await bot.ask("count me", user="dave", conversation="dave")
    day = bot.store  # the usage table is keyed by local day
    from datetime import datetime

    rows = await day.usage_for_day(datetime.fromtimestamp(bot.time.now).strftime("%Y-%m-%d"))
    (row,) = rows
    assert row.user_id == "dave"
    assert row.key_id == key_id_of(fake.requests[0].key or "")
    assert row.requests == 1
    assert row.completion_tokens > 0


# ---- ordering and concurrency ----------------------------------------------------------------


async def test_two_conversations_stream_concurrently(bot: ChatHarness, fake: FakeOpenAI) -> None:
    held = fake.hold_next(after_chunks=1)
    slow = asyncio.create_task(collect(bot.service.handle(bot.message("slow", conversation="a"))))
    await asyncio.wait_for(held.arrived.wait(), 5)
    fast = await collect(bot.service.handle(bot.message("fast", conversation="b", user="u2")))
    assert fast.text == "echo: fast"
    assert not slow.done()
    held.release()
    assert (await slow).text == "echo: slow"


async def test_messages_of_one_conversation_are_answered_strictly_in_order(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    held = fake.hold_next()
    replies = [bot.service.handle(bot.message(text)) for text in ("first", "second", "third")]
    tasks = [asyncio.create_task(collect(reply)) for reply in reversed(replies)]
    await asyncio.wait_for(held.arrived.wait(), 5)
    await asyncio.sleep(0)
    assert [r.last_user_text for r in fake.requests] == ["first"]
    held.release()
    answers = await asyncio.gather(*tasks)
    assert [a.text for a in reversed(answers)] == ["echo: first", "echo: second", "echo: third"]
    assert [r.last_user_text for r in fake.requests] == ["first", "second", "third"]
    third_prompt = [m["content"] for m in fake.requests[2].messages]
    assert third_prompt[1:] == [
        "first",
        "echo: first",
        "second",
        "echo: second",
        "third",
    ]


async def test_closing_a_reply_early_cancels_it_and_frees_the_conversation(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(Reply(text="a long answer that the user will not wait for"))
    held = fake.hold_next(after_chunks=1)
    reply = bot.service.handle(bot.message("long"))
    first = await reply.__anext__()
    while not isinstance(first, ReplyDelta):
        first = await reply.__anext__()
    await reply.aclose()
    held.release()
    assert (await bot.ask("next")).text == "echo: next"
    assert [bot.pool.in_flight(key_id_of(k)) for k in (KEY_A, KEY_B)] == [0, 0]


# ---- secrets ---------------------------------------------------------------------------------


async def test_no_key_appears_in_captured_logs(bot: ChatHarness, fake: FakeOpenAI) -> None:
    stream = io.StringIO()
    configure_logging(level="debug", json=True, stream=stream)
    fake.enqueue(rate_limit_exceeded(retry_after=1), invalid_api_key(), server_error())
    await bot.ask("hello")
    output = stream.getvalue()
    configure_logging(level="warning", stream=io.StringIO())
    assert "key_cooled" in output
    assert "key_disabled" in output
    retries = [json.loads(line) for line in output.splitlines() if '"llm_retry"' in line]
    assert retries
    assert all(str(record["key"]).startswith("sk-…") for record in retries)  # masked key id
    for secret in (KEY_A, KEY_B):
        assert secret not in output
        assert secret[-12:] not in output


# ---- model requests first (bot/chat/pacing.py) -----------------------------------------------


async def test_an_answer_is_preparing_until_its_model_request_goes_out(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    bot.service.requests_first = ModelRequestsFirst(max_wait_s=60)
    held = fake.hold_next()  # the model's first token waits
    reply = bot.service.handle(bot.message("hello"))
    assert bot.service.requests_first.preparing_now == 1
    answering = asyncio.create_task(collect(reply))
    await asyncio.wait_for(held.arrived.wait(), 10)
    await asyncio.wait_for(bot.service.requests_first.wait(), 10)
    assert bot.service.requests_first.preparing_now == 0  # before any text came
    held.release()
    answer = await asyncio.wait_for(answering, 10)
    assert answer.finished is not None


async def test_a_message_waiting_for_the_one_before_it_is_not_preparing_yet(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    gate = bot.service.requests_first = ModelRequestsFirst(max_wait_s=60)
    held = fake.hold_next()
    first = asyncio.create_task(collect(bot.service.handle(bot.message("one"))))
    await asyncio.wait_for(held.arrived.wait(), 10)
    await asyncio.wait_for(gate.wait(), 10)
    second = bot.service.handle(bot.message("two"))  # same conversation: waits for "one"
    assert gate.preparing_now == 0
    held.release()
    await asyncio.wait_for(first, 10)
    assert (await asyncio.wait_for(collect(second), 10)).finished is not None
    assert gate.preparing_now == 0


async def test_replies_that_end_without_a_model_request_are_not_left_preparing(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    gate = bot.service.requests_first
    await bot.ask("/help")  # a command: no model request at all
    assert gate.preparing_now == 0
    never_started = bot.service.handle(bot.message("hello"))
    assert gate.preparing_now == 1
    await never_started.aclose()  # closed before it was iterated (a shutdown)
    assert gate.preparing_now == 0
    fake.script(KEY_A, persistent=server_error())
    fake.script(KEY_B, persistent=server_error())
    assert (await bot.ask("fails")).failed is not None
    assert gate.preparing_now == 0
