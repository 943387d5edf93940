"""Answer cards with media: formulas drawn and uploaded into the final card, transcripts above.

The replier's Feishu calls (CardKit, image upload) go to the fake Feishu over sockets; the
formulas are really drawn by matplotlib's mathtext.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from bot.chat.replies import ReplyDelta, ReplyEvent, ReplyFinished, ReplyPreface
from bot.feishu.formula_images import FormulaImages
from bot.feishu.media import FeishuMedia
from bot.feishu.replier import CardReplier, DeliveryRecord, ReplyTarget
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread
from tests.feishu_clients import feishu_api


@dataclass
class Cards:
    thread: FakeFeishuThread
    replier: CardReplier

    @property
    def fs(self) -> FakeFeishu:
        return self.thread.fake

    def target(self) -> ReplyTarget:
        delivery = self.fs.delivery(self.thread.deliver("p2p_text", text="hello"))
        chat_id = str(delivery.event["event"]["message"]["chat_id"])
        return ReplyTarget(chat_id=chat_id, message_id=delivery.message_id or "", in_thread=False)

    async def answer(self, *events: ReplyEvent) -> str:
        async def feed() -> AsyncIterator[ReplyEvent]:
            for event in events:
                yield event

        target = self.target()

        async def persist(record: DeliveryRecord) -> None:
            pass

        await self.replier.stream(target, feed(), record=DeliveryRecord(), persist=persist)
        (reply,) = self.fs.replies_to(target.message_id)
        assert reply.card_id is not None
        card = self.fs.card(reply.card_id)
        assert card.closed
        return card.text

    def card_updates(self) -> list[str]:
        return [
            str(update.content)
            for card in list(self.fs.cards.values())
            for update in card.content_updates
        ]


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    app = FakeFeishu(app_id=f"cli_formulas_{uuid.uuid4().hex[:12]}")
    with app.run_in_thread() as running:
        yield running


@pytest.fixture
async def cards(fake: FakeFeishuThread) -> AsyncIterator[Cards]:
    async def no_wait(seconds: float) -> None:
        pass

    async with feishu_api(fake, sleep=no_wait) as api:
        replier = CardReplier(api, update_interval_s=0.01, formulas=FormulaImages(FeishuMedia(api)))
        yield Cards(fake, replier)


def finished(text: str) -> list[ReplyEvent]:
    return [ReplyDelta(text), ReplyFinished(text)]


async def test_a_formula_becomes_an_uploaded_image_in_the_final_card(cards: Cards) -> None:
    text = await cards.answer(*finished("Energy: $$E = mc^2$$ and that is all."))
    (uploaded,) = cards.fs.uploaded_images()
    assert uploaded.data.startswith(b"\x89PNG")
    assert uploaded.image_type == "message"
    assert text == f"Energy:\n\n![E = mc^2]({uploaded.image_key})\n\nand that is all."


async def test_while_streaming_a_formula_shows_as_code(cards: Cards) -> None:
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta("The area is $\\pi r^2$ ")
        await gate.wait()
        yield ReplyFinished("The area is $\\pi r^2$ of the circle.")

    target = cards.target()

    async def persist(record: DeliveryRecord) -> None:
        pass

    streaming = asyncio.create_task(
        cards.replier.stream(target, slow(), record=DeliveryRecord(), persist=persist)
    )
    await cards.fs.wait_until(
        lambda: any("`\\pi r^2`" in t for t in cards.card_updates()) or None, timeout=10
    )
    gate.set()
    await streaming
    (uploaded,) = cards.fs.uploaded_images()
    assert cards.card_updates()[-1] == (
        f"The area is ![\\pi r^2]({uploaded.image_key}) of the circle."
    )


async def test_prices_are_left_alone_and_nothing_is_uploaded(cards: Cards) -> None:
    text = await cards.answer(*finished("It costs $5 and $6 with tax."))
    assert text == "It costs $5 and $6 with tax."
    assert cards.fs.uploaded_images() == []
    assert cards.fs.calls_to("image_upload") == []


async def test_a_formula_mathtext_cannot_draw_stays_as_code(cards: Cards) -> None:
    text = await cards.answer(*finished("M = $$\\begin{pmatrix} a \\\\ b \\end{pmatrix}$$"))
    assert "```latex\n\\begin{pmatrix} a \\\\ b \\end{pmatrix}\n```" in text
    assert cards.fs.uploaded_images() == []


async def test_a_formula_whose_upload_fails_stays_as_code_and_the_answer_is_delivered(
    cards: Cards,
) -> None:
    cards.fs.fail("image_upload", 1, "server trouble", http_status=500, times=4)
    text = await cards.answer(*finished("So $x^2$ it is."))
    assert text == "So `x^2` it is."


async def test_a_formula_drawn_once_is_not_uploaded_again(cards: Cards) -> None:
    first = await cards.answer(*finished("We have $a^2+b^2=c^2$."))
    second = await cards.answer(*finished("Again: $a^2+b^2=c^2$!"))
    (uploaded,) = cards.fs.uploaded_images()
    assert f"]({uploaded.image_key})" in first
    assert f"]({uploaded.image_key})" in second


async def test_a_transcript_preface_stands_above_the_answer(cards: Cards) -> None:
    text = await cards.answer(
        ReplyPreface("> 🎤 how far is the moon"), *finished("About 384,400 km.")
    )
    assert text == "> 🎤 how far is the moon\n\nAbout 384,400 km."
