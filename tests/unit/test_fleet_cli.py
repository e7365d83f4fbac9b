"""The fleet's command lines parse as request.py declares them: the verb's own parser as
the whole one, one threshold at a time, the formats of FleetFormat."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtrim.cli.parser import UsageExit, build_parser, parser_for, verb_of
from kmodtrim.request import FleetFormat

ARGV = [
    ["fleet", "merge", "a.json", "b.log", "--min-hosts", "2", "-o", "m.json"],
    ["fleet", "merge", "a.json", "--min-share", "50%"],
    ["fleet", "export", "--format", "dracut", "m.json"],
    ["observe", "--export", "--salt", "s3cret", "--output", "e.json"],
]


@pytest.mark.parametrize("argv", ARGV, ids=" ".join)
def test_fleet_verbs_parse_alone_as_in_the_whole_parser(argv: list[str]) -> None:
    assert verb_of(argv) == argv[0]
    assert parser_for(argv).parse_args(argv) == build_parser().parse_args(argv)


def test_merge_takes_files_and_a_threshold() -> None:
    args = build_parser().parse_args(ARGV[0])
    assert (args.fleet_action, args.files, args.min_hosts, args.min_share, args.output) == \
        ("merge", [Path("a.json"), Path("b.log")], "2", None, Path("m.json"))


@pytest.mark.parametrize("argv", [
    ["fleet", "merge", "a.json", "--min-hosts", "2", "--min-share", "0.5"],  # one of two
    ["fleet", "merge"],  # no file
    ["fleet", "export", "m.json"],  # no --format
    ["fleet", "export", "--format", "kiwi", "m.json"],
    ["fleet"],
])
def test_bad_fleet_usage_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(UsageExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.status == 2


def test_export_formats_are_the_declared_ones() -> None:
    for fmt in FleetFormat:
        assert build_parser().parse_args(["fleet", "export", "--format", fmt, "m"]).format \
            == fmt
