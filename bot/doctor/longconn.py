"""Doctor's long-connection check: the endpoint discovery answers and a WebSocket opens.

Does what ``lark_oapi/ws/client.py`` (1.7.5) does before it starts receiving, and no more:
``POST {domain}/callback/ws/endpoint`` with ``{"AppID", "AppSecret"}`` → ``{code, msg, data:
{URL, ClientConfig}}`` (code ``0`` success; ``1`` "system busy" and ``1000040343`` internal error
are Feishu's trouble; any other code refuses the app), then a bare WebSocket handshake to that
URL, closed at once. The SDK's own client is not started: it cannot be stopped in-process.

A refused handshake carries ``handshake-status`` / ``handshake-msg`` headers (SDK
``_parse_ws_conn_exception``): ``403`` is a refusal of the app; ``514`` with
``handshake-autherrcode: 1000040350`` means the app already has as many long connections as
Feishu allows; other ``514`` codes are passing trouble. The URL carries a ticket: it is never
printed, only its host.
"""

from __future__ import annotations

import inspect
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from bot.config import FeishuSettings
from bot.doctor import console
from bot.doctor.console import EVENTS, PERSISTENT_MODE
from bot.doctor.feishu import NoAnswer, network_fix, request
from bot.doctor.report import Result

ENDPOINT_PATH: Final = "/callback/ws/endpoint"
SYSTEM_BUSY: Final = 1
INTERNAL_ERROR: Final = 1000040343
FORBIDDEN: Final = 403
AUTH_FAILED: Final = 514
EXCEED_CONN_LIMIT: Final = 1000040350
"""``lark_oapi.ws.const`` values, kept here so that doctor's checks do not import the SDK."""

NAME: Final = "long connection"


async def check_long_connection(
    http: httpx.AsyncClient,
    feishu: FeishuSettings,
    *,
    timeout_s: float,
    running_bot: str | None,
) -> Result:
    """Discover the long-connection endpoint and open (then close) a WebSocket to it.

    ``running_bot`` names the bot holding this machine's store lock, if any: its connection is
    one of the app's, which the result says.
    """
    domain = feishu.domain
    here = f"; a bot is running on this machine ({running_bot})" if running_bot else ""
    body = {"AppID": feishu.app_id, "AppSecret": feishu.app_secret.get_secret_value()}
    try:
        answer = await request(http, "POST", domain + ENDPOINT_PATH, json=body)
    except NoAnswer as exc:
        return Result.fail(NAME, f"cannot reach {domain}: {exc}", network_fix(domain))
    url = ((answer.body or {}).get("data") or {}).get("URL")
    if answer.status != 200 or answer.code in (SYSTEM_BUSY, INTERNAL_ERROR):
        problem = f"Feishu could not hand out a long-connection endpoint ({answer.label})"
        return Result.fail(NAME, problem, "try again in a minute")
    if answer.code != 0 or not isinstance(url, str):
        problem = f"Feishu refused the long connection ({answer.label})"
        return Result.fail(NAME, problem, _mode_fix(domain))
    host = urlsplit(url).netloc or "?"
    try:
        async with connect(url, **_connect_options(timeout_s)):
            pass
    except InvalidStatus as exc:
        return _refused(exc, domain, host, running_bot)
    except (InvalidHandshake, InvalidURI) as exc:
        problem = f"the WebSocket to {host} failed its handshake: {type(exc).__name__}"
        return Result.fail(NAME, problem, _firewall_fix(host))
    except TimeoutError:
        problem = f"the WebSocket to {host} did not open within {timeout_s:g} s"
        return Result.fail(NAME, problem, _firewall_fix(host))
    except OSError as exc:
        problem = f"cannot open the WebSocket to {host}: {exc.strerror or type(exc).__name__}"
        return Result.fail(NAME, problem, _firewall_fix(host))
    return Result.ok(NAME, f"the endpoint answered and a WebSocket to {host} opened{here}")


def _connect_options(timeout_s: float) -> dict[str, Any]:
    options: dict[str, Any] = {"open_timeout": timeout_s, "close_timeout": timeout_s}
    if "proxy" in inspect.signature(connect).parameters:
        options["proxy"] = None  # connect directly, as the SDK does (websockets >= 15)
    return options


def _refused(exc: InvalidStatus, domain: str, host: str, running_bot: str | None) -> Result:
    headers = exc.response.headers
    status = headers.get("handshake-status") or str(exc.response.status_code)
    message = headers.get("handshake-msg") or ""
    auth_code = headers.get("handshake-autherrcode")
    label = f"{status}: {message}" if message else status
    if status == str(AUTH_FAILED) and auth_code == str(EXCEED_CONN_LIMIT):
        problem = (
            f"Feishu refused the WebSocket ({label}, {auth_code}): the app already has as many "
            "long connections as Feishu allows, so other instances of this bot (or another "
            "program with this App ID) are connected"
        )
        if running_bot:
            problem += f"; one is the bot running on this machine ({running_bot})"
        fix = (
            "stop the other instances (another `make run`, a server, a container), "
            "then run doctor again"
        )
        return Result.fail(NAME, problem, fix)
    if status == str(FORBIDDEN):
        return Result.fail(NAME, f"Feishu refused the WebSocket ({label})", _mode_fix(domain))
    problem = f"Feishu could not take the WebSocket to {host} right now ({label})"
    return Result.fail(NAME, problem, "try again in a minute")


def _mode_fix(domain: str) -> str:
    return (
        f"set {console.page(domain, EVENTS)} → subscription mode to {PERSISTENT_MODE}, save, "
        f"and {console.PUBLISH}"
    )


def _firewall_fix(host: str) -> str:
    return (
        f"allow outgoing WebSocket connections (wss://, port 443) to {host}: a firewall or "
        "proxy is in the way"
    )
