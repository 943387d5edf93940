"""Doctor's Feishu REST checks: credentials and platform, the bot feature, the granted scopes.

Plain ``httpx`` calls rather than the SDK: doctor needs Feishu's raw ``code`` and ``msg`` to say
what is wrong, a short timeout, and no process-wide token cache. The codes read here, and where
they come from:

* ``POST /open-apis/auth/v3/tenant_access_token/internal`` has no error table of its own (its
  page points at the generic one). Observed answers, all with HTTP 200: ``10014`` "app secret
  invalid" for a wrong secret, ``10014`` "app id not exists" for a well-formed app id the
  platform does not know (a Lark app asked on Feishu's domain, or the reverse), ``10003``
  "invalid param" for a malformed or empty one (live probes recorded in excitedjs/dreamux#417;
  ``10014`` "app secret invalid" also in many public reports). The two ``10014`` cases differ
  only in ``msg``, so the wording decides between them. When the app id is unknown, the other
  platform is asked about it with a dummy secret (never the real one): "app secret invalid"
  there means the app lives there.
* ``GET /open-apis/bot/v3/info``: ``11205`` "app do not have bot" when the bot feature is off
  (whatwewant/chatgpt-for-chatbot-feishu#20); otherwise ``bot.activate_status``, ``2`` meaning
  enabled in the tenant (Feishu's "获取机器人信息" page lists 0-6).
* ``GET /open-apis/application/v6/scopes``: ``data.scopes[]`` of ``scope_name`` and
  ``grant_status`` (``1`` granted, ``2`` not granted), the scopes the app requested; ``212100``
  "app not install" (Feishu's "查询租户授权状态" page).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx

from bot.config import AccessSettings, FeishuSettings
from bot.doctor import console
from bot.doctor.console import ADD_BOT, CREDENTIALS, FEISHU_DOMAIN, LARK_DOMAIN, PERMISSIONS
from bot.doctor.report import Result
from bot.doctor.scopes import REQUIRED_SCOPES, USER_ID_SCOPE, NeededScope, user_id_entries

TOKEN_PATH: Final = "/open-apis/auth/v3/tenant_access_token/internal"  # noqa: S105
BOT_INFO_PATH: Final = "/open-apis/bot/v3/info"
SCOPES_PATH: Final = "/open-apis/application/v6/scopes"

CODE_INVALID_PARAM: Final = 10003
CODE_BAD_CREDENTIALS: Final = 10014
CODE_NO_BOT: Final = 11205
CODE_APP_NOT_INSTALLED: Final = 212100
BOT_ENABLED: Final = 2
GRANTED: Final = 1
PROBE_SECRET: Final = "doctor-probe"  # noqa: S105 (deliberately wrong: asks only whether the app id exists)
"""Sent to the other platform instead of the real secret when asking whether it knows the app."""

_BOT_STATES: Final[Mapping[int, str]] = {
    0: "not installed in the tenant yet",
    1: "disabled by the tenant",
    3: "installed but not enabled yet",
    4: "upgraded but not enabled yet",
    5: "stopped: the tenant's license expired",
    6: "stopped: the tenant's Lark plan expired or was downgraded",
}

NAME_APP: Final = "feishu app"
NAME_BOT: Final = "bot"
NAME_SCOPES: Final = "scopes"


class NoAnswer(Exception):
    """A request got no HTTP answer: network error, refused connection, timeout."""


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of the open platform: status and JSON body (None when not JSON)."""

    status: int
    body: dict[str, Any] | None

    @property
    def code(self) -> int | None:
        """Feishu's ``code``; None when the body has none (not the open platform)."""
        code = (self.body or {}).get("code")
        return code if isinstance(code, int) else None

    @property
    def msg(self) -> str:
        """Feishu's ``msg``, shortened."""
        return str((self.body or {}).get("msg", ""))[:200]

    @property
    def label(self) -> str:
        """``code: msg`` as quoted in problems (``HTTP status`` when there is no code)."""
        if self.code is None:
            return f"HTTP {self.status}"
        return f"{self.code}: {self.msg}" if self.msg else str(self.code)

    @property
    def with_status(self) -> str:
        """:attr:`label` with the HTTP status."""
        return self.label if self.code is None else f"{self.label}, HTTP {self.status}"


async def request(http: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Answer:
    """Send a request; raise :class:`NoAnswer` (with a short reason) when none comes."""
    try:
        response = await http.request(method, url, **kwargs)
    except httpx.TimeoutException:
        raise NoAnswer(f"no answer within {_timeout_of(http)} s") from None
    except httpx.HTTPError as exc:
        raise NoAnswer(f"{type(exc).__name__}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    return Answer(response.status_code, body if isinstance(body, dict) else None)


def _timeout_of(http: httpx.AsyncClient) -> str:
    seconds = http.timeout.read or http.timeout.connect
    return f"{seconds:g}" if seconds is not None else "?"


def network_fix(domain: str) -> str:
    """The fix when Feishu cannot be reached at all."""
    return (
        f"check the network and any proxy (HTTPS_PROXY), and feishu.domain ({domain}): "
        f"{FEISHU_DOMAIN} for Feishu, {LARK_DOMAIN} for Lark"
    )


# ---- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCheck:
    """The credentials check: its result, and the tenant token when one was issued."""

    result: Result
    token: str | None


async def check_tenant_token(
    http: httpx.AsyncClient, feishu: FeishuSettings, *, counterpart: str | None
) -> TokenCheck:
    """Ask for a tenant token: proves the app id, the secret and the platform (domain) match.

    ``counterpart`` is the other platform's domain, asked whether it knows the app id when this
    one does not (None: do not ask).
    """
    domain, app_id = feishu.domain, feishu.app_id
    body = {"app_id": app_id, "app_secret": feishu.app_secret.get_secret_value()}
    try:
        answer = await request(http, "POST", domain + TOKEN_PATH, json=body)
    except NoAnswer as exc:
        problem = f"cannot reach {domain}: {exc}"
        return TokenCheck(Result.fail(NAME_APP, problem, network_fix(domain)), None)
    if answer.status >= 500 and answer.code != 0:
        problem = f"{domain} could not issue a tenant token right now ({answer.label})"
        fix = "try again in a minute; if it persists, check Feishu's status page"
        return TokenCheck(Result.fail(NAME_APP, problem, fix), None)
    if answer.code is None:
        return TokenCheck(_not_the_open_platform(domain, answer), None)
    if answer.code == 0:
        token = (answer.body or {}).get("tenant_access_token")
        if isinstance(token, str) and token:
            expire = (answer.body or {}).get("expire")
            valid = f" (valid {expire} s)" if isinstance(expire, int) else ""
            detail = f"{domain} issued a tenant token for {app_id}{valid}"
            return TokenCheck(Result.ok(NAME_APP, detail), token)
        return TokenCheck(_not_the_open_platform(domain, answer), None)
    msg = answer.msg.lower()
    if answer.code == CODE_BAD_CREDENTIALS and "secret" in msg:
        problem = f"Feishu rejected the App Secret of {app_id} ({answer.label})"
        fix = (
            f"copy the App Secret again from {console.page(domain, CREDENTIALS)} into "
            "FEISHU_APP_SECRET (or feishu.app_secret); after a reset there only the new one works"
        )
        return TokenCheck(Result.fail(NAME_APP, problem, fix), None)
    if answer.code in (CODE_BAD_CREDENTIALS, CODE_INVALID_PARAM):
        known_there = await _knows_app(http, counterpart, app_id) if counterpart else None
        return TokenCheck(_unknown_app(feishu, answer, counterpart, known_there=known_there), None)
    problem = f"Feishu refused the app credentials ({answer.label})"
    fix = f"copy the App ID and App Secret again from {console.page(domain, CREDENTIALS)}"
    return TokenCheck(Result.fail(NAME_APP, problem, fix), None)


def _not_the_open_platform(domain: str, answer: Answer) -> Result:
    what = "JSON without a tenant token" if answer.body is not None else "no JSON"
    problem = (
        f"{domain} does not answer like the Feishu open platform (HTTP {answer.status}, {what})"
    )
    fix = f"set feishu.domain to {FEISHU_DOMAIN} (Feishu) or {LARK_DOMAIN} (Lark)"
    return Result.fail(NAME_APP, problem, fix)


def _unknown_app(
    feishu: FeishuSettings, answer: Answer, counterpart: str | None, *, known_there: bool | None
) -> Result:
    domain, app_id = feishu.domain, feishu.app_id
    other = counterpart or console.other_platform(domain)
    if known_there:
        problem = f"{app_id} is not an app of {domain} ({answer.label}) but of {other}"
        fix = f"set `feishu.domain: {other}` in settings.yaml"
        return Result.fail(NAME_APP, problem, fix)
    problem = f"{domain} does not know the App ID {app_id} ({answer.label})"
    fix = (
        f"copy the App ID (cli_…) again from {console.page(domain, CREDENTIALS)}; if the app "
        f"was made on the other platform, set `feishu.domain: {other}` in settings.yaml"
    )
    return Result.fail(NAME_APP, problem, fix)


async def _knows_app(http: httpx.AsyncClient, domain: str, app_id: str) -> bool | None:
    """Whether the platform at ``domain`` knows ``app_id`` (None: it did not say).

    Sends a dummy secret, never the real one: "app secret invalid" means the app id exists.
    """
    try:
        answer = await request(
            http, "POST", domain + TOKEN_PATH, json={"app_id": app_id, "app_secret": PROBE_SECRET}
        )
    except NoAnswer:
        return None
    if answer.code == 0 or (answer.code == CODE_BAD_CREDENTIALS and "secret" in answer.msg.lower()):
        return True
    if answer.code in (CODE_BAD_CREDENTIALS, CODE_INVALID_PARAM):
        return False
    return None


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- the bot feature ---------------------------------------------------------------------------


async def check_bot(http: httpx.AsyncClient, domain: str, token: str) -> Result:
    """The app has the bot feature and is enabled in the tenant."""
    publish = console.page(domain, console.PUBLISH)
    try:
        answer = await request(http, "GET", domain + BOT_INFO_PATH, headers=_bearer(token))
    except NoAnswer as exc:
        return Result.fail(NAME_BOT, f"cannot reach {domain}: {exc}", network_fix(domain))
    bot = (answer.body or {}).get("bot")
    if answer.code == CODE_NO_BOT:
        problem = f"the app has no bot feature ({answer.label})"
        fix = f"{console.page(domain, ADD_BOT)}, then {console.PUBLISH}"
        return Result.fail(NAME_BOT, problem, fix)
    if answer.code != 0 or not isinstance(bot, dict):
        problem = f"Feishu could not describe the bot ({answer.with_status})"
        fix = f"turn the bot feature on ({console.page(domain, ADD_BOT)}), then {console.PUBLISH}"
        return Result.fail(NAME_BOT, problem, fix)
    name = str(bot.get("app_name") or "the bot")
    state = bot.get("activate_status")
    if state == BOT_ENABLED:
        return Result.ok(NAME_BOT, f"{name} is enabled (its open_id is {bot.get('open_id')})")
    described = _BOT_STATES.get(state, "not enabled") if isinstance(state, int) else "not enabled"
    problem = f"{name} is {described} (activate_status {state})"
    if state in (1, 5, 6):
        fix = (
            "ask the tenant admin to enable the app again "
            "(admin console 管理后台 → Workplace 工作台 → App management 应用管理)"
        )
    else:
        fix = publish
    return Result.fail(NAME_BOT, problem, fix)


# ---- scopes ------------------------------------------------------------------------------------


async def check_scopes(
    http: httpx.AsyncClient,
    domain: str,
    token: str,
    access: AccessSettings,
    media: Sequence[NeededScope] = (),
) -> list[Result]:
    """Every scope the configured features need is granted; one result per missing scope (a
    warning for the ``media`` scopes, without which only media degrade)."""
    try:
        answer = await request(http, "GET", domain + SCOPES_PATH, headers=_bearer(token))
    except NoAnswer as exc:
        return [_unreadable(domain, str(exc))]
    if answer.code == CODE_APP_NOT_INSTALLED:
        problem = f"the app is not installed in your tenant ({answer.label})"
        return [Result.fail(NAME_SCOPES, problem, console.page(domain, console.PUBLISH))]
    scopes = ((answer.body or {}).get("data") or {}).get("scopes")
    if answer.code != 0 or not isinstance(scopes, list):
        return [_unreadable(domain, answer.with_status)]
    requested: set[str] = set()
    granted: set[str] = set()
    for scope in scopes:
        if not isinstance(scope, dict) or not isinstance(scope.get("scope_name"), str):
            continue
        name = scope["scope_name"]
        requested.add(name)
        if scope.get("grant_status") == GRANTED and scope.get("scope_type") in (None, "", "tenant"):
            granted.add(name)

    needed = list(REQUIRED_SCOPES)
    user_ids = user_id_entries(access)
    if user_ids:
        needed.append(USER_ID_SCOPE)
    results = [
        _missing(domain, scope, requested, user_ids if scope is USER_ID_SCOPE else [])
        for scope in needed
        if scope.name not in granted
    ]
    if not results:
        results.append(
            Result.ok(NAME_SCOPES, f"all {len(needed)} scopes the bot needs are granted")
        )
    for scope in media:
        if scope.name not in granted:
            missing = _missing(domain, scope, requested, [])
            results.append(Result.warn(missing.name, missing.detail, missing.fix))
    if not user_ids and USER_ID_SCOPE.name not in granted:
        note = (
            f"{USER_ID_SCOPE.name} is not granted; not needed while access.allow and "
            "access.admins name only open_ids (ou_…) and chat ids (oc_…)"
        )
        results.append(Result.warn(NAME_SCOPES, note))
    return results


def _missing(domain: str, scope: NeededScope, requested: set[str], user_ids: list[str]) -> Result:
    why = scope.breaks
    if user_ids:
        shown = ", ".join(user_ids[:3]) + (" …" if len(user_ids) > 3 else "")
        why += f" (access lists name user_ids: {shown})"
    if scope.name in requested:
        problem = f"requested but not granted yet: {why}"
        fix = f"publish a version that includes it: {console.page(domain, console.PUBLISH)}"
    else:
        problem = f"not added: {why}"
        fix = f"{console.page(domain, PERMISSIONS)} → add {scope.name}, then {console.PUBLISH}"
    return Result.fail(f"scope {scope.name}", problem, fix)


def _unreadable(domain: str, why: str) -> Result:
    note = f"could not read the granted scopes ({why}): not checked"
    fix = f"compare {console.page(domain, PERMISSIONS)} with the README's permission table"
    return Result.warn(NAME_SCOPES, note, fix)
