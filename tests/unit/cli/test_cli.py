"""The CLI framework: help for every command and flag, --version, common flags on
either side of the subcommand, usage errors and their exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from vmpool.cli import build_parser, main
from vmpool.cli import errors as cli_errors
from vmpool.cli.connection import reconnect_flags
from vmpool.core.version import package_version


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser({}).parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_has_a_description_and_an_example() -> None:
    for name, p in subcommands().items():
        assert p.description, name
        assert p.epilog and "examples:" in p.epilog and f"vmpool {name}" in p.epilog, name


def test_every_flag_is_described_with_its_default() -> None:
    for name, p in subcommands().items():
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
                helped = p._get_formatter()._get_help_string(action)  # type: ignore[attr-defined]
                assert helped and ("default" in helped or action.required), (
                    f"{name} {action.option_strings}: no default shown"
                )
        assert "--help" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"vmpool {package_version()}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "h:1", "--service-tag", "t", "-o", "json", "ping"],
        ["ping", "--server", "h:1", "--service-tag", "t", "--output", "json"],
        ["--server", "h:1", "ping", "--service-tag", "t", "-o", "json"],
        ["pool", "--server", "h:1", "list", "--service-tag", "t", "-o", "json"],
        [
            "pool",
            "leases",
            "--server",
            "h:1",
            "-o",
            "json",
            "list",
            "--pool",
            "p",
            "--service-tag",
            "t",
        ],
        [
            "-o",
            "json",
            "pool",
            "--service-tag",
            "t",
            "leases",
            "list",
            "--pool",
            "p",
            "--server",
            "h:1",
        ],
    ],
)
def test_common_flags_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser({}).parser.parse_args(argv)
    assert (args.server, args.service_tag, args.output) == ("h:1", "t", "json")


def test_environment_gives_the_defaults() -> None:
    env = {"VMPOOL_SERVER": "far:7", "VMPOOL_SERVICE_TAG": "ci"}
    args = build_parser(env).parser.parse_args(["pools"])
    assert (args.server, args.service_tag, args.output) == ("far:7", "ci", "text")


def test_usage_error_is_exit_2_and_json_with_output_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["lease", "--no-such-flag", "--output", "json"])
    assert stop.value.code == cli_errors.USAGE
    err = json.loads(capsys.readouterr().err)
    assert err["code"] == "USAGE" and "--no-such-flag" in err["message"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_local_commands_report_failures_as_output_says(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve, migrate and render fail through the same reporter as client
    commands: text lines as before, or one JSON object with --output json."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  - name: a\n    max_size: lots\n  - name: b\n    min_ready: -1\n")
    good = tmp_path / "good.yaml"
    good.write_text("pools:\n  - name: a\n")
    cases = [
        (["migrate", "--config", str(bad)], "bad config: ", "pools[0].max_size"),
        (["render", "--config", str(good), "--pool", "nope"], '--pool: no pool named "nope"', ""),
    ]
    for argv, starts, names in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == cli_errors.USAGE
        text = capsys.readouterr().err.splitlines()
        assert text and all(line.startswith(f"vmpool: {starts}") for line in text), text
        assert names in text[0]
        json_argv = ["-o", "json", *argv] if where == "before" else [*argv, "-o", "json"]
        with pytest.raises(SystemExit) as stop:
            main(json_argv)
        assert stop.value.code == cli_errors.USAGE
        err = json.loads(capsys.readouterr().err)
        assert err["code"] == "USAGE" and err["message"].startswith(starts), err
        assert names in err["message"]
    assert len(text) == 1


def test_bad_server_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["ping", "--server", "nocolon"])
    assert stop.value.code == cli_errors.USAGE
    assert "--server" in capsys.readouterr().err


def test_unreachable_server_is_exit_6(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["ping", "--server", "127.0.0.1:1", "-o", "json"])
    assert stop.value.code == cli_errors.UNAVAILABLE
    assert json.loads(capsys.readouterr().err)["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "interrupted: reservation r-1 cancelled",
            "vmpool: CANCELLED: interrupted: reservation r-1 cancelled\n",
        ),
        ("interrupted", "vmpool: CANCELLED: interrupted (reservation r-1)\n"),
    ],
)
def test_text_errors_name_the_reservation_once(
    message: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = cli_errors.CliError("CANCELLED", message, cli_errors.INTERRUPTED, "r-1")
    assert cli_errors.report(err, "text") == cli_errors.INTERRUPTED
    assert capsys.readouterr().err == expected


def test_printed_commands_reach_the_same_server_without_printing_a_token() -> None:
    """A command vmpool prints for the user to run next (e.g. after
    --keep-reservation) parses back to the same server and TLS settings; a
    secret given with --token is never echoed, one from the environment carries over."""
    argv = ["pools", "--server", "far:7", "--ca", "c a.pem", "--token", "s3cret"]
    args = build_parser({}).parser.parse_args(argv)
    flags = reconnect_flags(args, {})
    assert "s3cret" not in flags
    again = build_parser({}).parser.parse_args(["pools", *flags])
    assert (again.server, again.ca, again.token) == ("far:7", "c a.pem", "TOKEN")
    env = {"VMPOOL_TOKEN": "s3cret"}
    from_env = build_parser(env).parser.parse_args(["pools", "--server", "far:7", "--tls"])
    assert reconnect_flags(from_env, env) == ("--server", "far:7", "--tls")
