"""``python -m bot doctor``: the command line of the checks (options, output, exit code).

Imports only the standard library at module level: ``bot.cli`` imports this module to build its
parser, and ``--help`` must stay fast. The checks (and the SDKs they use) load when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Final

from bot.doctor import DEFAULT_TIMEOUT_S

SUMMARY: Final = "check the setup step by step and say what to fix"

DESCRIPTION: Final = """\
Check the setup as a checklist: the settings; the Feishu app (credentials and platform, the bot
feature, the granted scopes, the long connection); the LLM endpoint (every key, the configured
models, one streamed answer timed to its first token); the store; then the steps done by hand in
the developer console. Each ✗ is followed by its fix. Secrets are never printed: keys appear
masked (sk-…abcd) with their key id.

With --watch, doctor then opens the long connection as the bot does and waits for one message:
send the bot a message and doctor shows it arrive (who sent it and in which kind of chat, not
the text). Doctor takes that message: a running bot would not get it.

output:
  ✓ passed   ✗ failed (then `fix: …`)   ! a note, or a check not run   · a step to do by hand

Doctor exits 0 when every check passed (notes and manual steps do not count), 1 when a check
failed (or --watch saw no message), 2 for an invalid configuration or missing Feishu
credentials."""

DEFAULT_WATCH_TIMEOUT_S: Final = 120.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add doctor's own options to its subcommand parser."""
    options = parser.add_argument_group("doctor options")
    options.add_argument(
        "--watch",
        action="store_true",
        help="after the checks, open the long connection and wait for one message to the bot",
    )
    options.add_argument(
        "--watch-timeout",
        type=_seconds,
        default=DEFAULT_WATCH_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long --watch waits for a message (default: {DEFAULT_WATCH_TIMEOUT_S:g})",
    )
    options.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"timeout of each network request (default: {DEFAULT_TIMEOUT_S:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run doctor for the parsed command line; return the exit code.

    A configuration problem raises :class:`bot.errors.ConfigError` (the CLI prints one line per
    problem and exits 2). With ``--watch`` the process ends here through ``os._exit``: the SDK's
    long connection cannot be stopped otherwise.
    """
    from bot.cli import load, setup_logging  # the same loading, and errors, as `run`
    from bot.doctor import longconn
    from bot.doctor.render import Printer
    from bot.doctor.report import Result
    from bot.doctor.runner import DoctorOptions, run_doctor
    from bot.store import create_store, secret_key_from_env

    settings, path = load(args)
    settings.require_feishu_credentials()
    secret_key = secret_key_from_env()
    # Not opened yet: a BOT_SECRET_KEY too short, or a store.url this version cannot open, is a
    # configuration error (exit 2) like every other.
    create_store(settings.store, secret_key=secret_key)
    # The checklist is on stdout; the log adds only errors unless asked.
    redactor = setup_logging(args, settings, default_level="error")
    if secret_key is not None:
        redactor.add(secret_key)
    printer = Printer(sys.stdout, redactor)
    options = DoctorOptions(
        timeout_s=args.timeout, secret_key=secret_key, config_path=path, watching=args.watch
    )
    report = asyncio.run(run_doctor(settings, options, on_result=printer.result, redactor=redactor))
    if not args.watch:
        printer.summary(report)
        return report.exit_code

    connected = any(r.name == longconn.NAME and r.status == "ok" for r in report.results)
    if not connected:
        note = "not started: the long connection check did not pass"
        printer.result(report.add(Result.warn("watch", note)))
        printer.summary(report)
        return report.exit_code
    from bot.doctor.watch import watch

    try:
        result = watch(settings.feishu, timeout_s=args.watch_timeout, announce=printer.result)
        printer.result(report.add(result))
        printer.summary(report)
        code = report.exit_code
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the SDK's long connection has no stop; its thread dies with the process
