"""``python -m bot doctor``: checks the setup step by step and says how to fix what is wrong.

Modules, one job each: :mod:`~bot.doctor.command` (options, output, exit code),
:mod:`~bot.doctor.runner` (the order of the checks, :func:`run_doctor`),
:mod:`~bot.doctor.feishu` (credentials, bot feature, scopes), :mod:`~bot.doctor.longconn` (the
long connection), :mod:`~bot.doctor.llm` (keys, models, a streamed answer),
:mod:`~bot.doctor.store`, :mod:`~bot.doctor.manual` (steps done by hand),
:mod:`~bot.doctor.watch` (``--watch``: wait for a real message), :mod:`~bot.doctor.scopes` (the
scopes the bot needs and what breaks without each), :mod:`~bot.doctor.console` (the developer
console's pages), :mod:`~bot.doctor.report` and :mod:`~bot.doctor.render` (results and lines).

Nothing is imported here: ``bot.cli`` imports :mod:`bot.doctor.command` for every command line.
"""

from typing import Final

DEFAULT_TIMEOUT_S: Final = 5.0
"""Each network request's timeout (connect and read), unless ``--timeout`` says otherwise."""
