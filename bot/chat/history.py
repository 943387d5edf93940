"""Building the prompt from history: system prompt + the newest turns that fit the token budget."""

from __future__ import annotations

from collections.abc import Sequence

from bot.chat.tokens import estimate_message_tokens
from bot.llm.events import ChatMessage
from bot.store import Turn


def build_prompt(
    system_prompt: str,
    history: Sequence[Turn],
    current: str,
    budget_tokens: int,
) -> list[ChatMessage]:
    """The messages to send: system prompt, trimmed history, the current user message.

    History is trimmed oldest first so that everything fits ``budget_tokens`` (estimated); the
    system prompt and the current message are always kept, even when they alone exceed it (the
    caller refuses oversized input beforehand). Turns are dropped in whole user→assistant
    exchanges where possible, so the model never sees an answer without its question.
    """
    fixed = estimate_message_tokens(system_prompt) + estimate_message_tokens(current)
    remaining = budget_tokens - fixed
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
    messages += [ChatMessage(turn.role, turn.content) for turn in kept]
    messages.append(ChatMessage("user", current))
    return messages
