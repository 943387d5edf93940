"""Prompt building and the offline token estimator."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bot.chat.commands import CommandName, parse_command
from bot.chat.history import build_prompt
from bot.chat.tokens import MESSAGE_OVERHEAD, estimate_message_tokens, estimate_tokens
from bot.store import Turn


def turn(role: str, content: str) -> Turn:
    return Turn("c", role, content, 0.0, estimate_message_tokens(content))  # type: ignore[arg-type]


def test_estimator_counts_cjk_characters_words_and_punctuation() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello world") == 2
    assert estimate_tokens("你好世界") == 5  # 4 × 1.1, rounded up
    assert estimate_tokens("internationalization") == 3  # long words cost more
    assert estimate_message_tokens("hi") == 1 + MESSAGE_OVERHEAD


@given(st.text(), st.text())
def test_estimate_is_never_negative_and_grows_with_text(first: str, second: str) -> None:
    assert estimate_tokens(first) >= 0
    assert estimate_tokens(first + " " + second) >= estimate_tokens(first)


def test_prompt_is_system_history_then_the_current_message() -> None:
    history = [turn("user", "q1"), turn("assistant", "a1")]
    prompt = build_prompt("be brief", history, "q2", budget_tokens=1000)
    assert [(m.role, m.content) for m in prompt] == [
        ("system", "be brief"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]


def test_trimming_drops_the_oldest_turns_first_and_never_an_orphan_answer() -> None:
    history: list[Turn] = []
    for index in range(10):
        history += [turn("user", f"question {index} " * 5), turn("assistant", f"answer {index}")]
    prompt = build_prompt("sys", history, "now", budget_tokens=80)
    contents = [m.content for m in prompt]
    assert contents[-1] == "now"
    assert prompt[1].role == "user"
    assert "answer 9" in contents
    assert not any(c.startswith("question 0") for c in contents)
    assert sum(estimate_message_tokens(c) for c in contents) <= 80


def test_the_current_message_is_kept_even_when_nothing_else_fits() -> None:
    prompt = build_prompt("sys", [turn("user", "old")], "x " * 500, budget_tokens=10)
    assert [m.role for m in prompt] == ["system", "user"]


@given(
    st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=80)), max_size=30),
    st.integers(min_value=20, max_value=400),
)
def test_trimmed_prompt_is_a_suffix_of_history_within_budget(
    turns: list[tuple[str, str]], budget: int
) -> None:
    history = [turn(role, content) for role, content in turns]
    prompt = build_prompt("sys", history, "now", budget_tokens=budget)
    middle = [(m.role, m.content) for m in prompt[1:-1]]
    assert middle == [(t.role, t.content) for t in history[len(history) - len(middle) :]]
    if middle:
        assert middle[0][0] == "user"
        assert sum(estimate_message_tokens(m.content) for m in prompt) <= budget


def test_commands_and_their_aliases_are_recognised() -> None:
    assert parse_command("  /RESET  ").name is CommandName.RESET  # type: ignore[union-attr]
    assert parse_command("/重置").name is CommandName.RESET  # type: ignore[union-attr]
    assert parse_command("/help me").argument == "me"  # type: ignore[union-attr]
    assert parse_command("/nope").name is None  # type: ignore[union-attr]
    assert parse_command("hello /reset") is None
    assert parse_command("/usr/bin/env") is None
    assert parse_command("/") is None
