"""Prompt building and the offline token estimator."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bot.chat.commands import CommandName, parse_command
from bot.chat.history import QUOTE_HEADER, build_prompt, fit_tokens, with_quote
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


def _estimate_by_the_rules(text: str) -> int:
    """The estimator's documented rules, applied one character at a time (the specification)."""
    cjk_ranges = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF))
    cjk_ranges += ((0xF900, 0xFAFF),)
    tenths, run_kind, run = 0, "", 0

    def end_run() -> int:
        if run_kind == "word":
            return 10 * -(-run // 7)
        return 10 * -(-run // 3) if run_kind == "digits" else 0

    for char in text:
        kind = (
            "word"
            if char.isascii() and char.isalpha()
            else "digits"
            if char in "0123456789"
            else ""
        )
        if kind != run_kind:
            tenths += end_run()
            run_kind, run = kind, 0
        run += 1
        if kind:
            continue
        if any(low <= ord(char) <= high for low, high in cjk_ranges):
            tenths += 11
        elif char == "\n":
            tenths += 5
        elif not char.isspace():
            tenths += 6
    tenths += end_run()
    return -(-tenths // 10)


@given(st.text(alphabet=st.characters(codec="utf-8")) | st.text("ab9 \n.中あ한é😀" * 3))
def test_estimate_follows_its_documented_rules(text: str) -> None:
    assert estimate_tokens(text) == _estimate_by_the_rules(text)


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


def test_commands_have_chinese_aliases() -> None:
    for word, name in [
        ("/角色 teacher", CommandName.ROLE),
        ("/模型", CommandName.MODEL),
        ("/历史", CommandName.HISTORY),
        ("/用量", CommandName.USAGE),
        ("/帮助", CommandName.HELP),
        ("/Persona", CommandName.ROLE),
    ]:
        command = parse_command(word)
        assert command is not None
        assert command.name is name


def test_examples_follow_the_system_prompt_as_turns() -> None:
    history = [turn("user", "q1"), turn("assistant", "a1")]
    prompt = build_prompt("sys", history, "q2", 1000, examples=[("eq", "ea")])
    assert [(m.role, m.content) for m in prompt] == [
        ("system", "sys"),
        ("user", "eq"),
        ("assistant", "ea"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]


@given(
    st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=80)), max_size=20),
    st.lists(st.tuples(st.text(max_size=60), st.text(max_size=60)), max_size=4),
    st.integers(min_value=20, max_value=400),
)
def test_history_is_trimmed_before_any_example(
    turns: list[tuple[str, str]], examples: list[tuple[str, str]], budget: int
) -> None:
    history = [turn(role, content) for role, content in turns]
    prompt = build_prompt("sys", history, "now", budget, examples=examples)
    assert prompt[0].content == "sys"
    assert prompt[-1].content == "now"
    if len(prompt) - 2 > 2 * len(examples):  # some history made it: then every example did
        assert [m.content for m in prompt[1 : 1 + 2 * len(examples)]] == [
            part for pair in examples for part in pair
        ]
    if estimate_message_tokens("sys") + estimate_message_tokens("now") <= budget:
        assert sum(estimate_message_tokens(m.content) for m in prompt) <= budget


def test_fit_tokens_cuts_at_a_character_with_an_ellipsis() -> None:
    assert fit_tokens("short", 10) == ("short", False)
    text, cut = fit_tokens("word " * 100, 10)
    assert cut
    assert text.endswith("…")
    assert estimate_tokens(text) <= 10
    assert fit_tokens("anything at all", 1) == ("", True)


def test_a_quote_is_shown_as_a_quoted_block_before_the_question() -> None:
    assert with_quote("line one\n\nline three", "why?") == (
        f"{QUOTE_HEADER}\n> line one\n>\n> line three\n\nwhy?"
    )
