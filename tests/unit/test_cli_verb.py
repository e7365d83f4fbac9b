"""A run builds only its verb's parser (cli/parser.py ``parser_for``): whatever the command
line, it parses to what the whole parser gives, and help and errors come from the whole
parser."""

from __future__ import annotations

import argparse

import pytest

from kmodtrim.cli.parser import VERBS, UsageExit, build_parser, parser_for, verb_of

ROOT = ["--root", "/mnt/image"]
PARSED = [
    ("status", ["status"]),
    ("status", ["status", "--verify", "--json"]),
    ("status", [*ROOT, "status"]),
    ("history", ["--root=/mnt/image", "-q", "history", "--offline"]),
    ("history", ["--kernel", "status", "history"]),  # "status" is --kernel's value
    ("plan", ["--observed", "a", "--observed", "b", "plan", "--all", "--observed", "c"]),
    ("plan", ["--json", "plan", *ROOT, "--policy", "p.toml"]),
    ("explain", ["explain", "virtio_net", "--kernel", "6.1.0-1"]),
    ("show", ["show", "1"]),
    ("rollback", ["rollback"]),
    ("rollback", ["rollback", "0", "--yes", "--initramfs", "skip"]),
    ("restore", ["--root", "/", "restore", "xfs", "dm_crypt", "--dry-run"]),
    ("forget", ["forget", "xfs"]),
    ("apply", ["apply", "--yes", "--force", "--backend", "stash"]),
    ("kernel-event", ["kernel-event", "add", "6.12.57+deb13-amd64"]),
    ("index", ["index", "--rebuild", "--no-cache", "--cache-dir", "/tmp/c"]),
    ("observe", ["observe", "--record"]),
]


@pytest.mark.parametrize(("verb", "argv"), PARSED, ids=[" ".join(a) for _, a in PARSED])
def test_the_verbs_parser_alone_parses_as_the_whole_one(verb: str, argv: list[str]) -> None:
    assert verb_of(argv) == verb
    assert parser_for(argv).parse_args(argv) == build_parser().parse_args(argv)


def test_only_the_named_verb_is_built() -> None:
    (verbs,) = (a for a in parser_for(["status"])._actions
                if isinstance(a, argparse._SubParsersAction))
    assert list(verbs.choices) == ["status"]


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-h"], ["--he"], ["--json"], ["statu"], ["--root"],
    ["--root", "/mnt", "--bogus", "status"], ["--verify", "status"], ["-h", "status"],
    ["--root", "/mnt", "--version"], ["--", "status"],
], ids=lambda argv: " ".join(argv) or "(nothing)")
def test_help_and_errors_come_from_the_whole_parser(argv: list[str]) -> None:
    assert verb_of(argv) is None
    whole = parser_for(argv)
    (verbs,) = (a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    assert list(verbs.choices) == [v.name for v in VERBS]


@pytest.mark.parametrize("argv", [["status", "--bogus"], ["show"], ["show", "x"],
                                  ["rollback", "--initramfs", "maybe"],
                                  ["kernel-event", "rename", "6.1.0-1"]])
def test_a_verbs_own_errors_read_the_same(argv: list[str]) -> None:
    with pytest.raises(UsageExit) as alone:
        parser_for(argv).parse_args(argv)
    with pytest.raises(UsageExit) as whole:
        build_parser().parse_args(argv)
    assert (alone.value.status, alone.value.message) == (whole.value.status,
                                                         whole.value.message)


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_a_verbs_help_reads_the_same(verb: str) -> None:
    def verb_help(parser: argparse.ArgumentParser) -> str:
        (verbs,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return str(verbs.choices[verb].format_help())

    assert verb_help(parser_for([verb])) == verb_help(build_parser())


@pytest.mark.parametrize("argv", [["--version"], ["--version", "status"],
                                  ["--version", "--bogus"], ["--version", "statu"]],
                         ids=" ".join)
def test_version_first_answers_as_the_whole_parser(argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    answers = []
    for parser in (parser_for(argv), build_parser()):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        answers.append((stop.value.code, capsys.readouterr()))
    assert answers[0] == answers[1]
    assert answers[0][1].out.startswith("kmodtrim ")
