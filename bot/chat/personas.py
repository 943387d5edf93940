"""Personas: a system prompt with few-shot examples, chosen per conversation with ``/role``.

Four personas are built in (:data:`BUILT_IN_PERSONAS`); ``chat.personas`` in the settings adds
more, replaces a built-in of the same name, or disables one (``name: null``). The ``default``
persona is ``chat.system_prompt`` without examples; ``chat.group_personas`` gives a group chat
another default. A conversation's choice (a persona's name, or a custom system prompt) is kept
in the store's preferences, so it survives ``/reset`` and restarts; a name that is no longer
configured falls back to the conversation's default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from bot.config import ChatSettings, PersonaSettings
from bot.llm.events import ChatMessage
from bot.logging import get_logger
from bot.store import Store

log = get_logger(__name__)

DEFAULT_NAME = "default"
CUSTOM_NAME = "custom"
#: the store preference scope holding each conversation's persona choice
PREFERENCE_SCOPE = "persona"

BUILT_IN_PERSONAS: Mapping[str, PersonaSettings] = {
    "engineer": PersonaSettings(
        description="a concise senior engineer: the answer first, code over prose",
        system=(
            "You are a senior software engineer helping a colleague. Lead with the answer, then "
            "only the essentials. Prefer a short code example to a long explanation, state your "
            "assumptions, and say plainly when you are not sure. Answer in the user's language."
        ),
        examples=[
            (
                "How do I reverse a list in Python?",
                "`items.reverse()` reverses it in place; `items[::-1]` returns a reversed copy.",
            ),
        ],
    ),
    "teacher": PersonaSettings(
        description="a patient teacher: step by step, with simple examples",
        system=(
            "You are a patient, encouraging teacher. Explain step by step in plain words, use a "
            "small concrete example for every new idea, avoid jargon or explain it, and end "
            "with one short question that checks understanding. Answer in the user's language."
        ),
        examples=[
            (
                "What is a prime number?",
                "A prime number is a whole number above 1 that only 1 and itself divide "
                "evenly.\n\n- 7 is prime: nothing but 1 and 7 divides it.\n- 8 is not: 2 and 4 "
                "divide it too.\n\nQuick check: is 9 prime?",
            ),
        ],
    ),
    "friend": PersonaSettings(
        description="a cheerful friend: warm, casual and short",
        system=(
            "You are the user's cheerful, kind friend. Be warm and casual, keep answers short, "
            "encourage without flattering, and use an emoji now and then, never more than one "
            "per message. Answer in the user's language."
        ),
        examples=[
            (
                "I finally finished my thesis draft!",
                "That's huge, congratulations! 🎉 Take the evening off, you earned it.",
            ),
        ],
        temperature=0.9,
    ),
    "translator": PersonaSettings(
        description="a zh↔en translator: Chinese to English, anything else to Chinese",
        system=(
            "You are a professional translator. Translate Chinese into natural English, and "
            "any other language into natural Simplified Chinese. Reply with the translation "
            "only: no explanations, no quotes, keep the formatting, keep code and names as "
            "they are."
        ),
        examples=[
            ("今天的会议改到下午三点。", "Today's meeting has been moved to 3 p.m."),
            (
                "Could you review my pull request when you have a moment?",
                "你有空的时候能帮我看一下这个合并请求吗？",
            ),
        ],
        temperature=0.3,
    ),
}


@dataclass(frozen=True)
class Persona:
    """A system prompt with few-shot examples and optional model and temperature."""

    name: str
    description: str
    system: str
    examples: tuple[tuple[str, str], ...] = ()
    temperature: float | None = None
    model: str | None = None

    @classmethod
    def from_settings(cls, name: str, settings: PersonaSettings) -> Persona:
        """The persona ``name`` as configured."""
        return cls(
            name=name,
            description=settings.description,
            system=settings.system,
            examples=tuple(settings.examples),
            temperature=settings.temperature,
            model=settings.model,
        )

    def example_messages(self) -> list[ChatMessage]:
        """The examples as prior ``user``/``assistant`` turns, in order."""
        messages: list[ChatMessage] = []
        for question, answer in self.examples:
            messages += [ChatMessage("user", question), ChatMessage("assistant", answer)]
        return messages


def configured_personas(chat: ChatSettings) -> dict[str, Persona]:
    """The named personas in effect: built-ins overridden or disabled by ``chat.personas``."""
    overrides = {name.lower(): (name, value) for name, value in chat.personas.items()}
    personas: dict[str, Persona] = {}
    for name, settings in BUILT_IN_PERSONAS.items():
        if name in overrides:
            continue
        personas[name] = Persona.from_settings(name, settings)
    for key, (name, value) in overrides.items():
        if value is not None:
            personas[key] = Persona.from_settings(name, value)
    return personas


def persona_names(chat: ChatSettings) -> set[str]:
    """The lower-case names of the personas in effect (for validating settings)."""
    return set(configured_personas(chat))


class PersonaBook:
    """The personas in effect and each conversation's choice among them."""

    def __init__(self, chat: ChatSettings, store: Store) -> None:
        self._store = store
        self._named = configured_personas(chat)
        self.default = Persona(DEFAULT_NAME, "the bot's usual self", chat.system_prompt)
        self._group_defaults = {
            chat_id: self.named(name) or self.default
            for chat_id, name in chat.group_personas.items()
        }

    def all(self) -> list[Persona]:
        """Every named persona, in settings order (built-ins first)."""
        return list(self._named.values())

    def named(self, name: str) -> Persona | None:
        """The persona called ``name`` (any case; ``default`` too), or None."""
        key = name.strip().lower()
        if key in (DEFAULT_NAME, "默认"):
            return self.default
        return self._named.get(key)

    def default_for(self, chat_id: str) -> Persona:
        """The persona a conversation of ``chat_id`` starts with."""
        return self._group_defaults.get(chat_id, self.default)

    @staticmethod
    def custom(system: str) -> Persona:
        """An ad-hoc persona from a user's own system prompt."""
        return Persona(CUSTOM_NAME, "your own system prompt", system.strip())

    async def current(self, conversation_id: str, chat_id: str) -> Persona:
        """The persona of a conversation: its choice, else its chat's default."""
        stored = await self._store.get_preference(PREFERENCE_SCOPE, conversation_id)
        if stored is not None:
            persona = self._from_preference(stored)
            if persona is not None:
                return persona
            log.info("persona_choice_outdated", conversation=conversation_id)
        return self.default_for(chat_id)

    async def choose(self, conversation_id: str, persona: Persona | None) -> None:
        """Keep ``persona`` for the conversation; None returns it to its chat's default."""
        if persona is None:
            await self._store.set_preference(PREFERENCE_SCOPE, conversation_id, None)
            return
        if persona.name == CUSTOM_NAME:
            value = {"custom": persona.system}
        else:
            value = {"name": persona.name}
        await self._store.set_preference(
            PREFERENCE_SCOPE, conversation_id, json.dumps(value, ensure_ascii=False)
        )

    def _from_preference(self, stored: str) -> Persona | None:
        try:
            value = json.loads(stored)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        custom = value.get("custom")
        if isinstance(custom, str) and custom.strip():
            return self.custom(custom)
        name = value.get("name")
        return self.named(name) if isinstance(name, str) else None
