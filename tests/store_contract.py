"""The behaviour every :class:`bot.store.Store` implementation must have.

A backend's test module subclasses :class:`StoreContract` and provides a ``store`` fixture
(opened, empty) and a ``clock`` fixture (a :class:`FakeClock` the store reads time from). The
contract's ``journal`` fixture journals an arrival where the bot's long-connection process does
(:mod:`bot.journal`, the file at the store's ``journal_path``); a backend that reads its
arrivals from elsewhere overrides it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.errors import StoreError
from bot.journal import ArrivalJournal
from bot.store import (
    HeldAttachment,
    InboxEntry,
    SentMessage,
    Store,
    StoredKey,
    Turn,
    TurnStatus,
    UsageRecord,
)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def turn(
    conversation: str,
    role: str,
    content: str,
    at: float = 0.0,
    *,
    tokens: int | None = None,
    status: TurnStatus = "complete",
) -> Turn:
    """A turn; its ``tokens`` default to the length of its content."""
    return Turn(
        conversation,
        role,  # type: ignore[arg-type]
        content,
        created_at=at,
        tokens=len(content) if tokens is None else tokens,
        status=status,
    )


def key(key_id: str, **changes: object) -> StoredKey:
    fields: dict[str, object] = {
        "key_id": key_id,
        "secret": f"sk-secret-{key_id}",
        "masked": f"sk-…{key_id[-4:]}",
        "owner": "alice",
        "source": "config",
        "created_at": 1.0,
    }
    fields.update(changes)
    return StoredKey(**fields)  # type: ignore[arg-type]


class StoreContract:
    """Tests shared by all store backends."""

    async def test_turns_round_trip_in_order_per_conversation(self, store: Store) -> None:
        await store.append_turn(turn("c1", "user", "hello", 1))
        await store.append_turn(turn("c2", "user", "other", 2))
        await store.append_turn(turn("c1", "assistant", "hi there", 3))
        await store.append_turn(turn("c1", "user", "你好", 4))
        loaded = await store.load_turns("c1")
        assert [(t.role, t.content) for t in loaded] == [
            ("user", "hello"),
            ("assistant", "hi there"),
            ("user", "你好"),
        ]
        assert loaded[0] == turn("c1", "user", "hello", 1)
        assert await store.load_turns("nobody") == []

    async def test_clearing_a_conversation_leaves_the_others(self, store: Store) -> None:
        await store.append_turn(turn("c1", "user", "a"))
        await store.append_turn(turn("c1", "assistant", "b"))
        await store.append_turn(turn("c2", "user", "c"))
        assert await store.clear_conversation("c1") == 2
        assert await store.load_turns("c1") == []
        assert len(await store.load_turns("c2")) == 1

    async def test_concurrent_writers_do_not_corrupt_or_lose_turns(self, store: Store) -> None:
        async def writer(name: str) -> None:
            for index in range(50):
                await store.append_turn(turn("shared", "user", f"{name}-{index}"))

        await asyncio.gather(writer("a"), writer("b"))
        contents = [t.content for t in await store.load_turns("shared")]
        assert len(contents) == 100
        for name in ("a", "b"):
            mine = [c for c in contents if c.startswith(f"{name}-")]
            assert mine == [f"{name}-{index}" for index in range(50)]

    async def test_mark_seen_is_true_only_the_first_time(self, store: Store) -> None:
        assert await store.mark_seen("msg:om_1", ttl_s=60) is True
        assert await store.mark_seen("msg:om_1", ttl_s=60) is False
        assert await store.is_seen("msg:om_1") is True
        assert await store.is_seen("msg:om_2") is False

    async def test_dedup_records_expire(self, store: Store, clock: FakeClock) -> None:
        await store.mark_seen("msg:om_1", ttl_s=60)
        clock.advance(59)
        assert await store.is_seen("msg:om_1") is True
        clock.advance(2)
        assert await store.is_seen("msg:om_1") is False
        assert await store.mark_seen("msg:om_1", ttl_s=60) is True

    async def test_purge_drops_only_expired_records(self, store: Store, clock: FakeClock) -> None:
        await store.mark_seen("old", ttl_s=10)
        await store.mark_seen("new", ttl_s=100)
        clock.advance(50)
        assert await store.purge_expired() == 1
        assert await store.is_seen("new") is True

    async def test_concurrent_marks_of_one_key_admit_exactly_one(self, store: Store) -> None:
        results = await asyncio.gather(*(store.mark_seen("msg:race", 60) for _ in range(20)))
        assert results.count(True) == 1

    async def test_inbox_keeps_pending_messages_until_removed(self, store: Store) -> None:
        await store.inbox_add(InboxEntry("om_2", "c1", '{"text": "second"}', received_at=2))
        await store.inbox_add(InboxEntry("om_1", "c1", '{"text": "first"}', received_at=1))
        await store.inbox_add(InboxEntry("om_1", "c1", "duplicate ignored", received_at=3))
        pending = await store.inbox_list()
        assert [(e.message_id, e.payload) for e in pending] == [
            ("om_1", '{"text": "first"}'),
            ("om_2", '{"text": "second"}'),
        ]
        await store.inbox_remove("om_1")
        await store.inbox_remove("om_unknown")
        assert [e.message_id for e in await store.inbox_list()] == ["om_2"]

    async def test_a_message_is_accepted_once_into_the_inbox(self, store: Store) -> None:
        entry = InboxEntry("om_9", "c1", "{}", received_at=1)
        results = await asyncio.gather(*(store.accept_message(entry, 3600) for _ in range(10)))
        assert results.count(True) == 1
        assert [e.message_id for e in await store.inbox_list()] == ["om_9"]
        await store.inbox_remove("om_9")
        assert await store.accept_message(entry, 3600) is False  # answered: never again
        assert await store.inbox_list() == []

    async def test_acceptance_expires_with_its_ttl(self, store: Store, clock: FakeClock) -> None:
        entry = InboxEntry("om_9", "c1", "{}", received_at=1)
        assert await store.accept_message(entry, 60) is True
        await store.inbox_remove("om_9")
        clock.advance(61)
        assert await store.accept_message(entry, 60) is True

    async def test_keys_round_trip_and_update_in_place(self, store: Store) -> None:
        await store.save_key(key("k1"))
        await store.save_key(key("k2", created_at=2.0, source="donated", owner="bob"))
        await store.save_key(
            key("k1", state="disabled", reason="invalid_api_key", disabled_by="auto", failures=3)
        )
        loaded = await store.load_keys()
        assert [k.key_id for k in loaded] == ["k1", "k2"]
        assert loaded[0].state == "disabled"
        assert loaded[0].reason == "invalid_api_key"
        assert loaded[0].failures == 3
        assert loaded[1] == key("k2", created_at=2.0, source="donated", owner="bob")
        assert await store.delete_key("k2") is True
        assert await store.delete_key("k2") is False

    async def test_stored_key_repr_never_shows_the_secret(self) -> None:
        assert "sk-secret" not in repr(key("k1"))

    async def test_usage_accumulates_per_day_user_and_key(self, store: Store) -> None:
        await store.add_usage("2026-11-25", "ou_1", "k1", 10, 5)
        await store.add_usage("2026-11-25", "ou_1", "k1", 3, 2)
        await store.add_usage("2026-11-25", "ou_2", "k1", 1, 1)
        await store.add_usage("2026-11-26", "ou_1", "k1", 1, 1)
        rows = await store.usage_for_day("2026-11-25")
        assert [(r.user_id, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
            ("ou_1", 2, 13, 7),
            ("ou_2", 1, 1, 1),
        ]

    # ---- history: cut answers, budgets, retention ---------------------------------------------

    async def test_turn_status_round_trips(self, store: Store) -> None:
        await store.append_turn(turn("c1", "user", "tell me a story", 1))
        await store.append_turn(turn("c1", "assistant", "Once upon a", 2, status="cut"))
        await store.complete_message([], [turn("c1", "assistant", "The end", 3)], None)
        loaded = await store.load_turns("c1")
        assert [(t.content, t.status) for t in loaded] == [
            ("tell me a story", "complete"),
            ("Once upon a", "cut"),
            ("The end", "complete"),
        ]
        assert await store.load_recent_turns("c1", 1000) == loaded

    async def test_load_recent_turns_reads_only_what_fits_the_budget_newest_first(
        self, store: Store
    ) -> None:
        await store.append_turn(turn("c1", "user", "oldest, small", 1, tokens=1))
        await store.append_turn(turn("c1", "assistant", "long answer", 2, tokens=10))
        await store.append_turn(turn("c2", "user", "another chat", 3, tokens=1))
        await store.append_turn(turn("c1", "user", "follow-up", 4, tokens=2))
        await store.append_turn(turn("c1", "assistant", "short answer", 5, tokens=3))

        def contents(turns: list[Turn]) -> list[str]:
            return [t.content for t in turns]

        assert contents(await store.load_recent_turns("c1", 16)) == [
            "oldest, small",
            "long answer",
            "follow-up",
            "short answer",
        ]
        assert contents(await store.load_recent_turns("c1", 15)) == [
            "long answer",
            "follow-up",
            "short answer",
        ]
        # The long answer does not fit: the scan ends there, the small turn before it is not
        # picked up, so the history sent never has a hole in it.
        assert contents(await store.load_recent_turns("c1", 14)) == [
            "follow-up",
            "short answer",
        ]
        assert await store.load_recent_turns("c1", 2) == []
        assert await store.load_recent_turns("c1", 0) == []
        assert await store.load_recent_turns("nobody", 1000) == []

    async def test_load_recent_turns_returns_a_long_history_whole_when_it_fits(
        self, store: Store
    ) -> None:
        history = [turn("c1", "user", f"message {index}", index, tokens=1) for index in range(120)]
        await store.complete_message([], history, None)
        assert await store.load_recent_turns("c1", 120) == history
        assert await store.load_recent_turns("c1", 75) == history[-75:]

    async def test_prune_turns_drops_only_older_turns(self, store: Store) -> None:
        await store.append_turn(turn("c1", "user", "old", 100))
        await store.append_turn(turn("c2", "user", "old too", 150))
        await store.append_turn(turn("c1", "assistant", "exactly at the limit", 200))
        await store.append_turn(turn("c2", "assistant", "new", 300))
        assert await store.prune_turns(older_than=200) == 2
        assert [t.content for t in await store.load_turns("c1")] == ["exactly at the limit"]
        assert [t.content for t in await store.load_turns("c2")] == ["new"]
        assert await store.prune_turns(older_than=200) == 0

    # ---- inbox: delivery record, rejected rows --------------------------------------------

    async def test_inbox_delivery_round_trips(self, store: Store) -> None:
        await store.accept_message(InboxEntry("om_1", "c1", "{}", received_at=1), 3600)
        await store.inbox_add(InboxEntry("om_2", "c1", "{}", received_at=2, delivery='{"a": 1}'))
        assert [e.delivery for e in await store.inbox_list()] == [None, '{"a": 1}']

        await store.inbox_set_delivery("om_1", '{"card": "om_card_1", "answer": "Hi"}')
        await store.inbox_set_delivery("om_2", None)
        await store.inbox_set_delivery("om_gone", '{"card": "x"}')
        pending = await store.inbox_list()
        assert [(e.message_id, e.delivery) for e in pending] == [
            ("om_1", '{"card": "om_card_1", "answer": "Hi"}'),
            ("om_2", None),
        ]

    async def test_inbox_reject_moves_the_row_aside(self, store: Store) -> None:
        await store.accept_message(InboxEntry("om_1", "c1", "not json", received_at=1), 3600)
        await store.accept_message(InboxEntry("om_2", "c1", "{}", received_at=2), 3600)
        await store.inbox_reject("om_1", "payload is not valid JSON")
        await store.inbox_reject("om_unknown", "never there")
        assert [e.message_id for e in await store.inbox_list()] == ["om_2"]
        # Set aside, not forgotten: a redelivery of the same message is still a duplicate.
        again = InboxEntry("om_1", "c1", "not json", received_at=3)
        assert await store.accept_message(again, 3600) is False
        assert [e.message_id for e in await store.inbox_list()] == ["om_2"]

    # ---- recording a delivered answer ----------------------------------------------------

    async def test_complete_message_saves_turns_and_usage_and_clears_the_inbox_atomically(
        self, store: Store
    ) -> None:
        for message_id, at in (("om_1", 1), ("om_2", 2), ("om_3", 3)):
            await store.accept_message(InboxEntry(message_id, "c1", "{}", received_at=at), 3600)
        await store.add_usage("2026-11-25", "ou_1", "k1", 10, 5)
        answer = [
            turn("c1", "user", "first part\nsecond part", 4),
            turn("c1", "assistant", "one answer to both", 5),
        ]
        usage = UsageRecord("2026-11-25", "ou_1", "k1", prompt_tokens=30, completion_tokens=8)

        await store.complete_message(["om_1", "om_2"], answer, usage)

        assert await store.load_turns("c1") == answer
        (row,) = await store.usage_for_day("2026-11-25")
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 40, 13)
        assert [e.message_id for e in await store.inbox_list()] == ["om_3"]

        await store.complete_message(["om_3", "om_gone"], [turn("c1", "user", "x", 6)], None)
        assert await store.inbox_list() == []
        assert len(await store.load_turns("c1")) == 3
        assert (await store.usage_for_day("2026-11-25"))[0].requests == 2

    async def test_complete_message_writes_nothing_when_it_fails(self, store: Store) -> None:
        await store.accept_message(InboxEntry("om_1", "c1", "{}", received_at=1), 3600)
        broken = [
            turn("c1", "user", "question", 2),
            turn("c1", "robot", "not a role any store accepts", 3),
        ]
        usage = UsageRecord("2026-11-25", "ou_1", "k1", prompt_tokens=30, completion_tokens=8)

        with pytest.raises(StoreError):
            await store.complete_message(["om_1"], broken, usage)

        assert await store.load_turns("c1") == []
        assert await store.usage_for_day("2026-11-25") == []
        assert [e.message_id for e in await store.inbox_list()] == ["om_1"]
        # The store is still usable: the next answer is recorded.
        await store.complete_message(["om_1"], broken[:1], usage)
        assert [t.content for t in await store.load_turns("c1")] == ["question"]
        assert await store.inbox_list() == []

    @pytest.fixture
    def journal(self, store: Any) -> Iterator[Callable[[str, str, float], None]]:
        """Journals ``(message_id, event, received_at)`` as the long-connection process does."""
        arrivals = ArrivalJournal.open(store.journal_path)

        def record(message_id: str, event: str, received_at: float) -> None:
            assert arrivals.record(message_id, event, received_at, timeout_s=5)

        yield record
        arrivals.close()

    async def test_a_journaled_arrival_is_listed_until_it_is_accepted(
        self, store: Store, journal: Callable[[str, str, float], None]
    ) -> None:
        journal("om_1", '{"event": 1}', 10.0)
        journal("om_2", '{"event": 2}', 11.0)
        assert await store.arrivals() == [("om_1", '{"event": 1}'), ("om_2", '{"event": 2}')]
        await store.accept_message(InboxEntry("om_1", "c1", "{}", 10.0), ttl_s=60)
        assert await store.arrivals() == [("om_2", '{"event": 2}')]

    async def test_arrivals_are_forgotten_by_id_and_by_age(
        self, store: Store, journal: Callable[[str, str, float], None]
    ) -> None:
        for number, at in ((1, 10.0), (2, 20.0), (3, 30.0)):
            journal(f"om_{number}", "{}", at)
        assert await store.forget_arrivals(["om_3"], before=15.0) == 2
        assert [message_id for message_id, _ in await store.arrivals()] == ["om_2"]

    async def test_a_duplicate_arrival_is_kept_once(
        self, store: Store, journal: Callable[[str, str, float], None]
    ) -> None:
        journal("om_1", "{}", 10.0)
        journal("om_1", "{}", 12.0)
        assert len(await store.arrivals()) == 1

    # ---- preferences ---------------------------------------------------------------------

    async def test_a_preference_is_set_replaced_and_deleted(self, store: Store) -> None:
        assert await store.get_preference("persona", "oc_chat_1") is None
        await store.set_preference("persona", "oc_chat_1", "You are a pirate.")
        assert await store.get_preference("persona", "oc_chat_1") == "You are a pirate."
        await store.set_preference("persona", "oc_chat_1", "You are a poet.")
        assert await store.get_preference("persona", "oc_chat_1") == "You are a poet."
        await store.set_preference("persona", "oc_chat_1", None)
        assert await store.get_preference("persona", "oc_chat_1") is None
        await store.set_preference("persona", "oc_never_set", None)  # deleting nothing is fine
        assert await store.preferences("persona") == {}

    async def test_preferences_are_listed_per_scope_and_scopes_are_independent(
        self, store: Store
    ) -> None:
        await store.set_preference("persona", "oc_chat_1", "You are a pirate.")
        await store.set_preference("persona", "oc_chat_2", "Answer in French.")
        await store.set_preference("model", "ou_1", "gpt-4o")
        await store.set_preference("model", "oc_chat_1", "gpt-4o-mini")  # same subject, other scope

        assert await store.preferences("persona") == {
            "oc_chat_1": "You are a pirate.",
            "oc_chat_2": "Answer in French.",
        }
        assert await store.preferences("model") == {"ou_1": "gpt-4o", "oc_chat_1": "gpt-4o-mini"}
        assert await store.preferences("nothing here") == {}

        await store.set_preference("model", "oc_chat_1", None)
        assert await store.get_preference("persona", "oc_chat_1") == "You are a pirate."
        assert await store.get_preference("model", "oc_chat_1") is None
        assert await store.get_preference("model", "ou_1") == "gpt-4o"

    # ---- the bot's sent messages ---------------------------------------------------------

    async def test_the_messages_an_answer_was_sent_as_are_found_by_id(self, store: Store) -> None:
        await store.accept_message(InboxEntry("om_q", "c1", "{}", received_at=1), 3600)
        answer = [turn("c1", "user", "question", 2), turn("c1", "assistant", "part 1 part 2", 3)]
        sent = [
            SentMessage("om_bot_1", "c1", "part 1", created_at=3),
            SentMessage("om_bot_2", "c1", "part 2", created_at=3),
        ]

        await store.complete_message(["om_q"], answer, None, sent)

        assert await store.find_sent("om_bot_1") == sent[0]
        assert await store.find_sent("om_bot_2") == sent[1]
        assert await store.load_turns("c1") == answer
        assert await store.inbox_list() == []

        # Recorded again under the same id (an edited card): the newer text replaces the older.
        edited = SentMessage("om_bot_2", "c1", "part 2, corrected", created_at=4)
        await store.complete_message([], [], None, sent=[edited])
        assert await store.find_sent("om_bot_2") == edited

    async def test_find_sent_of_an_unknown_message_is_none(self, store: Store) -> None:
        assert await store.find_sent("om_never_sent") is None
        await store.complete_message([], [turn("c1", "user", "no answer sent yet", 1)], None)
        assert await store.find_sent("om_never_sent") is None

    async def test_complete_message_with_sent_messages_writes_nothing_when_it_fails(
        self, store: Store
    ) -> None:
        await store.accept_message(InboxEntry("om_1", "c1", "{}", received_at=1), 3600)
        broken = [
            turn("c1", "user", "question", 2),
            turn("c1", "robot", "not a role any store accepts", 3),
        ]
        usage = UsageRecord("2026-11-25", "ou_1", "k1", prompt_tokens=30, completion_tokens=8)
        sent = [SentMessage("om_bot_1", "c1", "the answer", created_at=3)]

        with pytest.raises(StoreError):
            await store.complete_message(["om_1"], broken, usage, sent)

        assert await store.find_sent("om_bot_1") is None
        assert await store.load_turns("c1") == []
        assert await store.usage_for_day("2026-11-25") == []
        assert [e.message_id for e in await store.inbox_list()] == ["om_1"]

        # A sent message no store accepts (it has no text) undoes the valid turns too.
        textless = SentMessage("om_bot_2", "c1", None, created_at=3)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            await store.complete_message(["om_1"], broken[:1], usage, [*sent, textless])

        assert await store.find_sent("om_bot_1") is None
        assert await store.load_turns("c1") == []
        assert await store.usage_for_day("2026-11-25") == []
        assert [e.message_id for e in await store.inbox_list()] == ["om_1"]

        await store.complete_message(["om_1"], broken[:1], usage, sent)
        assert await store.find_sent("om_bot_1") == sent[0]
        assert await store.inbox_list() == []

    async def test_prune_turns_also_drops_older_sent_messages_but_counts_only_turns(
        self, store: Store
    ) -> None:
        await store.complete_message(
            [],
            [turn("c1", "user", "old question", 100), turn("c1", "assistant", "old answer", 101)],
            None,
            [
                SentMessage("om_old", "c1", "old answer", created_at=101),
                SentMessage("om_older", "c2", "answer of another chat", created_at=50),
            ],
        )
        await store.complete_message(
            [],
            [turn("c1", "assistant", "new answer", 300)],
            None,
            [
                SentMessage("om_at_limit", "c1", "exactly at the limit", created_at=200),
                SentMessage("om_new", "c1", "new answer", created_at=300),
            ],
        )

        assert await store.prune_turns(older_than=200) == 2

        assert await store.find_sent("om_old") is None
        assert await store.find_sent("om_older") is None
        assert await store.find_sent("om_at_limit") is not None
        assert await store.find_sent("om_new") is not None
        assert [t.content for t in await store.load_turns("c1")] == ["new answer"]

    async def test_clearing_a_conversation_keeps_its_sent_messages(self, store: Store) -> None:
        sent = SentMessage("om_bot_1", "c1", "an answer worth quoting", created_at=2)
        await store.complete_message(
            [], [turn("c1", "assistant", "an answer worth quoting", 2)], None, [sent]
        )

        assert await store.clear_conversation("c1") == 1

        assert await store.load_turns("c1") == []
        assert await store.find_sent("om_bot_1") == sent  # a user may still quote it

    # ---- usage over a range of days ------------------------------------------------------

    async def test_usage_between_includes_both_bounds_across_a_month_boundary(
        self, store: Store
    ) -> None:
        for day in ("2026-10-29", "2026-11-02", "2026-10-31", "2026-11-01", "2026-11-03"):
            await store.add_usage(day, "ou_1", "k1", 10, 1)

        rows = await store.usage_between("2026-10-30", "2026-11-02")

        assert [r.day for r in rows] == ["2026-10-31", "2026-11-01", "2026-11-02"]
        assert [r.day for r in await store.usage_between("2026-11-01", "2026-11-01")] == [
            "2026-11-01"
        ]
        assert await store.usage_between("2026-12-01", "2026-12-31") == []

    async def test_usage_between_filters_by_user_and_orders_by_day_user_and_key(
        self, store: Store
    ) -> None:
        await store.add_usage("2026-11-02", "ou_2", "k1", 1, 1)
        await store.add_usage("2026-11-01", "ou_2", "k2", 2, 2)
        await store.add_usage("2026-11-01", "ou_1", "k2", 3, 3)
        await store.add_usage("2026-11-01", "ou_1", "k1", 4, 4)
        await store.add_usage("2026-11-01", "ou_1", "k1", 5, 5)
        await store.add_usage("2026-10-31", "ou_1", "k1", 6, 6)

        rows = await store.usage_between("2026-11-01", "2026-11-30")
        assert [(r.day, r.user_id, r.key_id, r.requests, r.prompt_tokens) for r in rows] == [
            ("2026-11-01", "ou_1", "k1", 2, 9),
            ("2026-11-01", "ou_1", "k2", 1, 3),
            ("2026-11-01", "ou_2", "k2", 1, 2),
            ("2026-11-02", "ou_2", "k1", 1, 1),
        ]

        mine = await store.usage_between("2026-10-01", "2026-11-30", user_id="ou_1")
        assert [(r.day, r.key_id) for r in mine] == [
            ("2026-10-31", "k1"),
            ("2026-11-01", "k1"),
            ("2026-11-01", "k2"),
        ]
        assert await store.usage_between("2026-10-01", "2026-11-30", user_id="ou_9") == []

    async def test_images_drawn_are_counted_with_the_usage_row(self, store: Store) -> None:
        await store.add_usage("2026-11-01", "ou_1", "k1", 0, 0, images=1)
        drawn = UsageRecord("2026-11-01", "ou_1", "k1", 0, 0, images=1)
        await store.complete_message([], [], drawn)
        await store.add_usage("2026-11-01", "ou_1", "k1", 10, 5)

        (row,) = await store.usage_for_day("2026-11-01")
        assert (row.requests, row.prompt_tokens, row.images) == (3, 10, 2)

    async def test_a_held_attachment_is_listed_for_its_holder_until_an_answer_releases_it(
        self, store: Store
    ) -> None:
        image = HeldAttachment("p2p:ou_1", "image", "image", "image/png", b"\x89PNG", 100.0)
        notes = HeldAttachment("p2p:ou_1", "file", "notes.md", "text/plain", b"# hi", 101.0)
        other = HeldAttachment("p2p:ou_2", "image", "image", "image/png", b"x", 100.0)
        first = await store.hold_attachment(image)
        second = await store.hold_attachment(notes)
        await store.hold_attachment(other)

        held = await store.held_attachments("p2p:ou_1", since=0)
        assert [(h.attachment_id, h.name, h.content) for h in held] == [
            (first, "image", b"\x89PNG"),
            (second, "notes.md", b"# hi"),
        ]
        assert [h.name for h in await store.held_attachments("p2p:ou_1", since=101)] == ["notes.md"]

        await store.accept_message(InboxEntry("om_1", "c1", "{}", received_at=1), 3600)
        await store.complete_message(
            ["om_1"], [turn("c1", "user", "[image] what?", 2)], None, release=[first]
        )
        assert [h.name for h in await store.held_attachments("p2p:ou_1", since=0)] == ["notes.md"]
        assert len(await store.held_attachments("p2p:ou_2", since=0)) == 1

    async def test_held_attachments_older_than_the_hold_are_dropped(self, store: Store) -> None:
        await store.hold_attachment(HeldAttachment("h", "image", "a", "image/png", b"a", 10.0))
        await store.hold_attachment(HeldAttachment("h", "image", "b", "image/png", b"b", 20.0))

        assert await store.drop_held(before=15.0) == 1
        assert [h.name for h in await store.held_attachments("h", since=0)] == ["b"]

    async def test_a_failed_answer_releases_no_attachment(self, store: Store) -> None:
        held = await store.hold_attachment(HeldAttachment("h", "image", "a", "image/png", b"a", 1))
        broken = [turn("c1", "robot", "not a role any store accepts", 3)]

        with pytest.raises(StoreError):
            await store.complete_message([], broken, None, release=[held])

        assert len(await store.held_attachments("h", since=0)) == 1
