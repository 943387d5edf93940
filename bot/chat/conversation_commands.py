"""``/role``, ``/model``, ``/history`` and ``/usage``: a conversation's settings and figures.

Each command answers with plain text. The persona is chosen per conversation (switching clears
the conversation, since the old answers were written by another persona), the model per user
(among ``llm.model`` and ``llm.models``; kept in the store's preferences).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from bot.chat.access import AccessControl, day_of, month_start, totals
from bot.chat.personas import CUSTOM_NAME, Persona, PersonaBook
from bot.chat.tokens import estimate_message_tokens
from bot.logging import get_logger
from bot.store import Store, Usage
from bot.timing import Clock

log = get_logger(__name__)

#: the store preference scope holding each user's model choice
MODEL_SCOPE = "model"
#: users listed by name in an admin's /usage; the rest are summed up
_TOP_USERS = 10


@dataclass(frozen=True)
class Asker:
    """Who sent a command, and from where."""

    conversation_id: str
    chat_id: str
    user_id: str
    user_ids: tuple[str, ...] = ()

    @property
    def all_ids(self) -> list[str]:
        return [self.user_id, *self.user_ids]


class ConversationCommands:
    """Answers the commands about personas, models, history and usage."""

    def __init__(
        self,
        store: Store,
        personas: PersonaBook,
        models: Sequence[str],
        access: AccessControl,
        *,
        history_budget: int,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._personas = personas
        self._models = list(dict.fromkeys(models))  # the default model first
        self._default_model = self._models[0] if self._models else ""
        self._access = access
        self._history_budget = history_budget
        self._clock = clock

    # ---- /role -------------------------------------------------------------------------------

    async def role(self, asker: Asker, argument: str) -> str:
        """List the personas, or switch this conversation's persona (clearing its history)."""
        current = await self._personas.current(asker.conversation_id, asker.chat_id)
        word, _, rest = argument.partition(" ")
        if not word:
            return self._persona_list(current.name)
        if word.lower() in (CUSTOM_NAME, "自定义"):
            if not rest.strip():
                return "Usage: /role custom <system prompt>, e.g. /role custom You are a poet."
            await self._switch(asker, self._personas.custom(rest))
            return (
                "Done: I follow your own system prompt in this conversation from now on, and "
                "I forgot our earlier messages. /role default goes back."
            )
        named = self._personas.named(argument)
        if named is None:
            return f"There is no persona called {argument!r}.\n\n{self._persona_list(current.name)}"
        persona = named
        if named is self._personas.default:
            await self._switch(asker, None)
            persona = self._personas.default_for(asker.chat_id)
        else:
            await self._switch(asker, persona)
        return (
            f"Done: I am {persona.name} ({persona.description}) in this conversation now, and "
            "I forgot our earlier messages."
        )

    async def _switch(self, asker: Asker, persona: Persona | None) -> None:
        await self._personas.choose(asker.conversation_id, persona)
        removed = await self._store.clear_conversation(asker.conversation_id)
        log.info(
            "persona_switched",
            conversation=asker.conversation_id,
            persona=persona.name if persona is not None else "default",
            turns=removed,
        )

    def _persona_list(self, current: str) -> str:
        lines = ["Personas (/role <name> switches this conversation, clearing it):"]
        default = self._personas.default
        everyone = [default, *self._personas.all()]
        for persona in everyone:
            mark = " ← current" if persona.name.lower() == current.lower() else ""
            lines.append(f"- {persona.name}: {persona.description}{mark}")
        if current == CUSTOM_NAME:
            lines.append("- custom: your own system prompt ← current")
        lines.append("/role custom <system prompt> sets your own; /role default goes back.")
        return "\n".join(lines)

    # ---- /model ------------------------------------------------------------------------------

    async def chosen_model(self, user_id: str) -> str | None:
        """The model the user chose, if it is still allowed."""
        choice = await self._store.get_preference(MODEL_SCOPE, user_id)
        return choice if choice in self._models else None

    async def model(self, asker: Asker, argument: str) -> str:
        """List the models, or choose the user's model."""
        chosen = await self.chosen_model(asker.user_id)
        if not argument:
            if len(self._models) <= 1:
                using = self._models[0] if self._models else "the endpoint's default model"
                return f"I use {using}; the bot's owner configured no other model."
            current = chosen or self._default_model
            lines = ["Models (/model <name> chooses yours):"]
            for name in self._models:
                mark = " ← yours" if name == current else ""
                default = " (default)" if name == self._default_model else ""
                lines.append(f"- {name}{default}{mark}")
            return "\n".join(lines)
        wanted = next((m for m in self._models if m.lower() == argument.lower()), None)
        if wanted is None:
            return (
                f"{argument} is not one of the models I may use: "
                f"{', '.join(self._models)}. The bot's owner lists them under llm.models."
            )
        value = None if wanted == self._default_model else wanted
        await self._store.set_preference(MODEL_SCOPE, asker.user_id, value)
        log.info("model_chosen", user=asker.user_id, model=wanted)
        return f"Done: your questions go to {wanted} from now on."

    # ---- /history ----------------------------------------------------------------------------

    async def history(self, asker: Asker) -> str:
        """How many turns the conversation keeps and how much of it the model sees."""
        turns = await self._store.load_turns(asker.conversation_id)
        if not turns:
            return "Our conversation is empty: nothing to remember yet."
        tokens = sum(turn.tokens or estimate_message_tokens(turn.content) for turn in turns)
        seen = await self._store.load_recent_turns(asker.conversation_id, self._history_budget)
        seen_tokens = sum(turn.tokens for turn in seen)
        text = (
            f"I keep {len(turns)} messages of our conversation (about {tokens:,} tokens). "
            f"The model sees the newest {len(seen)} (about {seen_tokens:,} tokens, of a "
            f"budget of {self._history_budget:,})."
        )
        return text + " /reset forgets them."

    # ---- /usage ------------------------------------------------------------------------------

    async def usage(self, asker: Asker) -> str:
        """The user's requests, tokens and images drawn today and this month; for admins
        everyone's too."""
        today = day_of(self._clock())
        first = month_start(today)
        month = await self._store.usage_between(first, today)
        mine = [row for row in month if row.user_id == asker.user_id]
        mine_today = [row for row in mine if row.day == today]
        lines = [
            f"Your use today: {_figures(mine_today)}.",
            f"This month (since {first}): {_figures(mine)}.",
        ]
        if self._access.is_admin(asker.all_ids):
            lines += ["", f"Everyone this month: {_figures(month)}.", "By key:"]
            lines += [f"- {key}: {_figures(rows)}" for key, rows in _grouped(month, "key_id")]
            by_user = _grouped(month, "user_id")
            lines.append(f"By user ({len(by_user)}):")
            lines += [f"- {user}: {_figures(rows)}" for user, rows in by_user[:_TOP_USERS]]
            if len(by_user) > _TOP_USERS:
                rest = [row for _, rows in by_user[_TOP_USERS:] for row in rows]
                lines.append(f"- {len(by_user) - _TOP_USERS} others: {_figures(rest)}")
        return "\n".join(lines)


def _figures(rows: Sequence[Usage]) -> str:
    requests, tokens = totals(rows)
    images = sum(row.images for row in rows)
    drawn = f", {images:,} image{'s' if images != 1 else ''} drawn" if images else ""
    return f"{requests:,} requests, {tokens:,} tokens{drawn}"


def _grouped(rows: Sequence[Usage], field: str) -> list[tuple[str, list[Usage]]]:
    """Rows by ``field``, the biggest token users first."""
    groups: dict[str, list[Usage]] = defaultdict(list)
    for row in rows:
        groups[getattr(row, field)].append(row)
    return sorted(groups.items(), key=lambda item: (-totals(item[1])[1], item[0]))
