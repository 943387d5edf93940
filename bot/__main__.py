"""Entry point of ``python -m bot`` and the ``feishu-gpt-bot`` console script."""

from __future__ import annotations

import sys

from bot import signals

signals.stop_quietly_on_sigterm()  # before the heavy imports: a SIGTERM now is a clean exit

try:
    from bot.cli import main
except signals.StopRequested:  # SIGTERM while still importing
    sys.exit(0)
except KeyboardInterrupt:  # Ctrl-C while still importing: no traceback
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
