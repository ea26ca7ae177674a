"""Command-line options of `cairn mirror`."""

from __future__ import annotations

import argparse
from pathlib import Path

from consumers.globs import check_repository_pattern
from consumers.mirror.credentials import CredentialsError, parse_credentials
from engine.api.options import parse_positive_duration, parse_timeout
from engine.bus.options import parse_count, parse_stream_name, parse_subject_prefix
from engine.config import (
    env_default,
    names_env_variable,
    parse_file_path,
    parse_nats_url,
)


def _repository_pattern(value: str) -> str:
    try:
        return check_repository_pattern(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@names_env_variable
def _parse_credentials_option(value: str) -> str:
    try:
        parse_credentials(value, "the value")
    except CredentialsError:
        # The message leaves the value out, because it contains a password.
        raise argparse.ArgumentTypeError(
            "invalid credentials: expected USER:PASSWORD, a user name and a "
            "colon before the password"
        ) from None
    return value


def add_mirror_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        required=True,
        help="base URL of the cairn registry to copy from, e.g. http://127.0.0.1:5000",
    )
    parser.add_argument(
        "--target",
        required=True,
        help="base URL of the registry to copy to (cairn or any OCI registry), "
        "or oci:DIR for an OCI image layout per repository under DIR",
    )
    _add_credentials_options(parser, "source")
    _add_credentials_options(parser, "target")
    parser.add_argument(
        "--repositories",
        nargs="+",
        action="extend",
        default=[],
        type=_repository_pattern,
        metavar="GLOB",
        help="mirror only repositories matching one of these shell patterns, "
        "e.g. 'library/*'; default: every repository",
    )

    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after catching up with the source's head instead of following",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="file that records the last applied position, to resume from, "
        "the events not copied whole, to retry at the next start, and the "
        "source's registry id: a source reset or replaced since then stops "
        "the mirror with status 2; default: none, so every run replays from "
        "position 0",
    )

    parser.add_argument(
        "--nats",
        dest="nats_url",
        type=parse_nats_url,
        default=env_default("NATS_URL") or None,
        help="NATS server of the source, to follow new events as they happen "
        "(env CAIRN_NATS_URL); without it, or while it is unreachable, the "
        "mirror polls the HTTP feed",
    )
    parser.add_argument(
        "--stream",
        type=parse_stream_name,
        default=env_default("NATS_STREAM", "CAIRN"),
        help="JetStream stream of the source's events (env CAIRN_NATS_STREAM; "
        "default CAIRN)",
    )
    parser.add_argument(
        "--subject-prefix",
        type=parse_subject_prefix,
        default=env_default("NATS_SUBJECT_PREFIX", "cairn"),
        help="first subject token of the source's events "
        "(env CAIRN_NATS_SUBJECT_PREFIX; default cairn)",
    )

    parser.add_argument(
        "--propagate-deletes",
        action="store_true",
        help="also delete tags, manifests and blobs on the target when the "
        "source deletes them; a tag that the target cannot delete alone "
        "(Distribution 2.8) counts as not copied; default: deletes are not "
        "copied",
    )

    parser.add_argument(
        "--poll-interval",
        type=parse_positive_duration,
        default=2.0,
        metavar="SECONDS",
        help="seconds between reads of the HTTP feed while NATS is not used or "
        "not connected (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=parse_timeout,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for a connection or for the next bytes of a "
        "response, on source and target; 0 turns it off (default 60)",
    )
    parser.add_argument(
        "--retries",
        type=parse_count,
        default=8,
        metavar="N",
        help="attempts per event after timeouts and 5xx or 429 responses, with "
        "exponential backoff, before the mirror stops with status 1 (default 8)",
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "line", "log", "none"],
        default="auto",
        help="progress reports: a rewritten line on standard error, log lines, "
        "or none; auto picks the line on a terminal (default auto)",
    )


def _add_credentials_options(parser: argparse.ArgumentParser, side: str) -> None:
    variable = f"MIRROR_{side.upper()}_CREDS"
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        f"--{side}-creds",
        type=_parse_credentials_option,
        default=env_default(variable) or None,
        metavar="USER:PASSWORD",
        help=f"HTTP Basic credentials for the {side} (env CAIRN_{variable}). "
        "Other users of the host can read a value on the command line in the "
        "process list, so prefer the variable or a credentials file; default: "
        f"the user and password in the --{side} URL, if any",
    )
    group.add_argument(
        f"--{side}-creds-file",
        # An empty variable is rejected, as an empty FILE on the command line
        # is, instead of leaving the side without credentials.
        type=parse_file_path,
        default=env_default(f"{variable}_FILE"),
        metavar="FILE",
        help=f"file whose first line is USER:PASSWORD for the {side} "
        f"(env CAIRN_{variable}_FILE)",
    )
