"""The bot's Prometheus metrics, in one object passed to where things happen.

Each :class:`Metrics` has its own ``CollectorRegistry``, never the global one: tests build as many
as they like, and a component built without one (``Metrics()``, the default everywhere) counts
into a private registry nobody scrapes. Counters and histograms are updated as things happen
(the gateway, the answer jobs, the replier, the LLM client); the gauges that describe state held
elsewhere (keys by state, inbox depth) are set just before a scrape by :mod:`bot.ops.http`.
prometheus-client is thread-safe, so the Feishu SDK's threads may count too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX: Final = "feishu_gpt_bot_"

#: how the answer to an accepted message ended, as the answer job saw it
AnswerOutcome = Literal[
    "complete",  # an answer of the model, delivered whole
    "interrupted",  # an answer of the model that stopped early (length, filter, broken stream)
    "failed",  # an apology: no key, the model failed, the message too long, a quota reached
    "command",  # a command reply or another fixed text of the service (help, /key …)
    "notice",  # a fixed text of the transport (unsupported message type, too late to answer)
    "redelivered",  # an answer of an earlier run, delivered after a restart
    "refused",  # the sender is not in access.allow (told once a day)
    "ignored",  # the sender is not in access.allow and was told today already
    "undeliverable",  # Feishu will never take it (the question was recalled)
]
ANSWER_OUTCOMES: Final = get_args(AnswerOutcome)
KEY_STATES: Final = ("active", "cooling", "disabled")
#: seconds; answers take from well under a second to minutes
LATENCY_BUCKETS: Final = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every metric of the bot (names start with :data:`PREFIX`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_received = Counter(
            PREFIX + "messages_received",
            "Messages accepted from Feishu (each message once, duplicates not counted).",
            registry=r,
        )
        self.messages_answered = Counter(
            PREFIX + "messages_answered",
            "Accepted messages whose answer job ended, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.answer_seconds = Histogram(
            PREFIX + "answer_seconds",
            "Answers of the model: seconds from accepting the message to the delivered answer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_text_seconds = Histogram(
            PREFIX + "first_text_seconds",
            "Answers of the model: seconds from accepting the message to its first text "
            "visible in Feishu.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_calls = Counter(
            PREFIX + "llm_calls",
            "Requests to the LLM endpoint (each attempt), by key id and outcome.",
            ["key_id", "outcome"],
            registry=r,
        )
        self.keys = Gauge(PREFIX + "keys", "API keys of the pool, by state.", ["state"], registry=r)
        self.inbox_messages = Gauge(
            PREFIX + "inbox_messages",
            "Accepted messages whose answer is not delivered yet (the store's inbox).",
            registry=r,
        )
        self.feishu_reconnects = Counter(
            PREFIX + "feishu_reconnects",
            "Times the long connection to Feishu was lost and reconnecting began.",
            registry=r,
        )
        self.feishu_connected = Gauge(
            PREFIX + "feishu_connected",
            "1 while the long connection to Feishu is up, else 0.",
            registry=r,
        )
        for outcome in ANSWER_OUTCOMES:  # every outcome shows, at 0 until it happens
            self.messages_answered.labels(outcome=outcome)
        for state in KEY_STATES:
            self.keys.labels(state=state)

    # ---- as things happen ----------------------------------------------------------------

    def message_received(self) -> None:
        """A message was accepted."""
        self.messages_received.inc()

    def message_answered(
        self, outcome: AnswerOutcome, *, messages: int = 1, seconds: float | None = None
    ) -> None:
        """An answer job ended (``messages``: how many accepted messages it answered);
        ``seconds`` from acceptance to delivery, for answers of the model."""
        self.messages_answered.labels(outcome=outcome).inc(messages)
        if seconds is not None:
            self.answer_seconds.observe(max(0.0, seconds))

    def first_text(self, seconds: float) -> None:
        """The first text of an answer of the model became visible."""
        self.first_text_seconds.observe(max(0.0, seconds))

    def llm_call(self, key_id: str, outcome: str) -> None:
        """One attempt at the LLM endpoint ended (see :data:`bot.llm.client.CallOutcome`)."""
        self.llm_calls.labels(key_id=key_id, outcome=outcome).inc()

    def connection_up(self, up: bool) -> None:
        """The long connection to Feishu came up (or back) or went down."""
        self.feishu_connected.set(1 if up else 0)

    def connection_lost(self) -> None:
        """The long connection dropped and the SDK began to reconnect."""
        self.feishu_reconnects.inc()
        self.feishu_connected.set(0)

    # ---- at scrape time ------------------------------------------------------------------

    def set_key_states(self, states: Iterable[str]) -> None:
        """How many keys are in each state (every state is set, 0 when none is)."""
        counts = dict.fromkeys(KEY_STATES, 0)
        for state in states:
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            self.keys.labels(state=state).set(count)

    def set_inbox_depth(self, messages: int) -> None:
        """How many accepted messages await their answer."""
        self.inbox_messages.set(messages)

    def render(self) -> bytes:
        """Everything, in the Prometheus text exposition format."""
        return generate_latest(self.registry)
