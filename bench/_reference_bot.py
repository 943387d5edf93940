"""A minimal streaming Feishu bot: the floor of the machine and the fakes for bench/concurrency.py.

Not a product. It does per message what ``python -m bot run`` does on the wire and nothing else,
as cheaply as Python allows, so the benchmark can tell the bot's own cost from the cost of the
machine, the loopback sockets and the fakes:

* **Events**: its own long-connection client (aiohttp WebSocket, ``pbbp2.Frame`` coded by hand
  in :mod:`bench._pbbp2`, so lark-oapi is not even imported): endpoint discovery, then every
  data frame is ACKed at once and its event parsed with :mod:`json`. No SDK dispatcher, no
  typed event objects, no journal, no store.
* **Per message** (the bot's calls, in the bot's order): create a CardKit card ("Thinking…") and
  reply with it, while the LLM request (raw SSE over aiohttp, no ``openai`` SDK) runs; put the
  element content at most once per ``--update-ms`` (start to start, one call in flight per card)
  while text comes; then the final text and streaming mode off, in one batch update.
* **Connections**: one kept-alive aiohttp pool for Feishu REST and one for the LLM, unlimited in
  size, on one event loop (no threads).

Calls that carry the answer are retried on rate limits, 5xx and connection errors (at most 4
attempts); throttled updates are not (the next one carries the whole text anyway). Output is
JSON lines on stdout (``bot_ready``, ``answer_failed``); SIGTERM or SIGINT stops it with exit
code 0. :mod:`bench._nonstreaming_bot` reuses everything here but the presentation.

Run by the benchmark as ``python -m bench._reference_bot --domain … --app-id … --app-secret …
--llm-base-url … --llm-key …`` against the test fakes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench._pbbp2 import Frame

FRAME_CONTROL = 0
FRAME_DATA = 1
ELEMENT_ID = "answer"
THINKING = "_Thinking…_"
APOLOGY = "Sorry, something went wrong while I was answering. Please try again."
SYSTEM_PROMPT = "You are a helpful assistant."
CODE_RATE_LIMITED = 99991400
ATTEMPTS = 4
ACK_PAYLOAD = b'{"code": 200}'


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout (what the benchmark reads)."""
    print(json.dumps({"event": event, **fields}, ensure_ascii=False), flush=True)


@dataclass(frozen=True)
class Options:
    """Where the fakes are and how often a card may be updated."""

    domain: str
    app_id: str
    app_secret: str
    llm_base_url: str
    llm_key: str
    model: str
    update_s: float


@dataclass(frozen=True)
class Message:
    """The part of an ``im.message.receive_v1`` event an answer needs."""

    message_id: str
    chat_id: str
    text: str


class FeishuError(Exception):
    """A Feishu REST call that failed (after its retries, if it had any)."""

    def __init__(self, what: str, status: int, code: int, msg: str) -> None:
        super().__init__(f"{what} failed: {msg} (code {code}, HTTP {status})")
        self.status = status
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500 or self.code == CODE_RATE_LIMITED


def parse_message(payload: bytes) -> Message | None:
    """A text message event as :class:`Message`; ``None`` for anything else."""
    event = json.loads(payload)
    if (event.get("header") or {}).get("event_type") != "im.message.receive_v1":
        return None
    message = (event.get("event") or {}).get("message") or {}
    if message.get("message_type") != "text":
        return None
    text = json.loads(message.get("content") or "{}").get("text", "")
    return Message(str(message["message_id"]), str(message.get("chat_id") or ""), str(text))


def streaming_card(text: str) -> dict[str, Any]:
    """The CardKit card the bot creates (schema 2.0, one markdown element, streaming on)."""
    return {
        "schema": "2.0",
        "config": {"streaming_mode": True, "summary": {"content": ""}},
        "body": {"elements": [{"tag": "markdown", "element_id": ELEMENT_ID, "content": text}]},
    }


def reply_uuid(*parts: str) -> str:
    """A reply's idempotency key, derived like the bot's."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


class _Answer:
    """The answer so far, shared by the LLM reader and the card updater of one message."""

    def __init__(self) -> None:
        self.text = ""
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()

    def add(self, delta: str) -> None:
        self.text += delta
        self.changed.set()

    def finish(self, text: str | None = None) -> None:
        if text is not None:
            self.text = text
        self.finished.set()
        self.changed.set()


class ReferenceBot:
    """Receives message events and answers each in a streamed CardKit card."""

    def __init__(
        self, options: Options, feishu: aiohttp.ClientSession, llm: aiohttp.ClientSession
    ) -> None:
        self.options = options
        self._feishu = feishu
        self._llm = llm
        self._auth: dict[str, str] = {}
        self._answers: set[asyncio.Task[None]] = set()
        self._fragments: dict[str, list[bytes | None]] = {}

    # ---- the long connection -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, answer messages until ``stop`` is set, then cancel what is still running."""
        token = await self._post_json(
            "/open-apis/auth/v3/tenant_access_token/internal",
            {"app_id": self.options.app_id, "app_secret": self.options.app_secret},
        )
        self._auth = {"Authorization": f"Bearer {token['tenant_access_token']}"}
        endpoint = await self._post_json(
            "/callback/ws/endpoint",
            {"AppID": self.options.app_id, "AppSecret": self.options.app_secret},
        )
        url = str(endpoint["data"]["URL"])
        ping_s = float((endpoint["data"].get("ClientConfig") or {}).get("PingInterval") or 120)
        service_id = int(url.split("service_id=")[1].split("&")[0])
        async with self._feishu.ws_connect(url, max_msg_size=0) as ws:
            emit("bot_ready")
            receiving = asyncio.create_task(self._receive(ws))
            pinging = asyncio.create_task(_ping(ws, service_id, ping_s))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiving, pinging, stopping, *self._answers):
                task.cancel()
            await asyncio.gather(
                receiving, pinging, stopping, *self._answers, return_exceptions=True
            )

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._feishu.post(self.options.domain + path, json=body) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
        if answer.get("code") != 0:
            raise SystemExit(f"error: {path} answered {answer}")
        return answer

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for received in ws:
            if received.type != aiohttp.WSMsgType.BINARY:
                continue
            frame = Frame.decode(received.data)
            if frame.method != FRAME_DATA:
                continue  # pong
            headers = dict(frame.headers)
            payload = self._assemble(headers, frame.payload)
            if payload is None:
                continue
            # ACK at once: the floor (the bot journals the event before its ACK).
            frame.payload = ACK_PAYLOAD
            frame.headers.append(("biz_rt", "0"))
            await ws.send_bytes(frame.encode())
            if headers.get("type") != "event":
                continue
            message = parse_message(payload)
            if message is not None:
                task = asyncio.create_task(self._answer_safely(message))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)

    def _assemble(self, headers: dict[str, str], part: bytes) -> bytes | None:
        """The whole payload once every fragment (``sum``/``seq``) of a frame has come."""
        total = int(headers.get("sum") or 1)
        if total <= 1:
            return part
        key = headers.get("message_id", "")
        parts = self._fragments.setdefault(key, [None] * total)
        parts[int(headers.get("seq") or 0)] = part
        if any(p is None for p in parts):
            return None
        del self._fragments[key]
        return b"".join(p for p in parts if p is not None)

    # ---- answering ---------------------------------------------------------------------------

    async def _answer_safely(self, message: Message) -> None:
        try:
            await self.answer(message)
        except* (FeishuError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as failed:
            emit("answer_failed", message_id=message.message_id, error=repr(failed.exceptions[0]))

    async def answer(self, message: Message) -> None:
        """Stream the LLM's answer into a card that replies to ``message``."""
        answer = _Answer()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._generate(message.text, answer))
            group.create_task(self._present(message, answer))

    async def _generate(self, question: str, answer: _Answer) -> None:
        try:
            async for delta in self.stream_llm(question):
                answer.add(delta)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            emit("llm_failed", error=f"{exc!r}")
            answer.finish(APOLOGY)
        finally:
            answer.finish()

    async def _present(self, message: Message, answer: _Answer) -> None:
        loop = asyncio.get_running_loop()
        card_id = await self.create_card(THINKING)
        await self.reply(
            message.message_id,
            "interactive",
            {"type": "card", "data": {"card_id": card_id}},
            reply_uuid(message.message_id, "card", card_id),
        )
        sequence = 0
        shown = THINKING
        next_at = 0.0
        while not answer.finished.is_set():
            await answer.changed.wait()
            answer.changed.clear()
            wait = next_at - loop.time()
            if wait > 0 and not answer.finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answer.finished.wait(), wait)
            if answer.finished.is_set() or answer.text == shown:
                continue
            text = answer.text
            sequence += 1
            next_at = loop.time() + self.options.update_s
            with contextlib.suppress(FeishuError):  # best effort, like the bot's
                await self.set_card_text(card_id, text, sequence, retry=False)
                shown = text
        await self.end_card(card_id, answer.text, sequence + 1)

    # ---- the LLM -----------------------------------------------------------------------------

    async def stream_llm(self, question: str) -> AsyncIterator[str]:
        """The answer's text deltas, read from the chat completions SSE stream."""
        body = {
            "model": self.options.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {self.options.llm_key}"}
        url = self.options.llm_base_url.rstrip("/") + "/chat/completions"
        async with self._llm.post(url, json=body, headers=headers) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                for choice in chunk.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        yield delta

    async def complete(self, question: str) -> str:
        """The whole answer (read from the same stream, so it takes the model's real time)."""
        return "".join([delta async for delta in self.stream_llm(question)])

    # ---- Feishu REST -------------------------------------------------------------------------

    async def create_card(self, text: str) -> str:
        card = json.dumps(streaming_card(text), ensure_ascii=False)
        data = await self._call(
            "card_create",
            "POST",
            "/open-apis/cardkit/v1/cards",
            {"type": "card_json", "data": card},
        )
        return str(data["card_id"])

    async def reply(self, message_id: str, msg_type: str, content: Any, uuid: str) -> str:
        body = {
            "msg_type": msg_type,
            "content": json.dumps(content, ensure_ascii=False),
            "uuid": uuid,
        }
        path = f"/open-apis/im/v1/messages/{message_id}/reply"
        data = await self._call("message_reply", "POST", path, body)
        return str(data["message_id"])

    async def set_card_text(
        self, card_id: str, text: str, sequence: int, *, retry: bool = True
    ) -> None:
        path = f"/open-apis/cardkit/v1/cards/{card_id}/elements/{ELEMENT_ID}/content"
        body = {"content": text, "sequence": sequence}
        await self._call("card_text", "PUT", path, body, retry=retry)

    async def end_card(self, card_id: str, text: str, sequence: int) -> None:
        actions = [
            {
                "action": "partial_update_element",
                "params": {"element_id": ELEMENT_ID, "partial_element": {"content": text}},
            },
            {
                "action": "partial_update_setting",
                "params": {"settings": {"config": {"streaming_mode": False}}},
            },
        ]
        path = f"/open-apis/cardkit/v1/cards/{card_id}/batch_update"
        body = {"actions": json.dumps(actions, ensure_ascii=False), "sequence": sequence}
        await self._call("card_end", "POST", path, body)

    async def _call(
        self, what: str, method: str, path: str, body: dict[str, Any], *, retry: bool = True
    ) -> dict[str, Any]:
        url = self.options.domain + path
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with self._feishu.request(
                    method, url, json=body, headers=self._auth
                ) as response:
                    status = response.status
                    answer = await response.json(content_type=None)
                    reset = response.headers.get("x-ogw-ratelimit-reset")
                code = int(answer.get("code", -1)) if isinstance(answer, dict) else -1
                if code == 0 and status < 300:
                    data: dict[str, Any] = answer.get("data") or {}
                    return data
                error = FeishuError(what, status, code, str(answer.get("msg")))
                if not (retry and error.retryable) or attempt == ATTEMPTS:
                    raise error
                pause = float(reset) if reset else 0.5 * 2**attempt
            except aiohttp.ClientError:
                if not retry or attempt == ATTEMPTS:
                    raise
                pause = 0.5 * 2**attempt
            await asyncio.sleep(min(pause, 8.0))
        raise AssertionError("unreachable")  # pragma: no cover


async def _ping(ws: aiohttp.ClientWebSocketResponse, service_id: int, every_s: float) -> None:
    """The client's ping control frame, as the SDK sends it (Feishu answers with a pong)."""
    while True:
        frame = Frame(service=service_id, method=FRAME_CONTROL, headers=[("type", "ping")])
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(frame.encode())
        await asyncio.sleep(every_s)


def parse_options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, help="the fake Feishu, http://127.0.0.1:PORT")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--app-secret", required=True)
    parser.add_argument("--llm-base-url", required=True, help="the fake OpenAI, http://…/v1")
    parser.add_argument("--llm-key", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument(
        "--update-ms", type=int, default=300, help="card updates at most this often"
    )
    args = parser.parse_args(argv)
    return Options(
        domain=args.domain.rstrip("/"),
        app_id=args.app_id,
        app_secret=args.app_secret,
        llm_base_url=args.llm_base_url,
        llm_key=args.llm_key,
        model=args.model,
        update_s=args.update_ms / 1000,
    )


async def serve(bot_class: type[ReferenceBot], options: Options) -> None:
    """Run ``bot_class`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    feishu_pool = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    llm_pool = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with (
        aiohttp.ClientSession(connector=feishu_pool, timeout=timeout) as feishu,
        aiohttp.ClientSession(connector=llm_pool, timeout=timeout) as llm,
    ):
        await bot_class(options, feishu, llm).run(stop)


def main(bot_class: type[ReferenceBot] = ReferenceBot, argv: Sequence[str] | None = None) -> None:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    asyncio.run(serve(bot_class, options))
    emit("bot_stopped", seconds=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    main()
