"""Settings: validation errors name the field, the environment overrides, the CLI exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark_oapi.client import _validate_domain as sdk_validate_domain

from bot.config import load_settings, parse_settings, resolve_config_path
from bot.errors import ConfigError
from tests.helpers import REPO_ROOT, bot_environment, run_bot, write_settings


def problems_of(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw)
    return caught.value.problems


def test_committed_example_settings_validate_and_hold_no_secret() -> None:
    settings = load_settings(REPO_ROOT / "settings.yaml", env={})
    assert settings.feishu.app_secret.get_secret_value() == ""
    assert settings.llm.keys == []
    assert settings.keys.accept_donations is True
    assert settings.store.url == "sqlite:///data/bot.db"


def test_every_field_of_the_example_settings_has_a_comment() -> None:
    lines = (REPO_ROOT / "settings.yaml").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or not line.startswith("  "):
            continue
        previous = lines[number - 1].strip()
        assert previous.startswith("#"), f"settings.yaml line {number + 1} has no comment"


def test_empty_file_gives_defaults() -> None:
    assert parse_settings({}).llm.model == "gpt-4o-mini"


def test_missing_required_field_is_named_with_its_index() -> None:
    raw = {"llm": {"keys": [{"key": "sk-one-000000000000"}, {"owner": "bob"}]}}
    assert problems_of(raw) == ["llm.keys[1].key: field required"]


def test_unknown_key_at_any_level_is_named() -> None:
    assert problems_of({"feishu": {"app_idd": "x"}}) == [
        "feishu.app_idd: unknown key (check the spelling against the configuration reference)"
    ]
    assert problems_of({"colour": 1})[0].startswith("colour: unknown key")


def test_wrong_type_is_named() -> None:
    (problem,) = problems_of({"llm": {"max_attempts": "many"}})
    assert problem.startswith("llm.max_attempts: input should be a valid integer")


def test_bad_url_is_named() -> None:
    (problem,) = problems_of({"llm": {"base_url": "api.openai.com"}})
    assert problem.startswith("llm.base_url: must be an http(s) URL")
    (problem,) = problems_of({"store": {"url": "postgres://x"}})
    assert problem.startswith("store.url: must start with sqlite:/// or redis://")


def test_history_retention_defaults_to_90_days_and_0_keeps_it_forever() -> None:
    assert parse_settings({}).chat.history_retention_days == 90
    assert parse_settings({"chat": {"history_retention_days": 0}}).chat.history_retention_days == 0
    assert parse_settings({"chat": {"history_retention_days": 0.5}}).chat.history_retention_days
    (problem,) = problems_of({"chat": {"history_retention_days": -1}})
    assert problem.startswith("chat.history_retention_days: input should be greater than")


# ---- feishu.domain: only what the SDK will accept ---------------------------------------


def domain_problem(domain: str) -> str:
    (problem,) = problems_of({"feishu": {"domain": domain}})
    prefix = (
        "feishu.domain: must be https://open.feishu.cn or https://open.larksuite.com "
        "(or http:// for a local test server), got "
    )
    assert problem.startswith(prefix)
    return problem.removeprefix(prefix)


@pytest.mark.parametrize(
    ("written", "used"),
    [
        ("https://open.feishu.cn", "https://open.feishu.cn"),
        ("https://open.larksuite.com/", "https://open.larksuite.com"),
        ("HTTPS://Open.Feishu.CN:443", "https://open.feishu.cn:443"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("http://localhost:8123/", "http://localhost:8123"),
        ("http://[::1]:8123", "http://[::1]:8123"),
    ],
)
def test_a_feishu_domain_is_an_origin_the_sdk_accepts(written: str, used: str) -> None:
    domain = parse_settings({"feishu": {"domain": written}}).feishu.domain
    assert domain == used
    sdk_validate_domain(domain)


@pytest.mark.parametrize(
    ("domain", "reason"),
    [
        ("open.feishu.cn", "'open.feishu.cn': it must start with https://"),
        ("ftp://open.feishu.cn", "'ftp://open.feishu.cn': it must start with https://"),
        ("", "'': it is empty"),
        ("https://", "'https://': the host name is missing"),
        ("https://open feishu.cn", "'https://open feishu.cn': 'open feishu.cn' is not a host name"),
        (
            "https://open.feishu.cn:99999",
            "'https://open.feishu.cn:99999': it is not a valid URL "
            "(check the port and any [IPv6] address)",
        ),
        (
            "https://open.feishu.cn/open-apis",
            "'https://open.feishu.cn/open-apis': write only the scheme and host, "
            "without a path, '?' or '#'",
        ),
        (
            "https://open.feishu.cn?lang=zh",
            "'https://open.feishu.cn?lang=zh': write only the scheme and host, "
            "without a path, '?' or '#'",
        ),
        (
            "https://open.feishu.cn#top",
            "'https://open.feishu.cn#top': write only the scheme and host, "
            "without a path, '?' or '#'",
        ),
        (
            "http://open.feishu.cn",
            "'http://open.feishu.cn': http:// is only for a local server "
            "(127.0.0.1, ::1 or localhost)",
        ),
        (
            "http://127.0.0.2:8123",
            "'http://127.0.0.2:8123': http:// is only for a local server "
            "(127.0.0.1, ::1 or localhost)",
        ),
    ],
)
def test_a_feishu_domain_the_sdk_would_refuse_is_named_with_the_fix(
    domain: str, reason: str
) -> None:
    assert domain_problem(domain) == reason


def test_a_feishu_domain_with_credentials_is_refused_without_echoing_them() -> None:
    problem = domain_problem("https://app:s3cr3t-pw@open.feishu.cn")
    assert problem == (
        "'https://***@open.feishu.cn': credentials do not belong in the domain; "
        "remove the part before '@'"
    )
    broken = domain_problem("https://app:s3cr3t-pw@open.feishu.cn:99999/x")
    assert "s3cr3t" not in broken
    assert "app:" not in broken


# Mostly well-formed parts (repeated to weigh them) with every kind of flaw mixed in.
domains = st.tuples(
    st.sampled_from(["https", "https", "https", "http", "http", "HTTPS", "ftp", ""]),
    st.sampled_from(["://", "://", "://", "://", ":/", ":", ""]),
    st.sampled_from(["", "", "", "", "", "app:pw@", "@"]),
    st.one_of(
        st.sampled_from(["open.feishu.cn", "localhost", "LocalHost", "127.0.0.1", "[::1]"]),
        st.sampled_from(["127.0.0.2", "[fe80::1]", "[::1", "::1", "localhost.", "a..b", ""]),
        st.from_regex(r"[a-zA-Z0-9._ \-]{1,12}", fullmatch=True),
    ),
    st.sampled_from(["", "", "", ":443", ":8123", ":0", ":99999", ":x", ":"]),
    st.sampled_from(["", "", "", "/", "/", "//", "/open-apis", "?", "?q=1", "#f", " "]),
).map("".join)


@settings(max_examples=300)
@given(domains)
def test_every_feishu_domain_the_config_accepts_the_sdk_accepts_too(domain: str) -> None:
    try:
        settings = parse_settings({"feishu": {"domain": domain}})
    except ConfigError:
        return
    sdk_validate_domain(settings.feishu.domain)


def test_several_problems_give_one_line_each() -> None:
    problems = problems_of({"llm": {"max_attempts": 0, "request_timeout_s": -1}, "x": 1})
    assert len(problems) == 3


def test_no_keys_is_allowed_while_donations_are_accepted() -> None:
    assert parse_settings({"keys": {"accept_donations": True}}).llm.keys == []
    (problem,) = problems_of({"keys": {"accept_donations": False}})
    assert problem.startswith("llm.keys: no API key configured")


def test_environment_overrides_values_and_adds_keys(tmp_path: Path) -> None:
    path = write_settings(
        tmp_path / "s.yaml",
        {"feishu": {"app_id": "cli_file"}, "llm": {"keys": [{"key": "sk-file-0000000000001"}]}},
    )
    env = {
        "FEISHU_APP_ID": "cli_env",
        "FEISHU_APP_SECRET": "secret-from-env",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "BOT_STORE_URL": "sqlite:///other.db",
        "OPENAI_API_KEYS": "sk-env-a-000000000001, sk-env-b-000000000002,,sk-file-0000000000001",
    }
    settings = load_settings(path, env=env)
    assert settings.feishu.app_id == "cli_env"
    assert settings.feishu.app_secret.get_secret_value() == "secret-from-env"
    assert settings.llm.base_url == "http://127.0.0.1:9/v1"
    assert settings.store.url == "sqlite:///other.db"
    keys = [(entry.key.get_secret_value(), entry.owner) for entry in settings.llm.keys]
    assert keys == [
        ("sk-file-0000000000001", "config"),
        ("sk-env-a-000000000001", "env"),
        ("sk-env-b-000000000002", "env"),
    ]


def test_an_environment_value_with_a_bad_shape_names_its_field(tmp_path: Path) -> None:
    path = write_settings(tmp_path / "s.yaml", {})
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={"OPENAI_BASE_URL": "not a url"})
    assert caught.value.problems[0].startswith("llm.base_url: must be an http(s) URL")


def test_config_path_comes_from_flag_then_environment_then_default() -> None:
    assert resolve_config_path("a.yaml", env={"BOT_CONFIG": "b.yaml"}) == Path("a.yaml")
    assert resolve_config_path(None, env={"BOT_CONFIG": "b.yaml"}) == Path("b.yaml")
    assert resolve_config_path(None, env={}) == Path("settings.yaml")


def test_relative_sqlite_path_resolves_against_the_working_directory(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"url": "sqlite:///data/bot.db"}})
    assert settings.store.sqlite_path(tmp_path) == tmp_path / "data" / "bot.db"
    absolute = parse_settings({"store": {"url": "sqlite:////var/lib/bot.db"}})
    assert absolute.store.sqlite_path(tmp_path) == Path("/var/lib/bot.db")


def test_secrets_are_hidden_in_the_settings_repr() -> None:
    settings = parse_settings(
        {"feishu": {"app_secret": "s3cr3t-app-secret"}, "llm": {"keys": [{"key": "sk-hidden-1"}]}}
    )
    assert "s3cr3t" not in repr(settings)
    assert "sk-hidden" not in repr(settings)
    assert set(settings.secrets()) == {"s3cr3t-app-secret", "sk-hidden-1"}


# ---- the CLI as a user runs it --------------------------------------------------------------


def test_cli_missing_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_bot("run", "--config", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: nowhere.yaml: config file not found: copy the example settings.yaml from the "
        "repository, or pass --config PATH / set BOT_CONFIG"
    ]
    assert "Traceback" not in result.stderr


def test_cli_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("llm:\n  model: [unclosed\n", encoding="utf-8")
    result = run_bot("run", cwd=tmp_path)
    assert result.returncode == 2
    assert "settings.yaml: YAML syntax error at line 3, column 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_config_that_is_not_utf8_exits_2_with_one_line(tmp_path: Path) -> None:
    latin1 = "chat:\n  system_prompt: Caf\u00e9\n".encode("latin-1")  # é is the byte 0xe9
    (tmp_path / "settings.yaml").write_bytes(latin1)
    result = run_bot("run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: settings.yaml: is not UTF-8 text (byte 0xe9 at position 26): save it as UTF-8"
    ]
    assert "Traceback" not in result.stderr


def test_a_config_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xff\xfel\x00l\x00m\x00:\x00")  # saved as UTF-16 by an editor
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.problems == [
        f"{path}: is not UTF-8 text (byte 0xff at position 0): save it as UTF-8"
    ]


def test_cli_invalid_field_names_it_and_exits_2(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {"llm": {"keys": [{"key": "sk-a"}, {}]}})
    result = run_bot("chat", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: llm.keys[1].key: field required"


def test_cli_run_without_credentials_names_what_is_missing(tmp_path: Path) -> None:
    write_settings(tmp_path / "settings.yaml", {})
    result = run_bot("run", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: feishu.app_id: is empty: set it in settings.yaml or the ")
    assert lines[1].startswith("error: feishu.app_secret: is empty")
    assert "Traceback" not in result.stderr


def test_cli_reads_the_config_named_by_bot_config(tmp_path: Path) -> None:
    write_settings(tmp_path / "elsewhere.yaml", {"llm": {"max_attempts": "x"}})
    result = run_bot("run", cwd=tmp_path, env=bot_environment(BOT_CONFIG="elsewhere.yaml"))
    assert result.returncode == 2
    assert "llm.max_attempts" in result.stderr


@pytest.mark.parametrize("command", ["run", "chat", "doctor", "keys"])
def test_every_subcommand_has_complete_help(command: str, tmp_path: Path) -> None:
    result = run_bot(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--config", "--log-level", "--json-logs"):
        assert option in result.stdout
    assert "FEISHU_APP_SECRET" in result.stdout


# ---- personas, models and access ------------------------------------------------------------


def test_persona_settings_name_their_problems() -> None:
    assert problems_of({"chat": {"personas": {"default": {"system": "x"}}}}) == [
        "chat.personas: persona name 'default' is reserved for /role default"
    ]
    assert problems_of({"chat": {"personas": {"two words": {"system": "x"}}}})[0].startswith(
        "chat.personas: persona name 'two words' must be one word"
    )
    assert problems_of({"chat": {"personas": {"poet": {"description": "no prompt"}}}}) == [
        "chat.personas.poet.system: field required"
    ]
    assert problems_of(
        {"chat": {"personas": {"poet": {"system": "x", "examples": [["only a question"]]}}}}
    )[0].startswith("chat.personas.poet.examples[0]")
    assert problems_of({"chat": {"personas": {"Poet": {"system": "x"}, "poet": None}}}) == [
        "chat.personas: persona name 'poet' is given twice (names ignore case)"
    ]


def test_group_personas_must_name_a_persona_in_effect() -> None:
    assert parse_settings({"chat": {"group_personas": {"oc_1": "Teacher"}}})
    assert parse_settings({"chat": {"group_personas": {"oc_1": "default"}}})
    problems = problems_of(
        {"chat": {"personas": {"teacher": None}, "group_personas": {"oc_1": "teacher"}}}
    )
    assert len(problems) == 1
    assert problems[0].startswith("chat.group_personas.oc_1: unknown persona 'teacher' (known: ")


def test_models_and_access_lists_are_cleaned_and_checked() -> None:
    settings = parse_settings({"llm": {"model": "a", "models": [" b ", "a", "b"]}})
    assert settings.llm.choosable_models() == ["a", "b"]
    assert problems_of({"llm": {"models": [""]}}) == ["llm.models: a model name must not be empty"]
    assert problems_of({"access": {"allow": ["ou_1", " "]}}) == [
        "access.allow: an id must not be empty"
    ]
    assert problems_of({"access": {"daily_tokens_per_user": -1}})[0].startswith(
        "access.daily_tokens_per_user:"
    )
    assert problems_of({"chat": {"max_input_chars": 0}})[0].startswith("chat.max_input_chars:")


# ---- ops.http: loopback only ---------------------------------------------------------------


def test_the_health_and_metrics_endpoints_are_off_by_default() -> None:
    assert parse_settings({}).ops.http == ""
    assert parse_settings({}).ops.address() is None


@pytest.mark.parametrize(
    ("written", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:1", ("localhost", 1)),
        ("LocalHost:65535", ("localhost", 65535)),
        ("[::1]:9464", ("::1", 9464)),
        (" 127.0.0.1:9464 ", ("127.0.0.1", 9464)),
    ],
)
def test_ops_http_listens_on_a_loopback_address(written: str, address: tuple[str, int]) -> None:
    assert parse_settings({"ops": {"http": written}}).ops.address() == address


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "[::]", "example.com", "127.0.0.2"])
def test_ops_http_on_any_other_interface_is_refused_with_the_reason(host: str) -> None:
    (problem,) = problems_of({"ops": {"http": f"{host}:9464"}})
    shown = host.strip("[]")
    assert problem == (
        f"ops.http: {shown!r} is not a loopback address: the health and metrics endpoints show "
        "the bot's internals, so they listen only on 127.0.0.1, ::1 or localhost; to reach them "
        "from elsewhere, put a reverse proxy (with authentication) in front"
    )


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("127.0.0.1", "the port is missing"),
        ("9464", "the port is missing"),
        ("127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("127.0.0.1:65536", "the port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "the port must be a number from 1 to 65535"),
        ("127.0.0.1:９４６４", "the port must be a number from 1 to 65535"),
        ("::1:9464", "write an IPv6 address as [::1]:9464"),
        ("http://127.0.0.1:9464", "write only host:port, without http://"),
    ],
)
def test_a_malformed_ops_http_says_what_to_write(written: str, reason: str) -> None:
    (problem,) = problems_of({"ops": {"http": written}})
    assert problem == (
        'ops.http: must be host:port on a loopback address, e.g. 127.0.0.1:9464, or "" (off), '
        f"got {written!r}: {reason}"
    )


# ---- chat.footer ---------------------------------------------------------------------------


def test_the_answer_footer_is_short_by_default_and_may_be_full_or_off() -> None:
    assert parse_settings({}).chat.footer == "short"
    for mode in ("off", "short", "full"):
        assert parse_settings({"chat": {"footer": mode}}).chat.footer == mode
    (problem,) = problems_of({"chat": {"footer": "long"}})
    assert problem.startswith("chat.footer: input should be 'off', 'short' or 'full'")


@pytest.mark.parametrize(
    ("llm", "model"),
    [
        ({}, "whisper-1"),  # OpenAI's endpoint transcribes
        ({"base_url": "https://api.deepseek.com/v1"}, None),  # others: Feishu's speech-to-text
        (
            {"base_url": "https://api.deepseek.com/v1", "transcription_model": "sensevoice"},
            "sensevoice",
        ),
        ({"transcription_model": ""}, None),  # "" = never the endpoint
        ({"transcription_model": "  "}, None),
    ],
)
def test_the_transcription_model_defaults_to_whisper_on_openai_only(
    llm: dict[str, str], model: str | None
) -> None:
    assert parse_settings({"llm": llm}).llm.speech_model() == model


@pytest.mark.parametrize(
    ("section", "values", "problem"),
    [
        ("chat", {"attachment_hold_minutes": 0}, "chat.attachment_hold_minutes: input should be"),
        ("chat", {"max_file_mb": 0}, "chat.max_file_mb: input should be greater than 0"),
        ("chat", {"max_voice_seconds": 601}, "chat.max_voice_seconds: input should be less than"),
        ("access", {"daily_images_per_user": -1}, "access.daily_images_per_user: input should be"),
        ("media", {"formulas": "sometimes"}, "media.formulas: input should be a valid boolean"),
        ("media", {"images": True}, "media.images: unknown key"),
    ],
)
def test_media_settings_are_checked_and_name_their_field(
    section: str, values: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({section: values})
    assert any(line.startswith(problem) for line in error.value.problems), error.value.problems
