"""What an API key looks like: find, recognise and mask key-shaped text.

One module answers "is there a key in this text?" for everyone: the chat service (a message that
holds a key is never sent to the model nor kept in history; a message that *is* a key may be a
donation) and the log redactor (no key reaches a log line). It imports nothing from the rest of
the bot, so every layer can use it.

Shapes recognised (each regex below names its source; values are matched case-sensitively):

* OpenAI ``sk-…`` (legacy and ``sk-svcacct-``/``sk-admin-``), project keys ``sk-proj-…``,
  Anthropic ``sk-ant-…``, OpenRouter ``sk-or-v1-…``, and the older ``sess-``/``rk-`` forms;
* Google ``AIza…``, Groq ``gsk_…``, xAI ``xai-…``, Hugging Face ``hf_…``, Perplexity ``pplx-…``;
* Zhipu ``<32 hex id>.<16 alphanumerics>``; Azure OpenAI's 32 hex digits;
* a JSON Web Token (``eyJ….eyJ….…``) and any token after ``Bearer``;
* every exact occurrence of a configured secret passed as ``extra`` (8 characters or more).

Boundaries are ASCII, not ``\\b``: a key is a run of key characters (``[A-Za-z0-9_-]``) not
preceded or followed by another one. Python's ``\\b`` counts CJK characters as word characters, so
``我的key是sk-…`` would hide the key from a ``\\b``-anchored pattern.

Lengths are lenient where the prefix is distinctive (providers lengthen keys; a key we miss is
worse than a false alarm), exact where a loose length would match ordinary identifiers
(``hf_`` + 34, ``AIza`` + 35). Two guards keep ordinary text out: the part after the prefix must
look random (a digit, or both upper- and lower-case letters), which rejects ``sk-learn-style``
slugs and ``sk-xxxxxxxx…`` placeholders; and a 32-hex-digit run counts only as a whole token.

The 32-hex trade-off: Azure keys have no prefix, so any standalone 32-hex token is treated as a
possible Azure key. That also catches an MD5 digest or a dash-less UUID sent on its own (the user
is asked to resend it without the key-like part, and logs show ``…abcd``). It does not catch a
40-hex git SHA, a dashed UUID, or 32 hex digits inside a longer word (``build_0123…``), because a
shorter-than-the-token match would be a guess, not a key.

Not covered: Google AI Studio's newer ``AQ.`` keys and Azure's newer 84-character keys (their
formats are not published), and keys split over several lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

KeyKind = Literal[
    "anthropic",
    "openrouter",
    "openai_project",
    "openai",
    "google",
    "groq",
    "xai",
    "huggingface",
    "perplexity",
    "zhipu",
    "azure",
    "jwt",
    "bearer",
    "configured",
]

#: configured secrets shorter than this are ignored (they would match ordinary text)
MIN_SECRET_LENGTH: Final = 8
#: secrets shorter than this are masked to ``…`` alone
MIN_MASKED_LENGTH: Final = 12
#: the secret part must be at least this long before its last four characters are shown
_MIN_TAIL_SHOWN_BODY: Final = 12

_KEY_CHAR = "A-Za-z0-9_\\-"
_START = f"(?<![{_KEY_CHAR}])"
_END = f"(?![{_KEY_CHAR}])"
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(frozen=True, slots=True)
class KeyMatch:
    """One key-shaped substring: ``text[start:end] == value``."""

    start: int
    end: int
    kind: KeyKind
    value: str


@dataclass(frozen=True, slots=True)
class _Shape:
    kind: KeyKind
    pattern: re.Pattern[str]  # groups: ``key`` (the whole secret), ``body`` (after the prefix)


def _prefixed(prefix: str, body: str) -> re.Pattern[str]:
    return re.compile(f"{_START}(?P<key>{prefix}(?P<body>{body})){_END}")


# Most specific first: when two shapes match the same span, the earlier one names its kind.
_SHAPES: Final[tuple[_Shape, ...]] = (
    # Anthropic: gitleaks rules/anthropic.go, `sk-ant-api03-[a-zA-Z0-9_\-]{93}AA` (also admin01,
    # and oat01/ort01 OAuth tokens with 40+); any sk-ant- family member with 20+ characters here.
    _Shape("anthropic", _prefixed("sk-ant-", f"[{_KEY_CHAR}]{{20,}}")),
    # OpenRouter: trufflehog pkg/detectors/openrouter, `sk-or-v1-[0-9a-f]{64}`.
    _Shape("openrouter", _prefixed("sk-or-v1-", f"[{_KEY_CHAR}]{{20,}}")),
    # OpenAI project keys: gitleaks rules/openai.go, `sk-proj-` + 58 or 74 + `T3BlbkFJ` + 58 or 74.
    _Shape("openai_project", _prefixed("sk-proj-", f"[{_KEY_CHAR}]{{20,}}")),
    # OpenAI legacy `sk-[a-zA-Z0-9]{20}T3BlbkFJ[a-zA-Z0-9]{20}`, sk-svcacct-/sk-admin- (gitleaks
    # rules/openai.go), and the older sess-/rk- forms. 20+ key characters after the dash.
    _Shape("openai", _prefixed("(?:sk|sess|rk)-", f"[{_KEY_CHAR}]{{20,}}")),
    # Google API keys: Microsoft Purview "Google API key" definition and gitleaks rules/gcp.go,
    # `AIza[\w-]{35}`: 39 characters in all.
    _Shape("google", _prefixed("AIza", f"[{_KEY_CHAR}]{{35}}")),
    # Groq: gitleaks rules/groq.go (ref. console.groq.com/docs/openai), `gsk_[a-zA-Z0-9]{48}`.
    _Shape("groq", _prefixed("gsk_", f"[{_KEY_CHAR}]{{32,}}")),
    # xAI: trufflehog pkg/detectors/xai, `xai-[0-9a-zA-Z_]{80}`.
    _Shape("xai", _prefixed("xai-", f"[{_KEY_CHAR}]{{32,}}")),
    # Hugging Face: gitleaks rules/huggingface.go (ref. huggingface.co/docs/hub/security-tokens),
    # `hf_(?i:[a-z]{34})`. Exactly 34: a looser length matches identifiers like `hf_required…`.
    _Shape("huggingface", _prefixed("hf_", "[A-Za-z0-9]{34}")),
    # Perplexity: gitleaks rules/perplexity.go, `pplx-[\w]{48}`.
    _Shape("perplexity", _prefixed("pplx-", f"[{_KEY_CHAR}]{{32,}}")),
    # Zhipu (bigmodel.cn): the key is `<id>.<secret>`; SDKs split it on "." and sign an HS256 JWT
    # with the secret (zhipuai SDK, new-api relay/channel/zhipu). Issued keys: 32 hex + 16 alnum.
    _Shape("zhipu", _prefixed("", "[0-9a-fA-F]{32}\\.[A-Za-z0-9]{16}")),
    # Azure OpenAI: 32 hex digits (trufflehog pkg/detectors/azure_openai, `[a-f0-9]{32}` next to
    # an api_key name; here without the name, see the module docstring for the trade-off).
    _Shape("azure", _prefixed("", "[0-9a-fA-F]{32}")),
    # JWT: gitleaks rules/jwt.go, `ey…\.ey…\.…`: header and payload are base64url JSON objects.
    _Shape(
        "jwt",
        _prefixed(
            "", f"eyJ[{_KEY_CHAR}]{{8,}}\\.eyJ[{_KEY_CHAR}]{{8,}}\\.[{_KEY_CHAR}]{{8,}}={{0,2}}"
        ),
    ),
    # Whatever follows `Bearer` in an Authorization header (RFC 6750 b64token characters).
    _Shape(
        "bearer",
        re.compile(
            f"{_START}(?i:bearer)\\s+(?P<key>(?P<body>[A-Za-z0-9._~+/\\-]{{16,}}=*))"
            "(?![A-Za-z0-9._~+/=\\-])"
        ),
    ),
)

_CONFIGURED_PRIORITY: Final = len(_SHAPES)

#: prefixes kept by :func:`mask_key`, longest first
_MASK_PREFIXES: Final = (
    "sk-svcacct-",
    "sk-or-v1-",
    "sk-admin-",
    "sk-proj-",
    "sk-ant-",
    "pplx-",
    "gsk_",
    "xai-",
    "AIza",
    "sk-",
    "hf_",
)


def _looks_random(body: str) -> bool:
    """A digit, or both cases: real key bodies always are; words and placeholders are not."""
    if any(char.isdigit() for char in body):
        return True
    return any(char.isupper() for char in body) and any(char.islower() for char in body)


def _expand_to_token(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen ``[start, end)`` over adjacent key characters, so a whole token is masked."""
    while start > 0 and text[start - 1] in _KEY_CHARS:
        start -= 1
    while end < len(text) and text[end] in _KEY_CHARS:
        end += 1
    return start, end


def _occurrences(text: str, value: str) -> Iterable[int]:
    index = text.find(value)
    while index >= 0:
        yield index
        index = text.find(value, index + 1)


def find_keys(text: str, extra: Iterable[str] = ()) -> list[KeyMatch]:
    """Every key-shaped substring of ``text``, in order, overlapping matches merged.

    ``extra`` holds configured secrets (the app secret, configured and donated keys): each exact
    occurrence of one 8 characters or longer is reported as ``configured``. Every other
    occurrence of a value found by shape is reported too, even inside a longer word, and such
    boundary-less matches are widened to the whole token around them, so masking a match never
    leaves part of a key or glues a mask to a neighbouring key character.
    """
    # (start, end, priority, kind); priority orders same-span matches (lower is more specific)
    found: list[tuple[int, int, int, KeyKind]] = []
    for priority, shape in enumerate(_SHAPES):
        for match in shape.pattern.finditer(text):
            if _looks_random(match.group("body")):
                found.append((match.start("key"), match.end("key"), priority, shape.kind))
    searched: dict[str, tuple[int, KeyKind]] = {}
    for start, end, priority, kind in found:
        searched.setdefault(text[start:end], (priority, kind))
    for secret in extra:
        if len(secret) >= MIN_SECRET_LENGTH:
            searched.setdefault(secret, (_CONFIGURED_PRIORITY, "configured"))
    for value, (priority, kind) in searched.items():
        for index in _occurrences(text, value):
            start, end = _expand_to_token(text, index, index + len(value))
            found.append((start, end, priority, kind))
    found.sort(key=lambda item: (item[0], item[0] - item[1], item[2]))
    merged: list[tuple[int, int, KeyKind]] = []
    for start, end, _priority, kind in found:
        if merged and start <= merged[-1][1]:
            last_start, last_end, last_kind = merged[-1]
            merged[-1] = (last_start, max(last_end, end), last_kind)
        else:
            merged.append((start, end, kind))
    return [KeyMatch(start, end, kind, text[start:end]) for start, end, kind in merged]


def contains_key(text: str, extra: Iterable[str] = ()) -> bool:
    """Whether ``text`` holds anything key-shaped (or a configured secret from ``extra``)."""
    return bool(find_keys(text, extra))


_QUOTES = "\"'`“”‘’「」『』"
_PROVIDERS = (
    "openai|azure(?:[ _-]?openai)?|google|gemini|groq|x\\.?ai|grok|perplexity|pplx"
    "|hugging[ _-]?face|hf|zhipu|智谱|glm|bigmodel|anthropic|claude|openrouter|chatgpt|gpt"
    "|deepseek|moonshot|kimi|qwen|dashscope|通义"
)
# What may stand before the key in a donation: "key:", "我的key是", "here is my OpenAI API key:",
# "OPENAI_API_KEY=". Everything is optional, so a bare key passes too. Matched against the lead
# with its whitespace collapsed and quotes trimmed (see _is_lead), so no two parts of the pattern
# compete for the same run of spaces: a regex with several adjacent \s* backtracks for minutes
# on a long run of spaces.
_LEAD = re.compile(
    "(?:(?:here is|here's|heres|this is|it is|it's|这是|这个是|给你) ?)?"
    "(?:(?:my|the|a|an|our|new|我的|我们的|新的|新|一个) ?)*"
    f"(?:(?:{_PROVIDERS})[ _-]?)?"
    "(?:(?:api[ _-]?)?(?:key|token|secret)s?|apikey|密钥|秘钥|令牌)?"
    "(?: ?(?:is|是|为|->|=>|[:：=]))?"
    "(?: ?[:：=])?",
    re.IGNORECASE,
)
#: a longer lead is a sentence, not a label
_MAX_LEAD = 60
_TRAIL = re.compile(f"[\\s{_QUOTES}.,;!?。，；！？~～]*")
_FENCE = re.compile("```[A-Za-z0-9_+-]*[ \\t]*\\n(?P<inner>.*?)\\n?```", re.DOTALL)


def is_key_message(text: str, extra: Iterable[str] = ()) -> str | None:
    """The key, when the whole message is essentially one key (a donation); else ``None``.

    Accepted around the key: whitespace, quotes and backticks (a code block too), trailing
    punctuation, and a short lead such as ``key:``, ``我的key是``, ``here is my key`` or
    ``OPENAI_API_KEY=``. A sentence that merely mentions a key (``please use sk-… for the demo``)
    is not a donation: :func:`contains_key` is true for it, and it must be refused.
    """
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced is not None:
        body = fenced.group("inner").strip()
    matches = find_keys(body, extra)
    if len(matches) != 1:
        return None
    (match,) = matches
    if _is_lead(body[: match.start]) and _TRAIL.fullmatch(body[match.end :]):
        return match.value
    return None


def _is_lead(text: str) -> bool:
    lead = " ".join(text.split()).strip(f"{_QUOTES} ")
    return len(lead) <= _MAX_LEAD and _LEAD.fullmatch(lead) is not None


def mask_key(secret: str) -> str:
    """Show a secret the only way it is ever shown: ``sk-…abcd``.

    A recognised prefix (``sk-``, ``sk-proj-``, ``sk-ant-``, ``sk-or-v1-``, ``AIza``, ``gsk_``,
    ``xai-``, ``hf_``, ``pplx-``…) is kept, then ``…`` and the last four characters; prefix-less
    secrets (hex, Zhipu, JWT, configured) become ``…abcd``. At most four characters of the secret
    part are shown, and only when it has 12 or more; secrets under 12 characters become ``…``.
    """
    secret = secret.strip()
    if len(secret) < MIN_MASKED_LENGTH:
        return "…"
    prefix = next((p for p in _MASK_PREFIXES if secret.startswith(p)), "")
    body = secret[len(prefix) :]
    if len(body) < _MIN_TAIL_SHOWN_BODY:
        return f"{prefix}…"
    return f"{prefix}…{body[-4:]}"


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every match of :func:`find_keys` replaced by its :func:`mask_key`."""
    matches = find_keys(text, extra)
    if not matches:
        return text
    parts: list[str] = []
    position = 0
    for match in matches:
        parts.append(text[position : match.start])
        parts.append(mask_key(match.value))
        position = match.end
    parts.append(text[position:])
    return "".join(parts)
