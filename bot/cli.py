"""The command line: ``python -m bot run|chat|doctor|keys`` (also installed as ``feishu-gpt-bot``).

This is the edge where configuration errors become readable lines and exit codes:
0 success, 1 a runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot import __version__, keys_cli
from bot.config import CONFIG_ENV, Settings, load_settings, resolve_config_path
from bot.doctor import command as doctor_cli
from bot.errors import BotError, ConfigError, FeishuConnectError
from bot.feishu import sdk_compat, sdk_loader
from bot.logging import Redactor, configure_logging
from bot.signals import StopRequested
from bot.store import SECRET_KEY_ENV, secret_key_from_env

if TYPE_CHECKING:
    from bot.chat.terminal import ChatConsole

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

Command = Callable[[argparse.Namespace], int]

_DESCRIPTION = """\
A self-hosted ChatGPT bot for Feishu (Lark). It connects to Feishu over an outbound
WebSocket (no public URL needed) and answers with any OpenAI-compatible endpoint."""

_EPILOG = f"""\
configuration:
  The config file is --config PATH, else ${CONFIG_ENV}, else ./settings.yaml.
  Environment variables override it: FEISHU_APP_ID, FEISHU_APP_SECRET, OPENAI_BASE_URL,
  BOT_STORE_URL; OPENAI_API_KEYS="sk-a,sk-b" adds keys to llm.keys.
  {SECRET_KEY_ENV} (a Fernet key, or a passphrase of 16 characters or more) encrypts the
  stored API keys; the bot and `keys` need the same value to read them.

exit codes:
  0 success, 1 runtime failure, 2 invalid configuration or usage."""


def common_options(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The options every command takes, as a parent parser.

    With ``suppress_defaults`` an option that is not given sets nothing: a subcommand's parser
    (``keys list``) then keeps what was given before it (``keys --config x list``).
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress_defaults else value

    common = argparse.ArgumentParser(add_help=False)
    options = common.add_argument_group("common options")
    options.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=default(None),
        help=f"settings file (default: ${CONFIG_ENV} or ./settings.yaml)",
    )
    options.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=default(None),
        help="override log.level from the settings",
    )
    options.add_argument(
        "--json-logs",
        action="store_true",
        default=default(None),
        help="write logs as JSON lines (overrides log.json)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its help text."""
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    subcommands: list[tuple[str, str, str, Command]] = [
        (
            "run",
            "connect to Feishu and answer messages (needs feishu.app_id/app_secret)",
            "Connect to Feishu over the long connection and answer messages until stopped "
            "with Ctrl-C or SIGTERM.",
            _run,
        ),
        (
            "chat",
            "chat with the LLM in this terminal (no Feishu needed)",
            "An interactive chat in the terminal over the same conversation service the "
            "Feishu bot uses.",
            _chat,
        ),
        ("doctor", doctor_cli.SUMMARY, doctor_cli.DESCRIPTION, doctor_cli.run),
        ("keys", keys_cli.SUMMARY, keys_cli.DESCRIPTION, _keys),
    ]
    for name, summary, description, handler in subcommands:
        command = commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=description,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.set_defaults(handler=handler)
        if name == "keys":
            keys_cli.configure_parser(
                command, parents=[common_options(suppress_defaults=True)], epilog=_EPILOG
            )
        if name == "doctor":
            doctor_cli.configure_parser(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the subcommand; return the exit code."""
    if sdk_compat.sdk_version_supported():  # else the SDK loads whole, as it always did
        sdk_loader.load_api_services_on_demand()  # before anything imports the SDK
    args = build_parser().parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        return report_config_error(exc)
    except BotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except StopRequested:  # SIGTERM before the bot was serving: nothing to wind down
        return EXIT_OK


def report_config_error(exc: ConfigError) -> int:
    """Print one line per configuration problem and return the configuration exit code."""
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def load(args: argparse.Namespace) -> tuple[Settings, Path]:
    """Load and validate the settings named by the command line."""
    path = resolve_config_path(args.config)
    return load_settings(path), path


def log_options(
    args: argparse.Namespace, settings: Settings, *, default_level: str | None = None
) -> tuple[str, bool]:
    """The log level and whether to log JSON: the settings', with command-line overrides."""
    level = args.log_level or default_level or settings.log.level
    return level, settings.log.json_ if args.json_logs is None else args.json_logs


def setup_logging(
    args: argparse.Namespace,
    settings: Settings,
    *,
    default_level: str | None = None,
    stream: TextIO | None = None,
) -> Redactor:
    """Configure logging from the settings, with command-line overrides."""
    level, json = log_options(args, settings, default_level=default_level)
    return configure_logging(
        level=level,
        json=json,
        sdk_level=settings.log.sdk_level,
        secrets=settings.secrets(),
        stream=stream,
    )


def _run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    settings.require_feishu_credentials()
    redactor = setup_logging(args, settings)
    from bot.feishu.ingress import IngressConfig, IngressProcess

    # Started first, to be ready when the bot connects (see bot.feishu.ingress).
    level, json = log_options(args, settings)
    ingress = IngressProcess.spawn(
        IngressConfig.from_settings(settings, log_level=level, log_json=json)
    )
    try:
        from bot.feishu.runner import serve  # imports the Feishu SDK, which takes a moment

        asyncio.run(serve(settings, redactor, ingress))
    except FeishuConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        ingress.close()
    return EXIT_OK


def _chat(args: argparse.Namespace) -> int:
    from bot.chat.terminal import ChatConsole

    settings, _ = load(args)
    # The conversation is on stdout; only warnings and errors go to stderr unless asked, and
    # never into the middle of a `you>` or `bot>` line.
    console = ChatConsole(sys.stdout, sys.stderr)
    redactor = setup_logging(args, settings, default_level="warning", stream=console.log_stream)
    asyncio.run(_chat_session(settings, redactor, console))
    return EXIT_OK


async def _chat_session(settings: Settings, redactor: Redactor, console: ChatConsole) -> None:
    # Imported here: the core pulls in the OpenAI SDK, which `keys` and `--help` do not need.
    from bot.app import build_core
    from bot.chat.terminal import TerminalChat

    core = await build_core(settings, redactor)
    try:
        await TerminalChat(core.service, model=settings.llm.model, console=console).run()
    finally:
        await core.close()


def _keys(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    secret_key = secret_key_from_env()
    # The answer is on stdout and says what changed; the log adds only errors unless asked.
    redactor = setup_logging(args, settings, default_level="error")
    if secret_key is not None:
        redactor.add(secret_key)
    return asyncio.run(keys_cli.run(args, settings, secret_key=secret_key, redactor=redactor))
