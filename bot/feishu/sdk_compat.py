"""The one place that knows the Feishu SDK's private parts the bot relies on.

lark-oapi offers no public way to hand it a tenant access token that every client in the
process will use, nor to read when its cached token expires. The bot needs both to fetch the
token off the event loop (see :mod:`bot.feishu.token_keeper`), so it reaches into the SDK here,
and only here. Each access below says why it exists; on an SDK upgrade re-read the files named
and run ``tests/test_token_keeper.py``, ``tests/test_sdk_compat_replay.py`` and the slow suites.

* **The token cache** (``lark_oapi/core/token/manager.py``): ``TokenManager.cache`` is a class
  attribute shared by every client of the process (``ClientBuilder.cache()`` replaces it for
  everyone). The generated resources call ``verify()`` (``core/token/auth.py``) before every
  request, which calls ``TokenManager.get_self_tenant_token``: a cache hit under the key
  ``self_tenant_token:{app_id}`` is used as is; a miss fetches a new token with blocking
  ``requests`` (``core/http/transport.py``), even inside the ``a…`` methods, on whatever loop
  made the call. Re-check: the key format, that ``verify`` still reads the cache before
  fetching, and the SDK's own expiry convention (it stores ``now + expire - 600`` as an integer
  Unix time, :data:`SDK_TOKEN_EARLY_EXPIRY_S`).
* **The default cache's entries** (``lark_oapi/core/cache/local_cache.py``): ``LocalCache`` keeps
  ``{key: ValueWrap(value, expire)}`` in its ``cache`` dict, which is the only way to learn a
  cached token's expiry. ``set`` is one dict assignment, so replacing a token is atomic for
  readers on other threads (the long connection runs on its own); ``get`` deletes an entry it
  finds expired, which can only race a replacement when the old token had already expired.
  Re-check: ``cache``, ``ValueWrap.value`` and ``ValueWrap.expire``, and that ``set`` still
  replaces in one step.
* **The client builder's logger side effect** (``lark_oapi/client.py``, ``_init_logger``):
  ``ClientBuilder.build()`` sets the level of the process-wide ``Lark`` logger, which would undo
  the level that :func:`bot.logging.configure_logging` chose. :func:`build_client` restores it.
* **The long connection's event loop** (``lark_oapi/ws/client.py``): the module binds a global
  ``loop`` at import (the running loop, if imported inside one) and ``Client.start()`` runs on
  it; :func:`give_ws_client_its_own_loop` assigns a fresh one before the client starts (in the
  long-connection process, and in the benchmark's floor receivers). Re-check: the module-level
  ``loop`` name and its use in ``start()``.
* **The connection options** (same file): ``_ws_connect_kwargs`` builds the keyword arguments
  of every ``websockets.connect``; :func:`connect_without_compression` wraps it to add
  ``compression=None``. Re-check: the function's name and that ``_connect`` (which the
  reconnect path goes through) is still its only caller.
* **The client's disconnect** (same file): ``Client._disconnect`` is the coroutine that closes
  the connection, run on the client's loop; :func:`schedule_disconnect` schedules it there (the
  client has no public stop). Re-check: its name and that it leaves ``_conn`` ``None``.
* **The channel's WebSocket client class** (``lark_oapi/channel/channel.py``): ``start()`` makes
  the long connection as ``WSClient(app_id, app_secret, log_level=…, event_handler=…, …)``,
  a name the module imports from ``lark_oapi.ws.client``; it then calls the client's blocking
  ``start()``, polls its ``_conn`` to learn that it is connected, sets ``on_reconnecting`` /
  ``on_reconnected`` on it, and its ``stop()`` calls the client's ``stop()``.
  :func:`use_ws_client` replaces that name, so :class:`bot.feishu.ingress.ChildWsClient` can
  stand in for the SDK's client. Re-check: the imported name, the constructor's keywords, the
  ``_conn`` poll in ``_wait_background_start_ready``, and the ``stop`` lookup in ``stop()``.
* **The WebSocket client alone** (``lark_oapi/__init__.py``, ``lark_oapi/ws/client.py``): the
  package's ``__init__`` imports every API module (about 9,700 modules, 160 MiB, 3 s), and the
  client's module imports ``lark_oapi.event.dispatcher_handler`` (every event processor) only
  to annotate its event handler's type; the bundled protobuf's ``lark_oapi/ws/pb/google``
  declares itself a namespace package through ``pkg_resources`` (50 ms, 6 MiB).
  :func:`import_ws_client_alone` registers empty stand-ins for the package, that module and the
  namespace package, so the long-connection process loads the client with ``lark_oapi.core``
  and ``lark_oapi.ws`` only (about 500 modules, under 40 MiB). Re-check: that ``ws/client.py``
  uses ``EventDispatcherHandler`` for nothing but annotations and calls
  ``_do_without_validation`` on its handler, that ``ws/pb/google/__init__.py`` does nothing but
  declare the namespace, and that ``lark_oapi.core``/``lark_oapi.ws`` need nothing the
  package's ``__init__`` sets up.
* **The reconnect flag** (same file): ``Client._auto_reconnect`` is read after every dropped
  connection, and a stopping long-connection process drops the connection on purpose;
  :func:`disable_auto_reconnect` clears it first so that it does not reconnect.
  Re-check: the attribute name and where ``start()`` / the receive loop read it.
* **The channel's message-event coroutine** (``lark_oapi/channel/channel.py``):
  ``FeishuChannel._handle_message_event`` is the coroutine the channel schedules on its
  background loop for every ``im.message.receive_v1`` event; :func:`replay_message_event`
  feeds it a journaled event again. Re-check: its name, and that ``lark_oapi.core.json.JSON``
  still round-trips ``P2ImMessageReceiveV1``.
* **The dispatcher's entry** (``lark_oapi/event/dispatcher_handler.py``): the WebSocket client
  hands every event frame's payload (bytes, the ``{"schema", "header", "event"}`` envelope)
  to ``EventDispatcherHandler._do_without_validation``, which parses it and calls the
  processor on the same thread; the bot's long-connection process journals those bytes in a
  handler of that name (:mod:`bot.feishu.ingress_child`), and its stand-in client in the channel
  calls the channel's dispatcher by it. Re-check: the method's name, that the WebSocket client
  still calls it for event frames, and that its return value becomes the ACK's data.
* **The dispatcher's processor map** (``lark_oapi/event/dispatcher_handler.py``): the channel
  registers no handler for ``im.chat.access_event.bot_p2p_chat_entered_v1``, and an event
  without one is answered with an error. :func:`handle_p2p_chat_entered` wraps the channel's
  ``_build_dispatcher`` (called by ``start()``) to add the SDK's own typed processor to the
  built dispatcher's ``_processorMap``, exactly what the builder's
  ``register_p2_im_chat_access_event_bot_p2p_chat_entered_v1`` does. Re-check: the map's name
  and key format (``p2.<event type>``), and the processor class.
* **The generated layout of ``lark_oapi.api``**: :mod:`bot.feishu.sdk_loader` loads each API
  service on its first use instead of all of them at import. Re-check: what that module's
  docstring names, and run ``tests/test_sdk_loader.py``.
* **The version range** this knowledge was checked against, :data:`SUPPORTED`:
  :func:`check_sdk_version` warns at startup when another version is installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any, Final

from bot.feishu import sdk_loader
from bot.feishu.sdk_loader import SDK_PACKAGE
from bot.logging import SDK_LOGGER, get_logger

log = get_logger(__name__)

SDK_DISTRIBUTION: Final = "lark-oapi"
_TESTED_FROM: Final = (1, 7, 5)
_TESTED_BELOW: Final = (1, 8)
SUPPORTED: Final = f">={'.'.join(map(str, _TESTED_FROM))},<{'.'.join(map(str, _TESTED_BELOW))}"
"""The lark-oapi versions whose private parts this module was checked against."""

SDK_TOKEN_EARLY_EXPIRY_S: Final = 600
"""The SDK caches a token as expiring this long before Feishu's ``expire`` says it does."""

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def installed_sdk_version() -> str | None:
    """The installed lark-oapi version, or ``None`` if its metadata cannot be found."""
    try:
        return importlib.metadata.version(SDK_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...] | None:
    match = _RELEASE.match(version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else None


def sdk_version_supported() -> bool:
    """Whether the installed lark-oapi is in :data:`SUPPORTED` (quietly: no log)."""
    installed = installed_sdk_version()
    release = _release(installed) if installed is not None else None
    return release is not None and _TESTED_FROM <= release < _TESTED_BELOW


def check_sdk_version() -> bool:
    """Whether the installed lark-oapi is in :data:`SUPPORTED`; log a warning when it is not.

    Call it once at startup: outside the tested range the private parts this module reaches
    into may have moved, and the warning names the version so the reader knows what to check.
    """
    if sdk_version_supported():
        return True
    installed = installed_sdk_version()
    log.warning(
        "lark_oapi_version_untested",
        installed=installed,
        supported=SUPPORTED,
        hint="the bot relies on SDK internals checked only in the supported range; "
        "see bot/feishu/sdk_compat.py for what to re-check",
    )
    return False


ANSWER_PATH_SERVICES: Final = ("im", "cardkit", "auth")
"""The SDK's API services the bot calls to answer; :func:`build_client` loads them at once when
the SDK loads services on demand (:mod:`bot.feishu.sdk_loader`)."""


def build_client(*, app_id: str, app_secret: str, domain: str, timeout_s: float) -> Any:
    """A ``lark_oapi.Client`` for the app, leaving the ``Lark`` logger's level as it was.

    Its :data:`ANSWER_PATH_SERVICES` are the SDK's own service objects, loaded now when the
    SDK loads services on demand (the client's other services load on their first use).
    """
    import lark_oapi as lark

    sdk_logger = logging.getLogger(SDK_LOGGER)
    level = sdk_logger.level
    try:
        client = (
            lark.Client.builder()
            .app_id(app_id)
            .app_secret(app_secret)
            .domain(domain)
            .timeout(timeout_s)
            .log_level(lark.LogLevel.ERROR)
            .build()
        )
    finally:
        sdk_logger.setLevel(level)
    for service in ANSWER_PATH_SERVICES:  # loaded now, not on the first message's path
        on_demand = getattr(client, service)
        if isinstance(on_demand, sdk_loader.ServiceOnDemand):
            setattr(client, service, on_demand.real_service())
    return client


def _token_cache() -> Any:
    from lark_oapi.core.token.manager import TokenManager

    return TokenManager.cache  # looked up on every use: ClientBuilder.cache() may replace it


def tenant_token_cache_key(app_id: str) -> str:
    """The key under which the SDK caches the self-built app's tenant access token."""
    return f"self_tenant_token:{app_id}"


def store_tenant_token(app_id: str, token: str, expires_at: float) -> None:
    """Put ``token`` in the SDK's process-wide cache; the SDK uses it until ``expires_at``.

    ``expires_at`` is a Unix time (the SDK compares it with ``time.time()``), already in the
    SDK's convention: pass Feishu's expiry minus :data:`SDK_TOKEN_EARLY_EXPIRY_S`. It is
    rounded down, as the SDK does. The entry is replaced in one step, never removed first.
    """
    _token_cache().set(tenant_token_cache_key(app_id), token, int(expires_at))


def cached_tenant_token(app_id: str) -> str | None:
    """The tenant token the SDK would use now for ``app_id`` (``None``: it would fetch one)."""
    token = _token_cache().get(tenant_token_cache_key(app_id))
    return token if isinstance(token, str) and token else None


def cached_tenant_token_expiry(app_id: str) -> float | None:
    """Until when the SDK's cache holds ``app_id``'s tenant token, as a Unix time.

    ``None`` when no token is cached, or when the cache is not the SDK's default
    ``LocalCache`` (a custom ``ICache`` offers no way to read an expiry). The value may lie in
    the past: the SDK drops such an entry at its next read.
    """
    from lark_oapi.core.cache import LocalCache

    cache = _token_cache()
    if not isinstance(cache, LocalCache):
        return None
    entry = cache.cache.get(tenant_token_cache_key(app_id))
    return float(entry.expire) if entry is not None else None


def give_ws_client_its_own_loop() -> asyncio.AbstractEventLoop:
    """Give the SDK's WebSocket client a new event loop to run on; return that loop.

    Call it before the channel starts its long connection; whoever calls it owns the loop
    (close it once the SDK's thread has stopped).
    """
    import lark_oapi.ws.client as ws_client_module

    loop = asyncio.new_event_loop()
    ws_client_module.loop = loop
    return loop


def connect_without_compression() -> None:
    """Make the SDK's WebSocket client connect without offering ``permessage-deflate``.

    Event frames are a few hundred bytes of protobuf on a long-lived connection; deflating
    every ACK and inflating every event would cost CPU before each ACK. Idempotent.
    """
    import lark_oapi.ws.client as ws_client_module

    connect_kwargs = ws_client_module._ws_connect_kwargs
    if getattr(connect_kwargs, "_without_compression", False):
        return

    def uncompressed(connection_headers: Any = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = connect_kwargs(connection_headers)
        kwargs["compression"] = None
        return kwargs

    uncompressed._without_compression = True  # type: ignore[attr-defined]
    ws_client_module._ws_connect_kwargs = uncompressed


def disable_auto_reconnect(ws_client: Any) -> None:
    """Stop the SDK's WebSocket client (``None``: none yet) from reconnecting once dropped."""
    if ws_client is not None:
        ws_client._auto_reconnect = False


def import_ws_client_alone() -> Any:
    """Import ``lark_oapi.ws.client`` without the rest of the SDK; return the module.

    Only for a process that uses nothing else of the SDK (the long-connection process): the
    package ``lark_oapi`` and ``lark_oapi.event.dispatcher_handler`` are empty stand-ins there.
    Where the SDK is imported already, this is a plain import.
    """
    if SDK_PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(SDK_PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"{SDK_DISTRIBUTION} is not installed")
        root = list(spec.submodule_search_locations)
        package = types.ModuleType(SDK_PACKAGE)
        package.__path__ = root
        sys.modules[SDK_PACKAGE] = package
        event = types.ModuleType(f"{SDK_PACKAGE}.event")
        event.__path__ = [os.path.join(path, "event") for path in root]
        sys.modules[event.__name__] = event
        dispatcher = types.ModuleType(f"{SDK_PACKAGE}.event.dispatcher_handler")
        dispatcher.EventDispatcherHandler = type("EventDispatcherHandler", (), {})  # type: ignore[attr-defined]
        sys.modules[dispatcher.__name__] = dispatcher
        google = types.ModuleType(f"{SDK_PACKAGE}.ws.pb.google")  # a namespace package
        google.__path__ = [os.path.join(path, "ws", "pb", "google") for path in root]
        sys.modules[google.__name__] = google
    return importlib.import_module(f"{SDK_PACKAGE}.ws.client")


def schedule_disconnect(
    ws_client: Any, loop: asyncio.AbstractEventLoop
) -> concurrent.futures.Future[None]:
    """Close the SDK WebSocket client's connection on its ``loop`` (from another thread)."""
    future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
        ws_client._disconnect(), loop
    )
    return future


def use_ws_client(factory: Callable[..., Any]) -> Callable[[], None]:
    """Make every ``FeishuChannel`` started from now on build its long connection with
    ``factory`` (called with the SDK client's arguments); return what undoes it."""
    import lark_oapi.channel.channel as channel_module

    original = channel_module.WSClient
    channel_module.WSClient = factory

    def restore() -> None:
        channel_module.WSClient = original

    return restore


P2P_CHAT_ENTERED: Final = "im.chat.access_event.bot_p2p_chat_entered_v1"


def handle_p2p_chat_entered(channel: Any, handler: Callable[[str, str], object]) -> None:
    """Call ``handler(chat_id, operator_open_id)`` on the channel's dispatching thread for every
    ``im.chat.access_event.bot_p2p_chat_entered_v1`` event (a user opened the private chat).

    Call before the channel starts. The handler must be quick and must not raise.
    """
    from lark_oapi.api.im.v1.processor import P2ImChatAccessEventBotP2pChatEnteredV1Processor

    def entered(data: Any) -> None:
        event = getattr(data, "event", None)
        chat_id = str(getattr(event, "chat_id", None) or "")
        operator = getattr(event, "operator_id", None)
        open_id = str(getattr(operator, "open_id", None) or "")
        try:
            handler(chat_id, open_id)
        except Exception as exc:  # never let a greeting break the event loop
            log.error("p2p_chat_entered_failed", error=repr(exc))

    original = channel._build_dispatcher

    def build() -> Any:
        dispatcher = original()
        dispatcher._processorMap[f"p2.{P2P_CHAT_ENTERED}"] = (
            P2ImChatAccessEventBotP2pChatEnteredV1Processor(entered)
        )
        return dispatcher

    channel._build_dispatcher = build


def replay_message_event(channel: Any, event: str) -> concurrent.futures.Future[None]:
    """Feed a journaled ``im.message.receive_v1`` event through the channel again (its
    normalisation, policies and then the bot's ``message`` handler), as if just received."""
    from lark_oapi.api.im.v1 import P2ImMessageReceiveV1
    from lark_oapi.core.json import JSON

    data = JSON.unmarshal(event, P2ImMessageReceiveV1)
    future: concurrent.futures.Future[None] = channel.schedule(channel._handle_message_event(data))
    return future
