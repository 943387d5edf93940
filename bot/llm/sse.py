"""Streamed chat completions sent over one aiohttp session and read as raw server-sent events.

Sent through the ``openai`` SDK's own request path (``AsyncOpenAI.post``: its request options,
headers, URL and ``httpx2`` request objects, then its aiohttp transport), a streaming request
cost about 1 ms more CPU than the same request sent with aiohttp directly (3.6 against 2.6 ms
on the benchmark's machine, server included), and the SDK built a pydantic ``ChatCompletionChunk``
per chunk on top. With hundreds of questions arriving at once that preparation was the largest
share of the bot's work before the questions reached the model (``bench/RESULTS.md``).

So :class:`ChatStreams` takes from the SDK client what makes the request the SDK's: its base URL,
its default headers (user agent, platform headers), its timeouts and, for a failure, its
exceptions: an error status becomes exactly the error the SDK raises for it (its
``_make_status_error_from_response``: ``RateLimitError``, ``AuthenticationError``… with the
body and headers), which the key pool classifies. It sends the body, already serialised with
``orjson``, with the leased key in its own ``Authorization`` header, over a kept-alive aiohttp
pool sized like the SDK's (1,000 connections, idle ones closed after 5 s; the proxy the
environment names, looked up once; the SDK's certificate bundle). The body is read line by line
and each ``data:`` event decoded with ``orjson`` into a plain dict. An error the provider sends
inside the stream (``{"error": {…}}``) is raised as the same ``openai.APIError`` the SDK would
raise, and broken or slow connections as ``openai.APITimeoutError`` /
``openai.APIConnectionError``, so the classification of failures does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Final

import aiohttp
import httpx2
import openai
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from bot.llm.events import TokenUsage
from bot.logging import get_logger

log = get_logger(__name__)

Chunk = Mapping[str, Any]

#: the SDK's HTTP pool (``openai.DefaultAioHttpClient``): at most this many connections
POOL_CONNECTIONS: Final = 1000
#: and idle ones closed after this many seconds
POOL_KEEPALIVE_S: Final = 5.0
#: the most of an error answer's body read (the SDK keeps it in the error)
ERROR_BODY_MAX_BYTES: Final = 1 << 20


class ChatStreams:
    """Opens streaming ``chat/completions`` requests at ``client``'s endpoint, as the SDK would
    send them; create it anywhere, use it on one event loop, :meth:`aclose` when done."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self._client = client
        self._url = str(client.base_url.join("chat/completions"))
        timeout = client.timeout
        if isinstance(timeout, httpx2.Timeout):
            self._timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=timeout.connect, sock_read=timeout.read
            )
        else:
            self._timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout)
        self._headers: dict[str, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        # The proxy the environment names for the endpoint (HTTPS_PROXY, NO_PROXY…), as the
        # SDK's client would use it: looked up once, not for every request as trust_env does.
        try:
            self._proxy: URL | None
            self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(self._url))
        except LookupError:
            self._proxy, self._proxy_auth = None, None

    async def open(self, body: Mapping[str, Any], *, api_key: str) -> RawChunkStream:
        """Send a streaming request with ``api_key``; raises the SDK's errors for an error
        status, a timeout or a failed connection."""
        headers = {**self._default_headers(), "Authorization": f"Bearer {api_key}"}
        try:
            response = await self._open().post(
                self._url,
                data=orjson.dumps(body),
                headers=headers,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            )
        except Exception as exc:
            failure = _transport_failure(exc, self._request)
            if failure is None:
                raise
            raise failure from exc
        if response.status >= 400:
            raise await self._status_error(response)
        return RawChunkStream(response, self._request)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=POOL_CONNECTIONS,
                keepalive_timeout=POOL_KEEPALIVE_S,
                ssl=httpx2.create_ssl_context(trust_env=True),
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    def _default_headers(self) -> dict[str, str]:
        """The SDK client's headers without its own key (read once, on the loop: the SDK's
        platform headers name the async library that runs them)."""
        if self._headers is None:
            self._headers = {
                name: value
                for name, value in self._client.default_headers.items()
                if isinstance(value, str) and name.lower() != "authorization"
            }
        return self._headers

    def _request(self) -> httpx2.Request:
        """The request as the SDK's errors describe it (built only for an error)."""
        return httpx2.Request("POST", self._url)

    async def _status_error(self, response: aiohttp.ClientResponse) -> openai.APIStatusError:
        """The SDK's own error for an error status, read from the answer's body."""
        content = b""
        try:
            async for block in response.content.iter_chunked(1 << 16):
                content += block
                if len(content) >= ERROR_BODY_MAX_BYTES:
                    break
        except Exception as exc:  # the body is only detail: the status still says what failed
            log.debug("error_body_unread", status=response.status, error=type(exc).__name__)
        finally:
            response.release()
        # aiohttp has decoded the body already: headers about its encoding no longer hold.
        headers = [
            (name, value)
            for name, value in response.raw_headers
            if name.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
        ]
        answer = httpx2.Response(
            response.status, headers=headers, content=content, request=self._request()
        )
        return self._client._make_status_error_from_response(answer)


class RawChunkStream:
    """The chunks of one streaming response, as dicts; ``close()`` releases the connection."""

    def __init__(
        self, response: aiohttp.ClientResponse, request: Callable[[], httpx2.Request]
    ) -> None:
        self._response: aiohttp.ClientResponse | None = response
        self._request = request

    async def close(self) -> None:
        """Release the response (an unfinished stream's connection is closed, not reused)."""
        if self._response is not None:
            response, self._response = self._response, None
            response.release()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        http = self._response
        if http is None:
            return
        data: list[str] = []
        try:
            async for line in sse_lines(http.content.iter_any()):
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith("data: ") else line[5:])
                elif not line and data:
                    event, data = "\n".join(data), []
                    if event.startswith("[DONE]"):
                        return
                    yield _decode(event, self._request)
                # other fields (event:, id:, retry:) and ": keep-alive" comments are ignored
            if data and not data[0].startswith("[DONE]"):
                yield _decode("\n".join(data), self._request)
        except openai.APIError:
            raise
        except Exception as exc:
            failure = _transport_failure(exc, self._request)
            if failure is None:
                raise
            raise failure from exc


async def sse_lines(blocks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of a body that arrives in ``blocks``, without their ends (LF, CR LF or CR, as
    server-sent events allow), however long and however the blocks cut them."""
    pending = b""
    async for block in blocks:
        pending += block
        # A block ending in CR may end in the middle of a CR LF: that CR waits for the next one.
        held = b"\r" if pending.endswith(b"\r") else b""
        body = pending[: len(pending) - len(held)]
        *lines, rest = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        pending = rest + held
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8", errors="replace")


#: the packages whose exceptions mean "the connection failed", whichever HTTP client the SDK uses
_TRANSPORT_PACKAGES = frozenset(
    {"httpx", "httpx2", "httpcore", "httpcore2", "anyio", "h11", "aiohttp"}
)


def _transport_failure(
    exc: Exception, request: Callable[[], httpx2.Request]
) -> openai.APIError | None:
    """The SDK's error for a connection that failed, broke or stalled."""
    package = type(exc).__module__.split(".")[0]
    if package not in _TRANSPORT_PACKAGES and not isinstance(exc, OSError | TimeoutError):
        return None
    if "Timeout" in type(exc).__name__ or isinstance(exc, TimeoutError):
        return openai.APITimeoutError(request=request())
    return openai.APIConnectionError(request=request())


def _decode(event: str, request: Callable[[], httpx2.Request]) -> Chunk:
    try:
        chunk = orjson.loads(event)
    except orjson.JSONDecodeError:
        raise openai.APIError(
            "the model endpoint sent an unreadable stream event", request=request(), body=None
        ) from None
    if not isinstance(chunk, dict):
        raise openai.APIError(
            "the model endpoint sent a stream event that is not an object",
            request=request(),
            body=None,
        )
    error = chunk.get("error")
    if error:  # what the SDK raises for an error event inside the stream
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"
        raise openai.APIError(message, request=request(), body=error)
    return chunk


def parse_chunk(chunk: Chunk) -> tuple[str, TokenUsage | None, str | None]:
    """A chunk's text, its usage (when reported) and its finish reason."""
    text = ""
    finish_reason: str | None = None
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text += content
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            finish_reason = reason
    usage = None
    raw_usage = chunk.get("usage")
    if isinstance(raw_usage, dict):
        usage = TokenUsage(
            prompt_tokens=_count(raw_usage.get("prompt_tokens")),
            completion_tokens=_count(raw_usage.get("completion_tokens")),
        )
    return text, usage, finish_reason


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
