"""Options and CAIRN_* variables of the `cairn` commands, parsed in-process.

An invalid value must stop the command that uses it with a usage error
(exit status 2) that names the option, the value and, for a variable, the
variable, while every other command still runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.bus.settings import BusSettings
from engine.cli import build_parser

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# Arguments that each command needs besides the option under test.
COMMANDS = {
    "serve": ["serve"],
    "gc": ["gc"],
    "events-tail": ["events", "tail"],
    "events-republish": ["events", "republish", "--from", "1"],
    "mirror": [
        "mirror",
        "--source",
        "http://127.0.0.1:5000",
        "--target",
        "http://127.0.0.1:5001",
    ],
    "verify": ["verify"],
    "webhook": ["webhook"],
    "webhook-dead-letters": ["webhook", "dead-letters", "list"],
    "users-add": ["users", "add", "alice"],
}
# A command that reads no CAIRN_* variable.
UNRELATED_COMMAND = ["certificate", "--host", "localhost"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Remove the CAIRN_* variables of the shell that runs the tests."""
    for name in list(os.environ):
        if name.startswith("CAIRN_") and not name.startswith("CAIRN_TEST_"):
            monkeypatch.delenv(name)
    yield


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Parse ``argv``, expect exit status 2 and return standard error."""
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


# ---- logging ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "level"), [("debug", "debug"), ("INFO", "info"), ("Warning", "warning")]
)
def test_log_level_accepted(value: str, level: str) -> None:
    assert parse("--log-level", value, "verify").log_level == level


@pytest.mark.parametrize("value", ["verbose", "critical", ""])
def test_log_level_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    error = usage_error(capsys, "--log-level", value, "verify")

    assert f"argument --log-level: invalid choice: {value!r}" in error


# ---- CAIRN_* variables --------------------------------------------------------

# (variable, invalid value, command that uses it, its option)
INVALID_VARIABLES = [
    ("CAIRN_LISTEN", ":5000", "serve", "--listen"),
    ("CAIRN_LISTEN", "garbage", "serve", "--listen"),
    ("CAIRN_SHUTDOWN_TIMEOUT", "x", "serve", "--shutdown-timeout"),
    ("CAIRN_SHUTDOWN_TIMEOUT", "nan", "serve", "--shutdown-timeout"),
    ("CAIRN_UPLOAD_EXPIRY", "soon", "serve", "--upload-expiry"),
    ("CAIRN_UPLOAD_EXPIRY", "soon", "gc", "--upload-expiry"),
    ("CAIRN_UPLOAD_EXPIRY", "0", "serve", "--upload-expiry"),
    ("CAIRN_UPLOAD_EXPIRY", "0", "gc", "--upload-expiry"),
    ("CAIRN_GC_GRACE_PERIOD", "-1", "gc", "--grace-period"),
    ("CAIRN_READ_IDLE_TIMEOUT", "soon", "serve", "--read-idle-timeout"),
    ("CAIRN_WRITE_IDLE_TIMEOUT", "inf", "serve", "--write-idle-timeout"),
    ("CAIRN_MAX_BLOB_SIZE", "foo", "serve", "--max-blob-size"),
    ("CAIRN_MAX_BLOB_SIZE", "  10MiB ", "serve", "--max-blob-size"),
    ("CAIRN_RATE_LIMIT", "0", "serve", "--rate-limit"),
    ("CAIRN_TRUSTED_PROXIES", "notanip", "serve", "--trusted-proxies"),
    ("CAIRN_NATS_PORT", "99999", "serve", "--nats-port"),
    ("CAIRN_NO_NATS", "enabled", "serve", "--no-nats"),
    ("CAIRN_PUBLISH_PULLS", "2", "serve", "--publish-pulls"),
    ("CAIRN_RELATIVE_URLS", "y", "serve", "--relative-urls"),
    ("CAIRN_NATS_STREAM", "bad.name", "serve", "--stream"),
    ("CAIRN_NATS_STREAM", "bad.name", "events-tail", "--stream"),
    ("CAIRN_NATS_STREAM", "bad.name", "events-republish", "--stream"),
    ("CAIRN_NATS_STREAM", "bad.name", "mirror", "--stream"),
    ("CAIRN_NATS_SUBJECT_PREFIX", "a.>", "serve", "--subject-prefix"),
    ("CAIRN_NATS_SUBJECT_PREFIX", "a.>", "events-tail", "--subject-prefix"),
    ("CAIRN_NATS_SUBJECT_PREFIX", "a.>", "mirror", "--subject-prefix"),
    ("CAIRN_DATABASE_URL", "junk", "verify", "--database"),
    ("CAIRN_DATABASE_URL", "junk", "gc", "--database"),
    ("CAIRN_DATABASE_URL", "junk", "events-republish", "--database"),
    ("CAIRN_DATABASE_URL", "mysql://x", "serve", "--database"),
    ("CAIRN_NATS_URL", "junk", "serve", "--nats"),
    ("CAIRN_NATS_URL", "http://127.0.0.1:4222", "events-tail", "--nats"),
    ("CAIRN_NATS_URL", "nats://host:port", "mirror", "--nats"),
    ("CAIRN_NATS_URL", "junk", "webhook", "--nats"),
    ("CAIRN_NATS_URL", "junk", "webhook-dead-letters", "--nats"),
    ("CAIRN_AUTH_FILE", "", "serve", "--auth-file"),
    ("CAIRN_AUTH_FILE", "", "users-add", "--auth-file"),
    ("CAIRN_TLS_CERT", "", "serve", "--tls-cert"),
    ("CAIRN_TLS_KEY", "", "serve", "--tls-key"),
    ("CAIRN_MIRROR_SOURCE_CREDS_FILE", "", "mirror", "--source-creds-file"),
    ("CAIRN_MIRROR_TARGET_CREDS_FILE", "", "mirror", "--target-creds-file"),
]


@pytest.mark.parametrize(("variable", "value", "command", "option"), INVALID_VARIABLES)
def test_invalid_variable_spares_other_commands(
    variable: str,
    value: str,
    command: str,
    option: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(variable, value)

    args = parse(*UNRELATED_COMMAND)

    assert args.command == "certificate"


@pytest.mark.parametrize(("variable", "value", "command", "option"), INVALID_VARIABLES)
def test_invalid_variable_is_usage_error(
    variable: str,
    value: str,
    command: str,
    option: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)

    error = usage_error(capsys, *COMMANDS[command])

    assert f"argument {option}: " in error
    assert repr(value) in error
    assert f"(from environment variable {variable})" in error
    assert "Traceback" not in error


def test_option_error_names_no_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAIRN_LISTEN", "127.0.0.1:5000")

    error = usage_error(capsys, "serve", "--listen", "garbage")

    assert "invalid listen address 'garbage'" in error
    assert "environment variable" not in error


@pytest.mark.parametrize("command", ["mirror", "mirror-oci"])
def test_invalid_credentials_variable_hidden(
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = COMMANDS["mirror"]
    if command == "mirror-oci":
        argv = [*argv[:-1], "oci:/tmp/layout"]
    monkeypatch.setenv("CAIRN_MIRROR_SOURCE_CREDS", "s3cret-without-colon")

    error = usage_error(capsys, *argv)

    assert "argument --source-creds: invalid credentials: " in error
    assert "(from environment variable CAIRN_MIRROR_SOURCE_CREDS)" in error
    assert "s3cret" not in error


@pytest.mark.parametrize(
    ("variable", "url", "redacted"),
    [
        (
            "CAIRN_DATABASE_URL",
            "postgresql://cairn:s3cret@127.0.0.1:port/cairn",
            "'postgresql://cairn:***@127.0.0.1:port/cairn'",
        ),
        (
            "CAIRN_DATABASE_URL",
            "mysql://cairn:s3cret@127.0.0.1/cairn",
            "'mysql://cairn:***@127.0.0.1/cairn'",
        ),
        (
            "CAIRN_NATS_URL",
            "nats://s3cret@127.0.0.1:port",
            "'nats://***@127.0.0.1:port'",
        ),
    ],
)
def test_invalid_url_variable_hides_password(
    variable: str,
    url: str,
    redacted: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, url)

    error = usage_error(capsys, *COMMANDS["serve"])

    assert redacted in error
    assert f"(from environment variable {variable})" in error
    assert "s3cret" not in error


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "nats://user:password@nats.example.com",
        "tls://[::1]:4222",
        "ws://127.0.0.1:8080",
        "wss://nats.example.com",
        "127.0.0.1:4222",
    ],
)
@pytest.mark.parametrize(
    "command", ["serve", "events-tail", "mirror", "webhook", "webhook-dead-letters"]
)
def test_nats_url_variable_accepted(
    command: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_NATS_URL", url)

    assert parse(*COMMANDS[command]).nats_url == url


@pytest.mark.parametrize("command", ["serve", "mirror"])
def test_empty_nats_url_variable_unset(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_NATS_URL", "")

    assert parse(*COMMANDS[command]).nats_url is None


@pytest.mark.parametrize("command", ["webhook", "webhook-dead-letters"])
def test_webhook_nats_option_overrides_variable(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_NATS_URL", "junk")

    args = parse(*COMMANDS[command], "--nats", "nats://127.0.0.1:4223")

    assert args.nats_url == "nats://127.0.0.1:4223"


@pytest.mark.parametrize(
    "url",
    ["sqlite:////tmp/cairn.db", "postgresql://cairn@127.0.0.1/cairn"],
)
def test_database_url_variable_accepted(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_DATABASE_URL", url)

    assert parse("verify").database_url == url


@pytest.mark.parametrize("option", ["--tls-cert", "--tls-key"])
def test_empty_tls_option_rejected(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, "serve", option, "")

    assert f"argument {option}: invalid file name ''" in error
    assert "environment variable" not in error


def test_tls_options_override_empty_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAIRN_TLS_CERT", "")
    monkeypatch.setenv("CAIRN_TLS_KEY", "")

    args = parse("serve", "--tls-cert", "cert.pem", "--tls-key", "key.pem")

    assert args.tls_cert == Path("cert.pem")
    assert args.tls_key == Path("key.pem")


def test_tls_variables_reach_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_TLS_CERT", "cert.pem")
    monkeypatch.setenv("CAIRN_TLS_KEY", "key.pem")

    args = parse("serve")

    assert args.tls_cert == Path("cert.pem")
    assert args.tls_key == Path("key.pem")


def test_valid_variables_reach_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_LISTEN", "[::1]:5050")
    monkeypatch.setenv("CAIRN_SHUTDOWN_TIMEOUT", "2.5")

    args = parse("serve")

    assert args.listen == ("::1", 5050)
    assert args.shutdown_timeout == 2.5


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["verify", "--data-dir", "missing"]],
    ids=["help", "verify"],
)
def test_invalid_listen_variable_spares_cli(argv: list[str], tmp_path: Path) -> None:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CAIRN_") or name.startswith("CAIRN_TEST_")
    }
    environment["CAIRN_LISTEN"] = ":5000"
    environment["CAIRN_SHUTDOWN_TIMEOUT"] = "x"

    completed = subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env={**environment, "PYTHONPATH": str(REPOSITORY_ROOT)},
        timeout=60,
    )

    assert "Traceback" not in completed.stderr
    if argv == ["--help"]:
        assert completed.returncode == 0, completed.stderr
        assert "usage: cairn" in completed.stdout
    else:
        assert completed.returncode == 1, completed.stderr
        assert f"data directory {tmp_path / 'missing'} not found" in completed.stderr


# ---- yes-or-no variables ------------------------------------------------------

FLAG_VARIABLES = {
    "CAIRN_NO_NATS": "no_nats",
    "CAIRN_PUBLISH_PULLS": "publish_pulls",
    "CAIRN_RELATIVE_URLS": "relative_urls",
}
TRUE_SPELLINGS = ["1", "true", "TRUE", "Yes", "on", "ON", " on "]
FALSE_SPELLINGS = ["0", "false", "False", "NO", "off", ""]


@pytest.mark.parametrize("variable", list(FLAG_VARIABLES))
@pytest.mark.parametrize("value", TRUE_SPELLINGS)
def test_flag_variable_true(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)

    args = parse("serve")

    assert getattr(args, FLAG_VARIABLES[variable]) is True


@pytest.mark.parametrize("variable", list(FLAG_VARIABLES))
@pytest.mark.parametrize("value", FALSE_SPELLINGS)
def test_flag_variable_false(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)

    args = parse("serve")

    assert getattr(args, FLAG_VARIABLES[variable]) is False


@pytest.mark.parametrize("variable", list(FLAG_VARIABLES))
def test_flag_unset_is_false(variable: str) -> None:
    assert getattr(parse("serve"), FLAG_VARIABLES[variable]) is False


def test_flag_option_overrides_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_NO_NATS", "off")
    monkeypatch.setenv("CAIRN_RELATIVE_URLS", "invalid but overridden")

    args = parse("serve", "--no-nats", "--relative-urls")

    assert args.no_nats is True
    assert args.relative_urls is True


@pytest.mark.parametrize("value", ["1", "invalid but overridden"])
def test_nats_option_overrides_no_nats_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CAIRN_NO_NATS", value)

    args = parse("serve", "--nats", "nats://127.0.0.1:4223")

    assert args.no_nats is False
    assert args.nats_url == "nats://127.0.0.1:4223"
    assert BusSettings.from_args(args).enabled is True


def test_no_nats_variable_without_nats_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CAIRN_NO_NATS", "1")
    monkeypatch.setenv("CAIRN_NATS_URL", "nats://127.0.0.1:4223")

    assert BusSettings.from_args(parse("serve")).enabled is False


def test_nats_and_no_nats_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    error = usage_error(capsys, "serve", "--nats", "nats://127.0.0.1:4222", "--no-nats")

    assert "not allowed with argument" in error


# ---- stream and subject prefix ------------------------------------------------

STREAM_MESSAGE = "invalid stream name 'bad.name': use 1 to 32 letters, digits"
PREFIX_MESSAGE = "invalid subject prefix 'a.>': expected one or more tokens"


@pytest.mark.parametrize(
    "command", ["serve", "events-tail", "events-republish", "mirror"]
)
def test_invalid_stream_rejected(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS[command], "--stream", "bad.name")

    assert f"argument --stream: {STREAM_MESSAGE}" in error


@pytest.mark.parametrize("command", ["serve", "events-tail", "mirror"])
@pytest.mark.parametrize("prefix", ["a.>", "a..b", "", "with space"])
def test_invalid_subject_prefix_rejected(
    command: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS[command], "--subject-prefix", prefix)

    assert f"argument --subject-prefix: invalid subject prefix {prefix!r}" in error


@pytest.mark.parametrize(
    "command", ["serve", "events-tail", "events-republish", "mirror"]
)
def test_stream_from_variable(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_NATS_STREAM", "EVENTS_2")

    assert parse(*COMMANDS[command]).stream == "EVENTS_2"


@pytest.mark.parametrize("command", ["serve", "events-tail", "mirror"])
def test_subject_prefix_accepted(command: str) -> None:
    args = parse(*COMMANDS[command], "--subject-prefix", "acme.registry")

    assert args.subject_prefix == "acme.registry"


# ---- event positions and counts -----------------------------------------------


@pytest.mark.parametrize("command", ["events-tail", "events-republish"])
@pytest.mark.parametrize("value", ["0", "-3", "first", "1.5"])
def test_invalid_from_position_rejected(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS[command], "--from", value)

    assert f"argument --from: invalid position {value!r}" in error
    assert "expected a whole number, 1 or more" in error


@pytest.mark.parametrize("value", ["0", "-1", "all"])
def test_invalid_tail_count_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, "events", "tail", "--count", value)

    assert f"argument --count: invalid count {value!r}" in error
    assert "expected a whole number, 1 or more" in error


def test_tail_from_and_count_accepted() -> None:
    args = parse("events", "tail", "--from", "1", "--count", "5")

    assert args.from_position == 1
    assert args.count == 5


def test_tail_from_and_count_default() -> None:
    args = parse("events", "tail")

    assert args.from_position is None
    assert args.count is None


# ---- serve --------------------------------------------------------------------


def test_shutdown_timeout_default() -> None:
    assert parse("serve").shutdown_timeout == 30.0


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("2.5", 2.5)])
def test_shutdown_timeout_accepted(value: str, seconds: float) -> None:
    assert parse("serve", "--shutdown-timeout", value).shutdown_timeout == seconds


@pytest.mark.parametrize("value", ["nan", "-3", "inf", "soon"])
def test_shutdown_timeout_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, "serve", "--shutdown-timeout", value)

    assert f"argument --shutdown-timeout: invalid duration {value!r}" in error


# ---- mirror -------------------------------------------------------------------


def test_mirror_number_defaults() -> None:
    args = parse(*COMMANDS["mirror"])

    assert args.poll_interval == 2.0
    assert args.timeout == 60.0
    assert args.retries == 8


@pytest.mark.parametrize("option", ["--poll-interval", "--timeout"])
@pytest.mark.parametrize(("value", "seconds"), [("0.5", 0.5), ("30", 30.0)])
def test_mirror_seconds_accepted(option: str, value: str, seconds: float) -> None:
    args = parse(*COMMANDS["mirror"], option, value)

    assert getattr(args, option.removeprefix("--").replace("-", "_")) == seconds


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "soon"])
def test_mirror_poll_interval_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS["mirror"], f"--poll-interval={value}")

    assert f"argument --poll-interval: invalid duration {value!r}" in error
    assert "expected a number greater than 0" in error


@pytest.mark.parametrize("value", ["0", "0.0"])
def test_mirror_timeout_zero_turns_off(value: str) -> None:
    assert parse(*COMMANDS["mirror"], "--timeout", value).timeout is None


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "soon"])
def test_mirror_timeout_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS["mirror"], f"--timeout={value}")

    assert f"argument --timeout: invalid timeout {value!r}" in error
    assert "or 0 to turn the timeout off" in error


def test_mirror_retries_accepted() -> None:
    assert parse(*COMMANDS["mirror"], "--retries", "1").retries == 1


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "nan", "many"])
def test_mirror_retries_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS["mirror"], f"--retries={value}")

    assert f"argument --retries: invalid count {value!r}" in error
    assert "expected a whole number, 1 or more" in error


def test_mirror_repositories_accepted() -> None:
    patterns = ["library/*", "team-[ab]/?", "[!a]*", "[]a]/*"]
    args = parse(*COMMANDS["mirror"], "--repositories", *patterns)

    assert args.repositories == patterns


@pytest.mark.parametrize(
    "value", ["Library/*", "library/app:v1", "", "a b", "[", "team-[ab/*", "a]", "a!b"]
)
def test_mirror_repositories_rejected(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *COMMANDS["mirror"], f"--repositories={value}")

    assert f"argument --repositories: invalid repository pattern {value!r}" in error
    assert "would match none" in error


# ---- numbers ------------------------------------------------------------------

# Each numeric option with the other arguments its command needs.
NUMBER_OPTIONS = {
    "--from": [*COMMANDS["events-tail"]],
    "--count": [*COMMANDS["events-tail"]],
    "--retries": [*COMMANDS["mirror"]],
    "--poll-interval": [*COMMANDS["mirror"]],
    "--timeout": [*COMMANDS["mirror"]],
    "--rate-limit": [*COMMANDS["serve"]],
    "--shutdown-timeout": [*COMMANDS["serve"]],
    "--read-idle-timeout": [*COMMANDS["serve"]],
    "--upload-expiry": [*COMMANDS["gc"]],
    "--grace-period": [*COMMANDS["gc"]],
    "--nats-port": [*COMMANDS["serve"]],
    "--days": UNRELATED_COMMAND,
}


# Arabic-Indic 3, fullwidth 1, a digit separator and a space, which int()
# and float() read as numbers. Superscript 2, which str.isdigit() accepts
# and int() rejects. A number past int64.
NON_ASCII_NUMBERS = ["\u0663", "\uff11", "1_0", " 3", "1\u00b2", "1" * 20]


@pytest.mark.parametrize("option", list(NUMBER_OPTIONS))
@pytest.mark.parametrize("value", NON_ASCII_NUMBERS)
def test_number_must_be_ascii(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = usage_error(capsys, *NUMBER_OPTIONS[option], f"{option}={value}")

    assert f"argument {option}: invalid " in error
    assert repr(value) in error


@pytest.mark.parametrize(
    ("option", "maximum"),
    [
        ("--shutdown-timeout", "9223372036"),
        ("--read-idle-timeout", "9223372036"),
        ("--poll-interval", "9223372036"),
        ("--timeout", "9223372036"),
        ("--grace-period", "153722867"),
        ("--upload-expiry", "2562047"),
    ],
)
def test_duration_maximum(
    option: str, maximum: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The maximum is 2^63-1 nanoseconds in the option's unit. Larger numbers
    # of hours made gc fail with OverflowError in datetime arithmetic.
    argv = NUMBER_OPTIONS[option]
    name = option.removeprefix("--").replace("-", "_")
    assert getattr(parse(*argv, option, maximum), name) == float(maximum)

    above = str(int(maximum) + 1)
    error = usage_error(capsys, *argv, f"{option}={above}")
    assert f"argument {option}: invalid " in error
    assert f"up to {maximum}" in error

    error = usage_error(capsys, *argv, f"{option}=1e308")
    assert f"argument {option}: invalid " in error


def test_position_maximum(capsys: pytest.CaptureFixture[str]) -> None:
    largest = str(2**63 - 1)
    assert parse(*COMMANDS["events-tail"], "--from", largest).from_position == 2**63 - 1

    error = usage_error(capsys, *COMMANDS["events-tail"], f"--from={2**63}")
    assert f"invalid position '{2**63}'" in error
