"""Building the prompt: system prompt, persona examples, the newest history that fits, the message.

Also fits a quoted message into what is left of the token budget (:func:`fit_tokens`) and shapes
it as context for the current message (:func:`with_quote`).
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.chat.tokens import estimate_message_tokens, estimate_tokens
from bot.llm.events import ChatMessage
from bot.store import Turn

QUOTE_HEADER = "(Replying to this message:)"


def build_prompt(
    system_prompt: str,
    history: Sequence[Turn],
    current: str,
    budget_tokens: int,
    *,
    examples: Sequence[tuple[str, str]] = (),
    images: Sequence[str] = (),
) -> list[ChatMessage]:
    """The messages to send: system prompt, examples, trimmed history, the current message.

    Everything is fitted into ``budget_tokens`` (estimated). The system prompt and the current
    message are always kept, even when they alone exceed it (the caller refuses oversized input
    beforehand). History goes first, oldest turns first, in whole user→assistant exchanges where
    possible, so the model never sees an answer without its question. The persona's few-shot
    ``examples`` travel as prior user/assistant turns right after the system prompt; they are
    trimmed only once no history is left, the last pair first. ``images`` (``data:`` URLs) go
    with the current message; the caller takes their cost off the budget.
    """
    remaining = budget_tokens - estimate_message_tokens(system_prompt)
    remaining -= estimate_message_tokens(current)
    pairs = list(examples)
    while pairs and _pairs_cost(pairs) > remaining:
        pairs.pop()
    remaining -= _pairs_cost(pairs)
    kept: list[Turn] = []
    for turn in reversed(history):
        cost = turn.tokens or estimate_message_tokens(turn.content)
        if cost > remaining:
            break
        kept.append(turn)
        remaining -= cost
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)  # an answer whose question was trimmed away
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    for question, answer in pairs:
        messages += [ChatMessage("user", question), ChatMessage("assistant", answer)]
    messages += [ChatMessage(turn.role, turn.content) for turn in kept]
    messages.append(ChatMessage("user", current, tuple(images)))
    return messages


def _pairs_cost(pairs: Sequence[tuple[str, str]]) -> int:
    return sum(estimate_message_tokens(q) + estimate_message_tokens(a) for q, a in pairs)


def fit_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut (at a character) to at most ``max_tokens`` estimated tokens, with "…" when
    it was cut; and whether it was."""
    if estimate_tokens(text) <= max_tokens:
        return text, False
    if max_tokens <= 1:
        return "", True
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if estimate_tokens(text[:middle]) + 1 <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…", True


def with_quote(quote: str, text: str) -> str:
    """The current message as the model reads it when it replies to ``quote``."""
    quoted = "\n".join(f"> {line}" if line else ">" for line in quote.splitlines())
    return f"{QUOTE_HEADER}\n{quoted}\n\n{text}"
