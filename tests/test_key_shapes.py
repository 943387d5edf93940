"""Key shapes: every provider's key is found and masked; ordinary text is left alone.

The sample keys are made up (right prefix, length and alphabet; no real key). They are written as
two string literals so that secret scanners reading this file do not flag them.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.keyshapes import (
    KeyKind,
    contains_key,
    find_keys,
    is_key_message,
    mask_key,
    redact,
)

OPENAI_LEGACY = "sk-u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8dKLzdocJ2isAj"
OPENAI_PROJECT = (
    "sk-proj-IhKtJ0RlgLKOmxgJTeKdNnFRIBXuDL7DxtpYlSXp_fKtHF4vUCsMehGAkWvj7FAc9QeWJKY40uvSwMFLZ"
)
ANTHROPIC = "sk-ant-api03-Ty4Qwb8DwkNhFdnXsiVpzz63FfkCzJ-r4i0B3JrTAwR4y9ojfljoQoaF1Llqs"
OPENROUTER = "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"
GOOGLE = "AIzaSyQCyEZDz-TddJ8HyS5SUkCnD8zRA9a9Skp"
GROQ = "gsk_6yYTWmE4lBYOvfZ8UzDzV8fUkkibjL5DZPjN0MEQ7wjJJiba"
XAI = "xai-ZUPgHV7iB3m03nbqnsGpWLuqIA1id6Vw5DQL05HA064GiIjHGb3CXlMaXZjljENUhJduRHHJEYXg4Jdp"
HUGGING_FACE = "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"
PERPLEXITY = "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"
ZHIPU = "ba2b0aee0ca923732881584d8c4fa281.ZSlB5er8bOfZqfM2"
AZURE = "7283e0ad84173581569969e58b081006"
JWT = (
    "eyJhbGciOiJIUzI1NiJ9"
    ".eyJzdWIiOiJvdV8xMjM0NTYiLCJleHAiOjE3MDAwMDAwMDB9"
    ".5aHUQPFeNBTxaQWk8JzFalHlsZfYcMMDktXP-tKsf2r"
)

#: (kind, key, how it is shown)
SAMPLES: list[tuple[KeyKind, str, str]] = [
    ("openai", OPENAI_LEGACY, "sk-…isAj"),
    ("openai_project", OPENAI_PROJECT, "sk-proj-…MFLZ"),
    ("anthropic", ANTHROPIC, "sk-ant-…Llqs"),
    ("openrouter", OPENROUTER, "sk-or-v1-…b5b7"),
    ("google", GOOGLE, "AIza…9Skp"),
    ("groq", GROQ, "gsk_…Jiba"),
    ("xai", XAI, "xai-…4Jdp"),
    ("huggingface", HUGGING_FACE, "hf_…JmCi"),
    ("perplexity", PERPLEXITY, "pplx-…zvAm"),
    ("zhipu", ZHIPU, "…qfM2"),
    ("azure", AZURE, "…1006"),
    ("jwt", JWT, "…sf2r"),
]
SAMPLE_IDS = [kind for kind, _, _ in SAMPLES]


@pytest.mark.parametrize(("kind", "key", "masked"), SAMPLES, ids=SAMPLE_IDS)
def test_each_providers_key_is_found_whole_with_its_kind(kind: str, key: str, masked: str) -> None:
    text = f"my key is {key} please keep it safe"
    (match,) = find_keys(text)
    assert match.kind == kind
    assert match.value == key
    assert text[match.start : match.end] == key


@pytest.mark.parametrize(("kind", "key", "masked"), SAMPLES, ids=SAMPLE_IDS)
def test_each_providers_key_is_masked_to_prefix_and_last_four(
    kind: str, key: str, masked: str
) -> None:
    assert mask_key(key) == masked
    assert redact(f"key={key};") == f"key={masked};"


@pytest.mark.parametrize(("kind", "key", "masked"), SAMPLES, ids=SAMPLE_IDS)
def test_a_message_that_is_only_a_key_is_a_donation(kind: str, key: str, masked: str) -> None:
    assert is_key_message(f"  {key}\n") == key


def test_a_key_right_after_chinese_text_is_found() -> None:
    text = f"我的key是{OPENAI_LEGACY}，谢谢"
    (match,) = find_keys(text)
    assert match.value == OPENAI_LEGACY
    assert redact(text) == "我的key是sk-…isAj，谢谢"
    assert contains_key(f"密钥：{GOOGLE}。")


def test_a_bearer_jwt_is_found_and_masked() -> None:
    text = f"Authorization: Bearer {JWT}"
    (match,) = find_keys(text)
    assert match.value == JWT
    assert redact(text) == "Authorization: Bearer …sf2r"


def test_any_bearer_token_is_found() -> None:
    token = "t-g1044qGLDPOIU6NQQRGEHABCDEFGH0123"
    assert [m.value for m in find_keys(f"-H 'Authorization: bearer {token}'")] == [token]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"```bash\nexport OPENAI_API_KEY={OPENAI_PROJECT}\ncurl …\n```", OPENAI_PROJECT),
        (f"`{GROQ}`", GROQ),
        (f'{{"api_key": "{PERPLEXITY}"}}', PERPLEXITY),
        (
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-pro"
            f":generateContent?key={GOOGLE}&alt=sse",
            GOOGLE,
        ),
        (f"https://my.openai.azure.com/openai/deployments?api-key={AZURE}", AZURE),
        (f"https://proxy.example/{XAI}/v1/chat", XAI),
        (f"HF_TOKEN={HUGGING_FACE} python app.py", HUGGING_FACE),
        (f"client = ZhipuAI(api_key='{ZHIPU}')", ZHIPU),
        (f"（{ANTHROPIC}）", ANTHROPIC),
    ],
    ids=[
        "code-block",
        "backticks",
        "json",
        "url-query",
        "azure-url",
        "url-path",
        "env",
        "py",
        "cjk",
    ],
)
def test_keys_inside_code_blocks_urls_and_json_are_found(text: str, key: str) -> None:
    assert [match.value for match in find_keys(text)] == [key]
    assert key not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "fixed in commit 3f5669d54579033ec6a1b1c9913510e7e42963cb",  # a 40-hex git SHA
        "request 7c0b7d9e-5d2f-4a31-9a57-1d2c3b4a5e6f failed",  # a UUID
        "cache key req7c0b7d9e5d2f4a319a571d2c3b4a5e6f",  # 32 hex inside a longer word
        "build_7c0b7d9e5d2f4a319a571d2c3b4a5e6f.log",
        "pip install sk-learn",
        "open the task-manager and kill it",
        "sk-123",
        "my key is sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",  # a placeholder
        "sk-learn-is-a-python-library-for-machine-learning",  # words, not random
        "- (id)hf_requiredCharacteristicTypesForDisplayMetadata;",
        "model pplx-70b-online, or xai-grok-beta, or gsk_test",
        "AIzaNotAKey and a bearer token is what OAuth calls it",
        "",
    ],
)
def test_ordinary_text_holds_no_key(text: str) -> None:
    assert find_keys(text) == []
    assert not contains_key(text)
    assert redact(text) == text


def test_a_bare_32_hex_token_is_taken_for_an_azure_key() -> None:
    # The trade-off: an MD5 digest or a dash-less UUID sent on its own looks exactly like one.
    digest = "d41d8cd98f00b204e9800998ecf8427e"
    assert [match.kind for match in find_keys(f"md5 = {digest}")] == ["azure"]


def test_configured_secrets_are_found_wherever_they_occur() -> None:
    app_secret = "Zq8VvY2u6wXkR1pLm3nB7cT9dE4fG5hJ"
    text = f"secret {app_secret} and again as prefix{app_secret}suffix"
    matches = find_keys(text, extra=[app_secret])
    assert [match.kind for match in matches] == ["configured", "configured"]
    # the whole token around a secret is masked, not just the secret inside it
    assert matches[1].value == f"prefix{app_secret}suffix"
    assert app_secret not in redact(text, extra=[app_secret])


def test_configured_secrets_shorter_than_eight_characters_are_ignored() -> None:
    assert find_keys("the word hunter2 is common", extra=["hunter2"]) == []


def test_every_occurrence_of_a_found_key_is_masked_even_inside_a_word() -> None:
    text = f"{AZURE} and x{AZURE}"
    assert AZURE not in redact(text)


@pytest.mark.parametrize(
    "template",
    [
        "{key}",
        "  {key}  ",
        "`{key}`",
        '"{key}"',
        "“{key}”",
        "```\n{key}\n```",
        "```text\n{key}\n```",
        "key: {key}",
        "key：{key}",
        "Key = {key}",
        "我的key是{key}",
        "我的密钥：{key}",
        "这是我的api key：`{key}`",
        "here is my key {key}",
        "Here's my OpenAI API key: {key}.",
        "my key is {key}",
        "OPENAI_API_KEY={key}",
        "api_key: '{key}'",
    ],
)
def test_donation_forms_are_recognised(template: str) -> None:
    assert is_key_message(template.format(key=OPENAI_PROJECT)) == OPENAI_PROJECT


@pytest.mark.parametrize(
    "text",
    [
        f"please use {OPENAI_LEGACY} for the demo",
        f"why does {GOOGLE} return 403?",
        f"{OPENAI_LEGACY} {GROQ}",
        f"{OPENAI_LEGACY} is my key, what can I do with it",
    ],
)
def test_a_sentence_that_mentions_a_key_is_not_a_donation_but_holds_a_key(text: str) -> None:
    assert is_key_message(text) is None
    assert contains_key(text)


@pytest.mark.timeout(5)
def test_a_long_run_of_spaces_before_a_key_is_checked_quickly() -> None:
    # regression: the lead pattern had adjacent \s* parts and took minutes on 500 spaces
    assert is_key_message("here is" + " " * 5000 + "x " + OPENAI_LEGACY) is None
    assert is_key_message("my key:" + " " * 5000 + OPENAI_LEGACY) == OPENAI_LEGACY


def test_a_message_without_a_key_is_not_a_donation() -> None:
    assert is_key_message("here is my key") is None
    assert is_key_message("") is None


def test_a_configured_secret_alone_counts_as_a_key_message() -> None:
    secret = "donated-key-that-looks-like-nothing-0042"
    assert is_key_message(f"key: {secret}", extra=[secret]) == secret
    assert is_key_message(secret) is None


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        ("sk-abcdefghijklmnop1234", "sk-…1234"),
        ("sk-svcacct-abcdefghijklmnop1234", "sk-svcacct-…1234"),
        ("0123456789abcdef", "…cdef"),
        ("short", "…"),
        ("", "…"),
        ("sk-12345678", "…"),  # under 12 characters
        ("sk-proj-abcd1234", "sk-proj-…"),  # a short secret part is not shown at all
        ("  sk-abcdefghijklmnop1234\n", "sk-…1234"),
    ],
)
def test_mask_key_shows_a_known_prefix_and_at_most_the_last_four(secret: str, masked: str) -> None:
    assert mask_key(secret) == masked


# --- properties -------------------------------------------------------------------------------

_KEY_ALPHABET = string.ascii_letters + string.digits + "_-"
_FRAGMENTS = [
    *(key for _, key, _ in SAMPLES),
    "sk-",
    "sk-proj-",
    "AIza",
    "gsk_",
    "xai-",
    "hf_",
    "pplx-",
    "Bearer ",
    "eyJ",
    "…",
    "我的key是",
    "，",
    " ",
    ".",
    "\n",
    "`",
    "=",
    "/",
]
_texts = st.lists(
    st.one_of(
        st.sampled_from(_FRAGMENTS),
        st.text(alphabet=_KEY_ALPHABET, max_size=40),
        st.text(alphabet="0123456789abcdef", min_size=30, max_size=34),
        st.text(max_size=10),
    ),
    max_size=12,
).map("".join)


@given(_texts)
def test_redacted_text_never_contains_a_found_key_and_redacting_again_changes_nothing(
    text: str,
) -> None:
    redacted = redact(text)
    for match in find_keys(text):
        assert match.value not in redacted
    assert redact(redacted) == redacted


@given(_texts, st.lists(st.sampled_from([key for _, key, _ in SAMPLES]), max_size=3))
def test_configured_secrets_never_survive_redaction(text: str, secrets: list[str]) -> None:
    text = text + "".join(f"{secret}x" for secret in secrets)
    redacted = redact(text, extra=secrets)
    for secret in secrets:
        assert secret not in redacted
    for match in find_keys(text, extra=secrets):
        assert match.value not in redacted


_PREFIXES = ("sk-svcacct-", "sk-or-v1-", "sk-admin-", "sk-proj-", "sk-ant-", "pplx-", "gsk_")
_PREFIXES += ("xai-", "AIza", "sk-", "hf_")


@given(st.one_of(st.text(), st.sampled_from(_PREFIXES).flatmap(lambda p: st.text().map(p.__add__))))
def test_mask_key_never_shows_more_than_four_characters_of_the_secret(secret: str) -> None:
    masked = mask_key(secret)
    shown_prefix, ellipsis, tail = masked.partition("…")
    assert ellipsis == "…"
    assert shown_prefix in ("", *_PREFIXES)
    assert len(tail) <= 4
    assert secret.strip().endswith(tail)


@st.composite
def _generated_keys(draw: st.DrawFn) -> tuple[KeyKind, str]:
    alnum = string.ascii_letters + string.digits
    kind, prefix, alphabet, low, high = draw(
        st.sampled_from(
            [
                ("openai", "sk-", alnum, 20, 60),
                ("openai_project", "sk-proj-", _KEY_ALPHABET, 20, 170),
                ("anthropic", "sk-ant-api03-", _KEY_ALPHABET, 20, 100),
                ("openrouter", "sk-or-v1-", "0123456789abcdef", 64, 64),
                ("google", "AIza", _KEY_ALPHABET, 35, 35),
                ("groq", "gsk_", alnum, 48, 56),
                ("xai", "xai-", alnum, 80, 80),
                ("huggingface", "hf_", string.ascii_letters, 34, 34),
                ("perplexity", "pplx-", alnum, 48, 48),
            ]
        )
    )
    body = draw(st.text(alphabet=alphabet, min_size=low, max_size=high))
    digit = draw(st.sampled_from(string.digits))  # real keys are random: they have a digit
    return kind, prefix + body[:-1] + digit


@given(_generated_keys(), st.sampled_from(["", " ", "我的key是", "key=", "(", '"', "\n"]))
def test_any_key_of_a_known_shape_is_found_and_masked(
    generated: tuple[KeyKind, str], before: str
) -> None:
    kind, key = generated
    text = f"{before}{key}{before[::-1]}。"
    (match,) = find_keys(text)
    assert (match.kind, match.value) == (kind, key)
    assert key not in redact(text)
