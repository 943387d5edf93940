"""feishu-gpt-bot: a self-hosted ChatGPT bot for Feishu (Lark) over the outbound long connection."""

from __future__ import annotations

__version__ = "0.1.0"
