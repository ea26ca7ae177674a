"""Command-line options of `cairn webhook` and `cairn webhook dead-letters`."""

from __future__ import annotations

import argparse
from pathlib import Path

from consumers import DEFAULT_NATS_URL
from engine.config import env_default, parse_nats_url

REDELIVER_DESCRIPTION = """\
Send each selected dead letter to its endpoint again, once, and remove the
ones delivered. The exit status is 0 when no selected dead letter is kept,
1 when any is kept (because its delivery failed again, its endpoint is no
longer in the configuration, the stored record is invalid, or removing it
failed), when an --event-id
matches no dead letter, or when NATS is unreachable, and 2 for invalid
options, such as an --endpoint that the configuration does not define.
"""


def add_webhook_options(parser: argparse.ArgumentParser) -> None:
    # An empty CAIRN_NATS_URL means unset, as for the yes-or-no variables.
    _add_common(parser, argparse.SUPPRESS, env_default("NATS_URL") or argparse.SUPPRESS)
    commands = parser.add_subparsers(
        dest="webhook_command", metavar="COMMAND", required=False
    )
    dead_letters = commands.add_parser(
        "dead-letters", help="list or redeliver events that exhausted their attempts"
    )
    dead_letter_commands = dead_letters.add_subparsers(
        dest="dead_letters_command", metavar="COMMAND", required=True
    )

    listing = dead_letter_commands.add_parser("list", help="print the dead letters")
    _add_common(listing, argparse.SUPPRESS)
    _add_selection(listing)
    listing.add_argument(
        "--json", action="store_true", help="print one JSON object per line"
    )

    redeliver = dead_letter_commands.add_parser(
        "redeliver",
        help="send dead letters to their endpoints again, once each; each one "
        "delivered is removed",
        description=REDELIVER_DESCRIPTION,
    )
    _add_common(redeliver, argparse.SUPPRESS)
    _add_selection(redeliver)
    for command_parser in (parser, listing, redeliver):
        _show_config_required(command_parser)
    # argparse shows a subcommand as required even when it is optional, and
    # `cairn webhook` without one runs the webhook.
    parser.usage = (parser.usage or "").replace(" COMMAND ...", " [COMMAND ...]")


def _show_config_required(parser: argparse.ArgumentParser) -> None:
    """Set the usage line of ``parser`` to show --config as required.

    --config may be given before or after ``dead-letters COMMAND``, so
    argparse cannot require it on either parser, and ``commands.main``
    rejects a command line without it. Call this after the parser's last
    argument and subcommand are added.
    """
    usage = parser.format_usage().removeprefix("usage: ").rstrip()
    parser.usage = usage.replace("[--config FILE]", "--config FILE")


def _add_common(
    parser: argparse.ArgumentParser,
    default: object,
    nats_default: object = argparse.SUPPRESS,
) -> None:
    # The same options on `webhook` and on each dead-letters command; the
    # inner ones default to SUPPRESS so that they do not hide outer values.
    # The outer --nats takes CAIRN_NATS_URL as its default, so that argparse
    # checks the variable with parse_nats_url.
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="TOML file with the NATS settings and the [[endpoints]] "
        "(required, before or after dead-letters COMMAND)",
    )
    parser.add_argument(
        "--nats",
        dest="nats_url",
        type=parse_nats_url,
        default=nats_default,
        help="NATS server URL, e.g. nats://127.0.0.1:4222 (env CAIRN_NATS_URL); "
        "overrides [nats] url; default nats://127.0.0.1:4222",
    )


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help="only the dead letters of this endpoint")
    parser.add_argument(
        "--event-id",
        action="append",
        default=[],
        help="only the dead letter of this event id (repeatable)",
    )


def nats_url_from(args: argparse.Namespace, configured: str | None) -> str:
    """Pick the NATS URL: --nats, CAIRN_NATS_URL, the file's [nats] url, loopback.

    ``args.nats_url`` contains the value of --nats or of CAIRN_NATS_URL.
    """
    given = getattr(args, "nats_url", None)
    return given or configured or DEFAULT_NATS_URL
