"""Formulas in answer cards: shown as code while the answer streams, as images once it is done.

Feishu's card markdown does not render LaTeX but shows uploaded images (``![alt](image_key)``).
When a card's text is final, each formula in it is drawn with matplotlib's mathtext
(:class:`bot.media.formulas.FormulaRenderer`, on a worker thread), uploaded once, and put where
the formula was, its source as the alt text. A formula mathtext cannot draw, or whose upload
fails, stays as code: the answer is never held back by a formula. Uploaded image keys are
remembered by formula source for the life of the process, so a formula that comes again costs
no render and no upload.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from bot.chat.media import ImageHost
from bot.errors import MediaUnavailable
from bot.logging import get_logger
from bot.media.formulas import FormulaRenderer, find_formulas, formulas_as_code, place_images

log = get_logger(__name__)

#: uploaded formula images remembered by source
MAX_REMEMBERED = 512


class FormulaImages:
    """Places rendered formulas into final card text; see the module docstring."""

    def __init__(self, host: ImageHost, renderer: FormulaRenderer | None = None) -> None:
        self._host = host
        self._renderer = renderer
        self._keys: OrderedDict[str, str] = OrderedDict()

    def as_code(self, text: str) -> str:
        """The text as shown while it streams: formulas as code."""
        return formulas_as_code(text)

    async def place(self, text: str) -> str:
        """The final text, every formula that could be drawn and uploaded shown as its image."""
        formulas = find_formulas(text)
        if not formulas:
            return text
        if self._renderer is None:
            self._renderer = FormulaRenderer()  # matplotlib is loaded with the first formula
        keys: dict[str, str] = {}
        for formula in formulas:
            source = formula.source
            if source in keys:
                continue
            key = self._keys.get(source)
            if key is None:
                png = await asyncio.to_thread(self._renderer.render, formula)
                if png is None:
                    continue
                try:
                    key = await self._host.publish(png, "image/png")
                except MediaUnavailable as exc:
                    log.warning("formula_not_uploaded", error=str(exc))
                    continue
                self._remember(source, key)
            keys[source] = key
        log.info("formulas_placed", formulas=len(formulas), images=len(keys))
        return place_images(text, keys)

    def _remember(self, source: str, key: str) -> None:
        self._keys[source] = key
        self._keys.move_to_end(source)
        while len(self._keys) > MAX_REMEMBERED:
            self._keys.popitem(last=False)
