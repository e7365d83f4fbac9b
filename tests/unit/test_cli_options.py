"""The command line's parsing: verbs, choices, defaults, and usage errors that stop
before any root is touched (exit status 2, one error line and the usage, no traceback)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kmodtrim import __version__
from kmodtrim.cli import main
from kmodtrim.cli.parser import UsageExit, build_parser

MUTATING = ("apply", "rollback", "restore")
README_VERBS = ("plan", "explain", "apply", "history", "show", "rollback", "restore",
                "forget", "status", "observe", "index")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def verb_parser(verb: str) -> argparse.ArgumentParser:
    (verbs,) = (a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = verbs.choices[verb]
    return parser


def choices(verb: str, dest: str) -> tuple[str, ...]:
    (action,) = (a for a in verb_parser(verb)._actions if a.dest == dest)
    return tuple(action.choices or ())


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


# -- parsing -----------------------------------------------------------------------------


def test_every_verb_the_readme_documents_is_offered() -> None:
    (verbs,) = (a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction))
    assert set(README_VERBS) <= set(verbs.choices)


@pytest.mark.parametrize("verb", README_VERBS)
def test_common_options_are_accepted_after_every_verb(verb: str) -> None:
    extra = {"explain": ["virtio_net"], "show": ["1"], "restore": ["x"], "forget": ["x"]}
    args = parse(verb, *extra.get(verb, []), "--root", "/mnt/image", "--kernel", "6.1.0-1",
                 "--observed", "a.txt", "--policy", "p.toml", "--json", "--offline")
    assert (args.verb, args.root, args.kernel) == (verb, Path("/mnt/image"), "6.1.0-1")
    assert (args.observed, args.policy, args.json, args.offline) == \
        ([Path("a.txt")], Path("p.toml"), True, True)


def test_global_options_may_come_before_the_verb() -> None:
    args = parse("--root", "/mnt/image", "--json", "status", "--verify")
    assert (args.verb, args.root, args.json, args.verify) == ("status", Path("/mnt/image"),
                                                              True, True)


def test_global_option_after_the_verb_wins_over_one_before_it() -> None:
    assert parse("--root", "/a", "status", "--root", "/b").root == Path("/b")
    assert parse("--kernel", "6.1.0-1", "plan").kernel == "6.1.0-1"


def test_root_defaults_to_kmodtrim_root_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMODTRIM_ROOT", "/srv/image")
    assert parse("status").root == Path("/srv/image")
    monkeypatch.delenv("KMODTRIM_ROOT")
    assert parse("status").root == Path("/")


def test_plain_plan_uses_every_default() -> None:
    args = parse("plan")
    assert (args.kernel, args.observed, args.policy, args.symvers, args.cache_dir) == \
        (None, [], None, None, None)
    assert not (args.no_cache or args.json or args.offline or args.debug or args.all)


def test_observed_files_are_repeatable_in_order() -> None:
    assert parse("plan", "--observed", "b", "--observed", "a").observed == [Path("b"), Path("a")]


@pytest.mark.parametrize("verb", MUTATING)
def test_change_verbs_default_to_asking_and_the_policy_backend(verb: str) -> None:
    args = parse(verb, *(["virtio_gpu"] if verb == "restore" else []))
    assert (args.dry_run, args.yes, args.initramfs, args.backend) == (False, False, "auto", None)


def test_yes_has_a_short_form() -> None:
    assert parse("apply", "-y").yes
    assert parse("apply", "--yes", "--dry-run", "--force").force


@pytest.mark.parametrize("verb", MUTATING)
def test_initramfs_and_backend_choices_are_the_documented_ones(verb: str) -> None:
    assert choices(verb, "initramfs") == ("auto", "skip", "dracut", "update-initramfs",
                                          "kernel-install")
    assert choices(verb, "backend") == ("auto", "stash", "dpkg", "rpm")


def test_rollback_generation_is_optional_and_a_number() -> None:
    assert parse("rollback").generation is None
    assert parse("rollback", "0").generation == 0


def test_restore_and_forget_take_names_in_order() -> None:
    assert parse("restore", "b", "a").names == ["b", "a"]
    assert parse("forget", "x").names == ["x"]


def test_kernel_event_runs_without_asking() -> None:
    args = parse("kernel-event", "remove", "6.1.0-9-amd64")
    assert (args.action, args.kver) == ("remove", "6.1.0-9-amd64")
    assert (args.yes, args.dry_run, args.initramfs, args.backend) == (True, False, "auto", None)


def test_status_verify_and_index_rebuild_flags() -> None:
    assert parse("status", "--verify").verify
    assert not parse("status").verify
    assert parse("index", "--rebuild").rebuild


@pytest.mark.parametrize("argv", [
    ["frobnicate"], ["explain"], ["show"], ["show", "latest"], ["restore"],
    ["apply", "--initramfs", "mkinitcpio"], ["apply", "--backend", "apt"],
    ["kernel-event", "upgrade", "6.1"], ["plan", "--no-such-flag"],
])
def test_bad_usage_is_a_usage_error_with_status_2(argv: list[str]) -> None:
    with pytest.raises(UsageExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.status == 2
    assert "error:" in caught.value.message
    assert "usage: kmodtrim" in caught.value.message


# -- main: errors before any root is touched ---------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["explain"], "the following arguments are required: NAME"),
    (["show", "x"], "invalid int value: 'x'"),
    (["apply", "--initramfs", "mkinitcpio"], "invalid choice: 'mkinitcpio'"),
])
def test_usage_error_prints_one_error_and_the_usage_and_exits_2(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(argv, capsys)
    assert status == 2
    first, *rest = err.splitlines()
    assert first.startswith("kmodtrim") and "error:" in first and says in first
    assert rest[0].startswith("usage: kmodtrim")


def test_no_verb_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run([], capsys)
    assert status == 2
    assert err.startswith("usage: kmodtrim")
    assert "plan" in err


def test_version_prints_the_version_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kmodtrim {__version__}"


@pytest.mark.parametrize("kernel", ["../../etc", "6.1 0", "..", "a/b"])
def test_kernel_that_is_not_a_version_is_refused_before_the_root_is_read(
        kernel: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # main only needs --root to be a directory before it checks --kernel: an empty one.
    status, err = run(["plan", "--root", str(tmp_path), "--kernel", kernel], capsys)
    assert status == 2
    assert err == f"kmodtrim: error: --kernel {kernel!r}: not a kernel version\n"
    assert list(tmp_path.iterdir()) == []


def test_root_that_is_not_a_directory_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(["status", "--root", "/nonexistent-unit-root"], capsys)
    assert status == 2
    assert err == "kmodtrim: error: --root /nonexistent-unit-root: not a directory\n"
