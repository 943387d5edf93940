"""Media the bot reads and writes: voice, images, files and formulas, with no transport inside.

Each module does one conversion on bytes in memory and imports its heavy library (PyAV, Pillow,
pypdf, matplotlib) only when first used, so a bot that never meets that kind of media pays no
memory for it. They are synchronous and CPU-bound: callers on the event loop run them in a
worker thread (``asyncio.to_thread``).
"""
