"""Feishu's side of media: downloading what users send, its speech-to-text, uploading images.

Each call goes through :class:`bot.feishu.api.FeishuApi` (retries for transient failures) and
each failure becomes a short :class:`bot.errors.MediaError` the user can read: a missing scope is
named (``im:resource``, ``speech_to_text:speech``) so the user can pass it on to the bot's owner,
and the owner finds it in the log too.
"""

from __future__ import annotations

import secrets
import string

from bot.chat.media import MediaRef, describe_size
from bot.errors import MediaTooLarge, MediaUnavailable
from bot.feishu.api import CODE_TOO_LARGE, FeishuApi, FeishuApiError
from bot.logging import get_logger
from bot.media.audio import Pcm

log = get_logger(__name__)

_WHAT = {"image": "your image", "file": "your file", "audio": "your voice message"}
_FILE_ID_ALPHABET = string.ascii_lowercase + string.digits


class FeishuMedia:
    """Downloads, speech recognition and image uploads over the answer path's Feishu API."""

    def __init__(self, api: FeishuApi) -> None:
        self._api = api

    async def download(self, message_id: str, item: MediaRef, max_bytes: int) -> bytes:
        """The bytes of ``item`` of message ``message_id`` (images as ``type=image``, files and
        voice as ``type=file``); see :class:`bot.chat.media.MediaSource`."""
        what = _WHAT[item.kind]
        try:
            return await self._api.download_resource(
                message_id,
                item.key,
                "image" if item.kind == "image" else "file",
                max_bytes=max_bytes,
            )
        except FeishuApiError as exc:
            if exc.code == CODE_TOO_LARGE:
                raise MediaTooLarge(
                    f"{what.capitalize()} is larger than the {describe_size(max_bytes)} I take. "
                    "Please send a smaller one."
                ) from None
            log.warning("media_not_downloaded", kind=item.kind, error=str(exc))
            raise MediaUnavailable(_failure(f"fetch {what} from Feishu", exc)) from None

    async def recognize(self, pcm: Pcm) -> str:
        """Feishu's transcript of ``pcm``; see :class:`bot.chat.media.SpeechToText`."""
        file_id = "".join(secrets.choice(_FILE_ID_ALPHABET) for _ in range(16))
        try:
            return await self._api.recognize_speech(pcm.data, file_id=file_id)
        except FeishuApiError as exc:
            log.warning("speech_not_recognized", seconds=round(pcm.seconds, 1), error=str(exc))
            raise MediaUnavailable(_failure("transcribe your voice message", exc)) from None

    async def publish(self, data: bytes, mime: str) -> str:
        """Upload an image; its ``image_key`` (what card markdown shows as ``![alt](key)``)."""
        try:
            return await self._api.upload_image(data, content_type=mime)
        except FeishuApiError as exc:
            log.warning("image_not_uploaded", bytes=len(data), error=str(exc))
            raise MediaUnavailable(_failure("upload the image to Feishu", exc)) from None


def _failure(doing: str, exc: FeishuApiError) -> str:
    """A user's view of a failed call: a missing scope named, else a try-again."""
    scope = exc.missing_scope
    if scope is not None:
        return (
            f"I could not {doing}: the bot lacks the Feishu permission {scope}. Please ask the "
            "bot's owner to add it (developer console → Permissions & Scopes) and publish the app."
        )
    if exc.retryable:
        return f"I could not {doing}: Feishu is not answering right now. Please try again soon."
    return f"I could not {doing} (Feishu said: {exc.msg[:120]})."
