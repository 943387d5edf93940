"""Settings: the pydantic schema of ``settings.yaml``, environment overrides and readable errors.

Loading order: the YAML file (``--config PATH``, else ``$BOT_CONFIG``, else ``./settings.yaml``),
then environment variables on top (``FEISHU_APP_ID``, ``FEISHU_APP_SECRET``, ``OPENAI_BASE_URL``,
``BOT_STORE_URL`` replace values; ``OPENAI_API_KEYS="sk-a,sk-b"`` adds keys). Every problem becomes
one line naming the field (``llm.keys[1].key: field required``) inside a :class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("settings.yaml")
CONFIG_ENV = "BOT_CONFIG"

LogLevel = Literal["debug", "info", "warning", "error"]
#: what is written under an answer: nothing, the model and the time, or tokens and key too
FooterMode = Literal["off", "short", "full"]


class _Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL like https://example.com, got {value!r}")
    return value.rstrip("/")


_DOMAIN_ADVICE = (
    "must be https://open.feishu.cn or https://open.larksuite.com "
    "(or http:// for a local test server)"
)
# The SDK (lark_oapi.client._validate_domain) allows http:// for exactly these hosts, so the
# config does too: a wider rule here would pass a domain the SDK then refuses at connect time.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")
_USERINFO = re.compile(r"[^/?#@]*@")  # "user:password@", even in a URL too broken to parse


def _check_feishu_domain(value: str) -> str:
    """An origin the Feishu SDK accepts: ``https://host[:port]``, or http:// on loopback.

    Returns it normalised (lower-case scheme and host, no trailing slash), which is what the
    SDK is given. Errors never echo a ``user:password@`` part.
    """
    shown = _USERINFO.sub("***@", value)

    def problem(reason: str) -> ValueError:
        return ValueError(f"{_DOMAIN_ADVICE}, got {shown!r}: {reason}")

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # its text may quote a password-like fragment: say it in our words
        raise problem("it is not a valid URL (check the port and any [IPv6] address)") from None
    if not value:
        raise problem("it is empty")
    if parts.scheme not in ("http", "https"):
        raise problem("it must start with https://")
    if "@" in parts.netloc:
        raise problem("credentials do not belong in the domain; remove the part before '@'")
    host = parts.hostname or ""
    if not host:
        raise problem("the host name is missing")
    if not (_HOST_NAME.fullmatch(host) or _is_ipv6(host)):
        raise problem(f"{host!r} is not a host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise problem("write only the scheme and host, without a path, '?' or '#'")
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise problem("http:// is only for a local server (127.0.0.1, ::1 or localhost)")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return SplitResult(parts.scheme, netloc, "", "", "").geturl()


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


class FeishuSettings(_Section):
    """The Feishu/Lark app the bot logs in as."""

    app_id: str = ""
    app_secret: SecretStr = SecretStr("")
    domain: str = "https://open.feishu.cn"
    connect_timeout_s: float = Field(default=20, gt=0)
    shutdown_grace_s: float = Field(default=10, ge=0)
    reconnect_timeout_s: float = Field(default=600, gt=0)
    redelivery_minutes: float = Field(default=60, ge=0, le=24 * 60)

    _domain_is_origin = field_validator("domain")(_check_feishu_domain)


class KeyEntry(_Section):
    """One API key of the pool, as written in settings.yaml."""

    key: SecretStr
    owner: str = "config"
    enabled: bool = True

    @field_validator("key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return SecretStr(value.get_secret_value().strip())


class LLMSettings(_Section):
    """The OpenAI-compatible endpoint and the keys used to call it."""

    base_url: str = "https://api.openai.com/v1"
    model: str = Field(default="gpt-4o-mini", min_length=1)
    models: list[str] = Field(default_factory=list)
    keys: list[KeyEntry] = Field(default_factory=list)
    request_timeout_s: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=4, ge=1, le=20)
    max_wait_s: float = Field(default=30, ge=0)
    #: whether the model reads images (they are sent as image parts of the question)
    vision: bool = False
    #: the speech-to-text model of the endpoint's ``audio/transcriptions``; unset: ``whisper-1``
    #: on api.openai.com, else none (voice then goes to Feishu's speech-to-text); "" turns it off
    transcription_model: str | None = None
    #: the model ``/draw`` asks the endpoint's ``images/generations`` for ("" turns /draw off)
    image_model: str = "gpt-image-1"

    _base_url_is_url = field_validator("base_url")(_check_http_url)

    def speech_model(self) -> str | None:
        """The transcription model to use, or None when the endpoint does not transcribe."""
        if self.transcription_model is not None:
            return self.transcription_model.strip() or None
        if urlsplit(self.base_url).hostname == "api.openai.com":
            return "whisper-1"
        return None

    @field_validator("models")
    @classmethod
    def _models_named(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if any(not name for name in names):
            raise ValueError("a model name must not be empty")
        return list(dict.fromkeys(names))

    def choosable_models(self) -> list[str]:
        """The models a user may pick with ``/model``: ``model`` first, then ``models``."""
        return list(dict.fromkeys([self.model, *self.models]))


#: persona names that are words of ``/role`` itself
RESERVED_PERSONA_NAMES = frozenset({"default", "custom", "默认", "自定义"})
_PERSONA_NAME = re.compile(r"[\w-]{1,32}")


class PersonaSettings(_Section):
    """A named persona: its own system prompt, few-shot examples and optional overrides."""

    description: str = ""
    system: str = Field(min_length=1)
    examples: list[tuple[str, str]] = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0, le=2)
    model: str | None = Field(default=None, min_length=1)


class ChatSettings(_Section):
    """How conversations behave."""

    system_prompt: str = "You are a helpful assistant."
    max_history_tokens: int = Field(default=6000, ge=100)
    idle_reset_minutes: int = Field(default=720, ge=0)
    max_input_chars: int = Field(default=8000, ge=1)
    personas: dict[str, PersonaSettings | None] = Field(default_factory=dict)
    group_personas: dict[str, str] = Field(default_factory=dict)
    group_requires_mention: bool = True
    merge_burst_ms: int = Field(default=0, ge=0, le=10_000)
    stream_update_ms: int = Field(default=300, ge=50, le=10_000)
    resume_within_minutes: float = Field(default=10, ge=0)
    history_retention_days: float = Field(default=90, ge=0)
    footer: FooterMode = "short"
    #: how long an image or file sent alone waits for the question that goes with it
    attachment_hold_minutes: float = Field(default=10, gt=0, le=24 * 60)
    #: the largest file, image or voice message the bot downloads, in megabytes
    max_file_mb: float = Field(default=10, gt=0, le=100)
    #: the longest voice message the bot transcribes, in seconds
    max_voice_seconds: float = Field(default=60, gt=0, le=600)

    @field_validator("personas")
    @classmethod
    def _persona_names(
        cls, value: dict[str, PersonaSettings | None]
    ) -> dict[str, PersonaSettings | None]:
        seen: set[str] = set()
        for name in value:
            if not _PERSONA_NAME.fullmatch(name):
                raise ValueError(
                    f"persona name {name!r} must be one word of letters, digits, '-' or '_' "
                    "(at most 32), so that it can be typed after /role"
                )
            if name.lower() in RESERVED_PERSONA_NAMES:
                raise ValueError(f"persona name {name!r} is reserved for /role {name.lower()}")
            if name.lower() in seen:
                raise ValueError(f"persona name {name!r} is given twice (names ignore case)")
            seen.add(name.lower())
        return value


class AccessSettings(_Section):
    """Who may use the bot and how much."""

    admins: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    daily_requests_per_user: int = Field(default=0, ge=0)
    daily_tokens_per_user: int = Field(default=0, ge=0)
    daily_images_per_user: int = Field(default=10, ge=0)

    @field_validator("admins", "allow")
    @classmethod
    def _ids_stripped(cls, value: list[str]) -> list[str]:
        ids = [each.strip() for each in value]
        if any(not each for each in ids):
            raise ValueError("an id must not be empty")
        return ids


class KeysSettings(_Section):
    """The shared key pool: donations by chat, preferences, health checks."""

    accept_donations: bool = True
    owner_first: bool = False
    reserved_for: dict[str, list[str]] = Field(default_factory=dict)
    health_check_minutes: float = Field(default=30, ge=0)


class MediaSettings(_Section):
    """What the bot does with media beyond reading text."""

    #: render LaTeX formulas of finished answers as images in the card
    formulas: bool = True


class StoreSettings(_Section):
    """Where history, keys, dedup marks and the inbox live."""

    url: str = "sqlite:///data/bot.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme == "sqlite":
            if not value.startswith("sqlite:///") or value == "sqlite:///":
                raise ValueError(
                    "a sqlite URL needs a path: sqlite:///data/bot.db (relative) "
                    "or sqlite:////var/lib/bot/bot.db (absolute)"
                )
            return value
        if scheme in ("redis", "rediss"):
            return value
        raise ValueError(f"must start with sqlite:/// or redis://, got {value!r}")

    def sqlite_path(self, cwd: Path | None = None) -> Path:
        """The database file of a ``sqlite:///`` URL; a relative path resolves against ``cwd``."""
        raw = self.url.removeprefix("sqlite:///")
        path = Path(raw)
        return path if path.is_absolute() else (cwd or Path.cwd()) / path


_OPS_ADVICE = 'must be host:port on a loopback address, e.g. 127.0.0.1:9464, or "" (off)'


def _split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``, checked to be on loopback; raise ValueError saying why."""
    if "://" in value or "/" in value:
        raise ValueError(f"{_OPS_ADVICE}, got {value!r}: write only host:port, without http://")
    if value.startswith("["):
        host, bracket, port_text = value[1:].partition("]:")
        if not bracket:
            raise ValueError(f"{_OPS_ADVICE}, got {value!r}: write an IPv6 address as [::1]:9464")
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{_OPS_ADVICE}, got {value!r}: the port is missing")
        if ":" in host:
            raise ValueError(f"{_OPS_ADVICE}, got {value!r}: write an IPv6 address as [::1]:9464")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_OPS_ADVICE}, got {value!r}: the port must be a number from 1 to 65535")
    host = host.lower()
    if host not in _LOOPBACK_HOSTS:
        raise ValueError(
            f"{host!r} is not a loopback address: the health and metrics endpoints show the "
            "bot's internals, so they listen only on 127.0.0.1, ::1 or localhost; to reach them "
            "from elsewhere, put a reverse proxy (with authentication) in front"
        )
    return host, int(port_text)


class OpsSettings(_Section):
    """Operations: the optional health and metrics endpoints (off by default)."""

    http: str = ""

    @field_validator("http")
    @classmethod
    def _loopback_address(cls, value: str) -> str:
        value = value.strip()
        if value:
            _split_host_port(value)
        return value

    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to listen on, or None when the endpoints are off."""
        return _split_host_port(self.http) if self.http else None


class LogSettings(_Section):
    """Logging output."""

    level: LogLevel = "info"
    json_: bool = Field(default=False, alias="json")
    sdk_level: LogLevel = "info"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Settings(_Section):
    """The whole of settings.yaml."""

    feishu: FeishuSettings = Field(default_factory=FeishuSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    keys: KeysSettings = Field(default_factory=KeysSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _group_personas_exist(self) -> Settings:
        from bot.chat.personas import persona_names  # the built-ins live with the personas

        known = persona_names(self.chat)
        for chat_id, name in self.chat.group_personas.items():
            if name.lower() not in known and name.lower() != "default":
                choices = ", ".join(sorted(known)) or "none"
                raise ValueError(
                    f"chat.group_personas.{chat_id}: unknown persona {name!r} (known: {choices})"
                )
        return self

    @model_validator(mode="after")
    def _some_key_or_donations(self) -> Settings:
        if not self.llm.keys and not self.keys.accept_donations:
            raise ValueError(
                "llm.keys: no API key configured and keys.accept_donations is false: "
                "add keys under llm.keys, set OPENAI_API_KEYS, or allow donations"
            )
        return self

    def secrets(self) -> list[str]:
        """Every secret value in these settings, for the log redactor."""
        values = [self.feishu.app_secret.get_secret_value()]
        values += [entry.key.get_secret_value() for entry in self.llm.keys]
        return [value for value in values if value]

    def require_feishu_credentials(self) -> None:
        """Raise a :class:`ConfigError` when the app credentials needed to connect are missing."""
        problems = []
        if not self.feishu.app_id.strip():
            problems.append(
                "feishu.app_id: is empty: set it in settings.yaml or the FEISHU_APP_ID "
                "environment variable (Feishu developer console → your app → Credentials)"
            )
        if not self.feishu.app_secret.get_secret_value().strip():
            problems.append(
                "feishu.app_secret: is empty: set it in settings.yaml or the "
                "FEISHU_APP_SECRET environment variable"
            )
        if problems:
            raise ConfigError(problems)


def resolve_config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--config`` if given, else ``$BOT_CONFIG``, else ``./settings.yaml``."""
    env = os.environ if env is None else env
    if cli_path:
        return Path(cli_path)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read, merge with the environment and validate the settings; raise :class:`ConfigError`."""
    env = os.environ if env is None else env
    raw = _read_yaml(path)
    _apply_env(raw, env)
    return parse_settings(raw, source=str(path))


def parse_settings(raw: Any, source: str = "settings") -> Settings:
    """Validate an already-parsed mapping; raise :class:`ConfigError` naming each bad field."""
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections"])
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise ConfigError(
            [
                f"{path}: is not UTF-8 text (byte 0x{byte:02x} at position {exc.start}): "
                "save it as UTF-8"
            ]
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            [
                f"{path}: config file not found: copy the example settings.yaml from the "
                "repository, or pass --config PATH / set BOT_CONFIG"
            ]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError([f"{path}: YAML syntax error at {where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax error: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


_ENV_REPLACEMENTS: dict[str, tuple[str, str]] = {
    "FEISHU_APP_ID": ("feishu", "app_id"),
    "FEISHU_APP_SECRET": ("feishu", "app_secret"),
    "OPENAI_BASE_URL": ("llm", "base_url"),
    "BOT_STORE_URL": ("store", "url"),
}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Put environment values into the raw mapping so validation names their field too."""
    for variable, (section, field) in _ENV_REPLACEMENTS.items():
        value = env.get(variable, "").strip()
        if not value:
            continue
        target = raw.setdefault(section, {})
        if isinstance(target, dict):
            target[field] = value
    extra_keys = [key.strip() for key in env.get("OPENAI_API_KEYS", "").split(",") if key.strip()]
    if extra_keys:
        llm = raw.setdefault("llm", {})
        if isinstance(llm, dict):
            keys = llm.get("keys") or []
            if isinstance(keys, list):
                known = {entry.get("key") for entry in keys if isinstance(entry, dict)}
                keys += [{"key": key, "owner": "env"} for key in extra_keys if key not in known]
                llm["keys"] = keys


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        location = _format_location(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key (check the spelling against the configuration reference)"
        elif kind == "missing":
            message = "field required"
        else:
            message = str(error["msg"])
            message = message.removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
        if not location and ":" in message:
            problems.append(message)  # model-level checks already name their field
        else:
            problems.append(f"{location or 'settings'}: {message}")
    return problems


def _format_location(location: Sequence[int | str]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
