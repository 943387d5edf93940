"""Sample texts the token estimator is measured on (shared by bench/token_estimator.py)."""

from __future__ import annotations

SAMPLES: dict[str, str] = {
    "English prose, 62 words": (
        "The bot keeps one conversation per user in private chats and one per thread in groups. "
        "History is trimmed to a token budget before every request, oldest turns first, so a "
        "long chat never exceeds the model's context window. Counting tokens exactly would need "
        "a tokenizer file downloaded from the internet, which a server behind NAT may not reach."
    ),
    "Chinese prose, 95 characters": (
        "这个机器人通过长连接接收飞书消息，不需要公网地址，也不需要配置回调。"
        "每个用户在私聊中拥有独立的对话历史，群聊中则按话题区分。"
        "历史记录会在每次请求前按令牌预算裁剪，最早的轮次最先被移除。"
    ),
    "Mixed zh/en with code, 160 characters": (
        "请帮我看看这段代码为什么报错：TypeError: 'NoneType' object is not iterable，"
        "我在 for item in get_items(): 这一行调用了 get_items()，它有时返回 None。"
    ),
    "Python snippet, 14 lines": (
        "import asyncio\n\n"
        "async def fetch(session, url):\n"
        "    async with session.get(url, timeout=10) as response:\n"
        "        response.raise_for_status()\n"
        "        return await response.json()\n\n"
        "async def main(urls):\n"
        "    async with aiohttp.ClientSession() as session:\n"
        "        results = await asyncio.gather(*(fetch(session, u) for u in urls))\n"
        "    for url, data in zip(urls, results):\n"
        "        print(url, len(data))\n\n"
        "asyncio.run(main(['https://example.com/a.json', 'https://example.com/b.json']))\n"
    ),
}
