"""Where things are in the Feishu / Lark developer console, in the words its pages use.

The fixes doctor prints name these pages, in English with the Chinese label the console shows
in a Chinese locale, as the README's setup steps do.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

FEISHU_DOMAIN: Final = "https://open.feishu.cn"
LARK_DOMAIN: Final = "https://open.larksuite.com"

CREDENTIALS: Final = "Credentials & Basic Info (凭证与基础信息)"
ADD_BOT: Final = "Add features (添加应用能力) → Bot (机器人)"
PERMISSIONS: Final = "Permissions & Scopes (权限管理)"
EVENTS: Final = "Events & Callbacks (事件与回调)"
PERSISTENT_MODE: Final = '"Receive events through persistent connection" (使用长连接接收事件)'
RELEASE: Final = "Version Management & Release (版本管理与发布)"
PUBLISH: Final = (
    f"{RELEASE} → Create a version (创建版本) → publish it, and have the tenant admin approve it"
)


def is_lark(domain: str) -> bool:
    """Whether ``domain`` is Lark's (international) open platform."""
    return (urlsplit(domain).hostname or "").endswith("larksuite.com")


def console(domain: str) -> str:
    """The developer console that belongs to ``domain``."""
    return f"{LARK_DOMAIN if is_lark(domain) else FEISHU_DOMAIN}/app"


def page(domain: str, *path: str) -> str:
    """``https://open.feishu.cn/app → your app → …``: a page of the developer console."""
    return " → ".join([console(domain), "your app", *path])


def other_platform(domain: str) -> str:
    """The other platform's domain: Lark's for Feishu's, Feishu's for anything else."""
    return FEISHU_DOMAIN if is_lark(domain) else LARK_DOMAIN
