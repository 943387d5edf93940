"""Checks an API key with one cheap call before it is trusted (donated keys, ``keys check``).

The call goes through the real SDK, as every request does: ``GET {base_url}/models``; when the
endpoint has no ``/models`` (404 or 405, as some OpenAI-compatible servers) one non-streaming
chat completion of ``max_tokens=1`` with the configured model instead. The answer is read with
the classifier's rules (:mod:`bot.llm.classifier`):

===============================================  =================
answer                                           verdict
===============================================  =================
a model list / a completion                      ``valid``
429 rate limit (the key was accepted)            ``valid``
the chat fallback refused the request itself     ``valid``
(400/422: the key passed authentication)
key dead, ``auth`` (401, invalid key codes)      ``invalid``
key dead, ``quota`` (insufficient_quota, 402,    ``no_quota``
arrears)
404/405 on both calls; a page that is not an     ``wrong_endpoint``
OpenAI API (HTML or other text, not JSON)
timeout, connection error, 5xx; a 403 that is    ``unreachable``
not about the key (region, firewall)
===============================================  =================

``unreachable`` means nothing could be learnt about the key: the caller stores nothing. The
``detail`` is short, safe to show to the person who sent the key, and never contains the key
(nor the provider's message, which may echo parts of it): statuses and error codes only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal

import openai

from bot.config import LLMSettings
from bot.llm.classifier import Classified, Outcome, classify

KeyVerdict = Literal["valid", "invalid", "no_quota", "wrong_endpoint", "unreachable"]

_NO_SUCH_ROUTE: Final = (404, 405)


@dataclass(frozen=True)
class KeyCheck:
    """The verdict on a key and a short reason, safe to show to a user."""

    verdict: KeyVerdict
    detail: str

    @property
    def conclusive(self) -> bool:
        """False when nothing could be learnt (``unreachable``): store nothing, try later."""
        return self.verdict != "unreachable"


async def check_key(settings: LLMSettings, secret: str, *, timeout_s: float = 10.0) -> KeyCheck:
    """Check ``secret`` against ``settings.base_url`` (and ``settings.model`` if needed).

    Never raises for anything the endpoint answers or fails to answer; see the module docstring
    for the verdicts.
    """
    client = openai.AsyncOpenAI(
        api_key=secret, base_url=settings.base_url, max_retries=0, timeout=timeout_s
    )
    try:
        return await _check(client, settings.model)
    finally:
        await client.close()


async def _check(client: openai.AsyncOpenAI, model: str) -> KeyCheck:
    try:
        listed = await client.models.with_raw_response.list()
    except openai.OpenAIError as exc:
        verdict = _verdict(exc, step="models", model=model)
        if verdict is not None:
            return verdict
        return await _check_chat(client, model)  # this endpoint has no /models
    data = _json(listed.http_response.text)
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return KeyCheck("wrong_endpoint", "GET /models did not answer with an OpenAI model list")
    return KeyCheck("valid", f"GET /models listed {len(models)} models")


async def _check_chat(client: openai.AsyncOpenAI, model: str) -> KeyCheck:
    try:
        answered = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1
        )
    except openai.OpenAIError as exc:
        return _verdict(exc, step="chat", model=model) or KeyCheck(
            "wrong_endpoint", f"neither /models nor /chat/completions with {model} answered there"
        )
    data = _json(answered.http_response.text)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return KeyCheck(
            "wrong_endpoint", "POST /chat/completions did not answer with an OpenAI completion"
        )
    return KeyCheck("valid", f"a one-token answer from {model}")


def _verdict(
    exc: openai.OpenAIError, *, step: Literal["models", "chat"], model: str
) -> KeyCheck | None:
    """The verdict for a failed call; None when the route does not exist (404, 405).

    On the ``models`` step None also covers other refusals of the request itself (not of the
    key): the one-token chat call decides then.
    """
    path = "GET /models" if step == "models" else "POST /chat/completions"
    classified = classify(exc)
    status = classified.status
    if isinstance(exc, openai.APIStatusError) and _not_an_api(exc):
        if status is not None and (status >= 500 or status in (408, 429)):
            return KeyCheck("unreachable", f"{path}: {status} without an API answer")
        if status in _NO_SUCH_ROUTE:
            return None
        return KeyCheck("wrong_endpoint", f"{path} answered {status} with a page, not an API")
    if classified.outcome is Outcome.KEY_DEAD:
        if classified.key_problem == "quota":
            return KeyCheck("no_quota", _label(classified))
        return KeyCheck("invalid", _label(classified))
    if classified.outcome is Outcome.RATE_LIMIT:
        return KeyCheck("valid", f"accepted, rate limited right now: {_label(classified)}")
    if classified.outcome is Outcome.TRANSIENT:
        return KeyCheck("unreachable", f"{path}: {_label(classified)}")
    # REJECTED
    if status == 403:
        return KeyCheck("unreachable", f"{_label(classified)}: refused from this network")
    if step == "models":
        return None  # no usable /models: let a one-token answer decide
    if status in _NO_SUCH_ROUTE:
        if classified.code == "model_not_found":
            return KeyCheck("wrong_endpoint", f"the endpoint does not know the model {model}")
        return None
    return KeyCheck("valid", f"accepted, the test request itself was refused: {_label(classified)}")


def _not_an_api(exc: openai.APIStatusError) -> bool:
    """The error body was text that is not JSON (an HTML page, "404 page not found")."""
    return isinstance(exc.body, str) and bool(exc.body.strip())


def _label(classified: Classified) -> str:
    status = classified.status
    code = classified.code
    if status is None:
        return classified.reason
    return f"{status} {code}" if code else str(status)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
