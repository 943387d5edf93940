"""Doctor's LLM checks: every key works, the configured models exist, and an answer streams.

Each key is checked with :func:`bot.llm.validation.check_key` (``GET {base_url}/models``, or a
one-token answer where there is no ``/models``), a few at a time. With the first key that works:
the model list once more, to find every configured model in it (``llm.model``, ``llm.models``,
the personas' models), then one streamed chat completion of at most 5 tokens, timed to its
first token. Keys are shown masked with their key id, never whole; provider messages are not
shown (they may echo a key), only statuses and error codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import openai
from openai.types.chat import ChatCompletionMessageParam

from bot.chat.personas import configured_personas
from bot.config import Settings
from bot.doctor.report import Result
from bot.llm.classifier import classify
from bot.llm.keypool import key_id_of
from bot.llm.validation import KeyCheck, check_key
from bot.logging import mask_key

CHECK_CONCURRENCY: Final = 4
MAX_TOKENS: Final = 5
PROMPT: Final = "Reply with the single word OK."
_NO_SUCH_ROUTE: Final = (404, 405)
_SHOWN_MODELS: Final = 8


@dataclass(frozen=True)
class KeyToCheck:
    """A key of the pool and where it comes from (for the line that names it)."""

    secret: str
    origin: str
    """``llm.keys`` / ``OPENAI_API_KEYS`` / ``donated by …``"""
    skip_reason: str | None = None
    """Why it is not checked (disabled by hand), or None."""

    def label(self) -> str:
        """``llm key sk-…abcd (id 0123456789ab)``: never the secret."""
        return f"llm key {mask_key(self.secret)} (id {key_id_of(self.secret)})"


def keys_of(settings: Settings) -> list[KeyToCheck]:
    """The configured keys (``llm.keys`` and ``OPENAI_API_KEYS``, as loaded)."""
    keys = []
    for entry in settings.llm.keys:
        origin = "OPENAI_API_KEYS" if entry.owner == "env" else f"llm.keys, owner {entry.owner}"
        skip = None if entry.enabled else "enabled: false in the settings"
        keys.append(KeyToCheck(entry.key.get_secret_value(), origin, skip))
    return keys


async def check_llm(
    settings: Settings,
    keys: Sequence[KeyToCheck],
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Result]:
    """Check every key, then the models and one streamed answer with the first working key."""
    base_url = settings.llm.base_url
    usable = [key for key in keys if key.skip_reason is None]
    results = [
        Result.warn(key.label(), f"{key.origin}: not checked ({key.skip_reason})")
        for key in keys
        if key.skip_reason is not None
    ]
    if not usable:
        donations = (
            " or send the bot a key in a private chat" if settings.keys.accept_donations else ""
        )
        problem = f"no API key to use with {base_url}: the bot cannot answer anyone"
        fix = f"set OPENAI_API_KEYS=sk-… (or add llm.keys in settings.yaml){donations}"
        return [*results, Result.fail("llm keys", problem, fix)]

    limit = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def check_one(key: KeyToCheck) -> KeyCheck:
        async with limit:
            return await check_key(settings.llm, key.secret, timeout_s=timeout_s)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(check_one(key)) for key in usable]
    working: KeyToCheck | None = None
    for key, task in zip(usable, tasks, strict=True):
        verdict = task.result()
        results.append(_key_result(key, verdict, base_url))
        if verdict.verdict == "valid" and working is None:
            working = key
    if working is None:
        return results

    client = openai.AsyncOpenAI(
        api_key=working.secret, base_url=base_url, max_retries=0, timeout=timeout_s
    )
    try:
        models = await _check_models(client, settings)
        results += models
        if any(r.name == f"model {settings.llm.model}" for r in models):
            note = f"not tried: {base_url} does not offer llm.model ({settings.llm.model})"
            results.append(Result.warn("chat completion", note))
        else:
            results.append(await _check_completion(client, settings.llm.model, clock=clock))
    finally:
        await client.close()
    return results


def _key_result(key: KeyToCheck, check: KeyCheck, base_url: str) -> Result:
    name = key.label()
    if check.verdict == "valid":
        return Result.ok(name, f"{key.origin}: {check.detail}")
    if check.verdict in ("invalid", "no_quota"):
        what = "refused" if check.verdict == "invalid" else "out of quota or credit"
        problem = f"{key.origin}: {what} by {base_url} ({check.detail})"
        if key.origin.startswith("donated"):
            fix = (
                f"the bot takes it out of service by itself; to drop it: "
                f"`python -m bot keys remove {key_id_of(key.secret)}`"
            )
        elif check.verdict == "no_quota":
            fix = "top up the account of this key, or replace it in the settings"
        else:
            fix = f"replace it in {key.origin.split(',')[0]} with a key {base_url} accepts"
        return Result.fail(name, problem, fix)
    if check.verdict == "wrong_endpoint":
        problem = f"{base_url} does not answer like an OpenAI-compatible API ({check.detail})"
        fix = (
            "set llm.base_url to the API root, usually ending in /v1 "
            "(e.g. https://api.openai.com/v1)"
        )
        return Result.fail(name, problem, fix)
    problem = f"could not reach {base_url} ({check.detail})"
    fix = "check llm.base_url, the network and any proxy (HTTPS_PROXY)"
    return Result.fail(name, problem, fix)


def _models_in_use(settings: Settings) -> dict[str, str]:
    """Every model the settings name, with the first setting that names it."""
    named: dict[str, str] = {settings.llm.model: "llm.model"}
    for model in settings.llm.models:
        named.setdefault(model, "llm.models")
    for key, persona in configured_personas(settings.chat).items():
        if persona.model:
            named.setdefault(persona.model, f"the persona {key}'s model")
    return named


async def _check_models(client: openai.AsyncOpenAI, settings: Settings) -> list[Result]:
    named = _models_in_use(settings)
    try:
        offered = {model.id async for model in client.models.list()}
    except openai.APIStatusError as exc:
        if exc.status_code in _NO_SUCH_ROUTE:
            note = (
                f"{settings.llm.base_url} has no model list: could not check that "
                f"{', '.join(named)} exist"
            )
            return [Result.warn("models", note)]
        return [Result.warn("models", f"the model list failed ({classify(exc).reason})")]
    except openai.OpenAIError as exc:
        return [Result.warn("models", f"the model list failed ({classify(exc).reason})")]
    missing = [model for model in named if model not in offered]
    if not missing:
        return [Result.ok("models", f"{', '.join(named)} offered by {settings.llm.base_url}")]
    choices = sorted(offered)
    shown = ", ".join(choices[:_SHOWN_MODELS]) + (" …" if len(choices) > _SHOWN_MODELS else "")
    return [
        Result.fail(
            f"model {model}",
            f"{settings.llm.base_url} does not offer it ({named[model]})",
            f"set {named[model]} to a model it offers: {shown or 'none listed'}",
        )
        for model in missing
    ]


async def _check_completion(
    client: openai.AsyncOpenAI, model: str, *, clock: Callable[[], float]
) -> Result:
    name = "chat completion"
    try:
        try:
            elapsed = await _first_token_after(client, model, clock, limited=True)
        except openai.BadRequestError as exc:
            if "max_tokens" not in str(exc):
                raise
            # Some models take max_completion_tokens only: the bot sends no limit at all.
            elapsed = await _first_token_after(client, model, clock, limited=False)
    except openai.OpenAIError as exc:
        reason = classify(exc).reason
        problem = f"{model} did not answer a streamed request ({reason})"
        fix = "check llm.model and llm.base_url; try `make chat` to see the error in full"
        return Result.fail(name, problem, fix)
    if elapsed is None:
        note = f"{model} streamed no text within {MAX_TOKENS} tokens (a model that thinks first?)"
        return Result.warn(name, note)
    return Result.ok(name, f"{model} streamed an answer, first token after {elapsed * 1000:.0f} ms")


async def _first_token_after(
    client: openai.AsyncOpenAI, model: str, clock: Callable[[], float], *, limited: bool
) -> float | None:
    """Stream one short answer; return the seconds to its first text (None: no text at all).

    ``limited``: ask for at most :data:`MAX_TOKENS` tokens and read the whole (short) answer;
    else ask without a limit and stop reading at the first text.
    """
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
    started = clock()
    if limited:
        stream = await client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=MAX_TOKENS
        )
    else:
        stream = await client.chat.completions.create(model=model, messages=messages, stream=True)
    first: float | None = None
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = clock() - started
                if not limited:
                    break
    return first
