"""The non-streaming baseline for bench/concurrency.py: the answer appears only when complete.

What the original webhook bots did: wait for the model's whole answer, then send it as one text
reply (one Feishu call per answer, nothing on screen before). Everything else (the long
connection, the ACK, the connection pools) is :mod:`bench._reference_bot`'s.

The answer is read from the same streamed request as the reference's: the fake OpenAI answers a
non-streaming request after its first-token delay alone, which no real model can do, so a
``stream: false`` request would make this baseline look faster than it is.
"""

from __future__ import annotations

from bench._reference_bot import Message, ReferenceBot, main, reply_uuid


class NonStreamingBot(ReferenceBot):
    """Answers each message with one text reply once the model has finished."""

    async def answer(self, message: Message) -> None:
        text = await self.complete(message.text)
        await self.reply(
            message.message_id, "text", {"text": text}, reply_uuid(message.message_id, "text")
        )


if __name__ == "__main__":
    main(NonStreamingBot)
