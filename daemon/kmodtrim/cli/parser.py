"""The one parser of ``kmodtrim``: verbs, their options and help, derived from the option
table (request.py). Man pages and shell completion are generated from it too
(cli/docs.py). Only the standard library is imported here: ``--version`` and ``--help``
answer before anything heavy loads.

Global options may come before or after the verb (``kmodtrim --root /mnt status`` and
``kmodtrim status --root /mnt``): the top-level parser carries them with their defaults,
each verb's parser carries them again with no default, so a value given after the verb
wins and one given before it is kept.

A run parses with ``parser_for(argv)``: argparse finds the verb among the global options
first, and only that verb's parser is built (building all twelve is most of a quick
verb's parsing); help and errors without a plain verb come from the whole parser.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

from .. import __version__
from ..request import OPTION_BY_KEY, FleetAction, KernelAction

EXIT_CODES = """exit status:
  0    success
  1    the operation failed (also: a change without root, damaged stash copies)
  2    bad usage or input
  130  interrupted (one line says what state the tree is in)"""


class UsageExit(Exception):
    """argparse wants to stop with a message and status (kept so main() decides)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageExit(2, f"{self.prog}: error: {message}\n{self.format_usage().rstrip()}")


class Verb(NamedTuple):  # not a dataclass: making one costs a quick verb's start-up
    name: str
    summary: str
    description: str
    examples: tuple[str, ...]
    changes: bool = False  # a change verb: --yes, --dry-run where it applies


VERBS: tuple[Verb, ...] = (
    Verb("status", "what is trimmed now, the stash, observation and any pending operation",
         "Show the current generation, how many files are out of the tree and what the "
         "stash holds on disk, the kernel, the policy's mode, whether kmodtrimd runs, "
         "progress toward the minimum observation, and any interrupted operation or "
         "damaged stash copy.", ("kmodtrim status", "kmodtrim status --verify --json")),
    Verb("plan", "show what would be kept and removed, and why",
         "Index the kernel's modules, gather what the machine shows (and --observed "
         "files), apply the policy and print the plan: what is kept and why, what would "
         "be removed and what that frees.",
         ("kmodtrim plan", "kmodtrim --root /mnt/image plan --observed vm.txt --all")),
    Verb("explain", "why one module is kept or removed, and what is true of it now",
         "Print the chain of reasons that keeps a module (or why nothing does) and its "
         "state now: kept, would be removed, trimmed in generation N, restored in "
         "generation M.", ("kmodtrim explain virtio_net", "kmodtrim explain fs-xfs")),
    Verb("apply", "trim: apply the plan as a new generation",
         "Apply the plan: take the modules out (into the local stash), tell the package "
         "manager, rerun depmod and the initramfs generator. One summary line and a "
         "prompt come first; --yes skips the prompt.",
         ("kmodtrim apply --dry-run", "kmodtrim apply --yes --initramfs skip"), True),
    Verb("history", "list the generations",
         "One line per generation: number, date, action, files out and what it did; the "
         "current one is marked with '*'.", ("kmodtrim history",)),
    Verb("show", "show one generation: what it took out and put back",
         "List the modules, firmware and packages a generation took out or put back.",
         ("kmodtrim show 1",)),
    Verb("rollback", "return to generation GEN (default: undo the latest)",
         "Return the trees to an earlier generation's state, as a new generation. "
         "'rollback 0' puts every file back as installed.",
         ("kmodtrim rollback", "kmodtrim rollback 0 --yes"), True),
    Verb("restore", "put modules (with their dependencies and firmware) back",
         "Bring modules back from the stash, with their dependency closure; later plans "
         "keep them (reason 'restored') until 'kmodtrim forget'.",
         ("kmodtrim restore xfs", "kmodtrim restore dm_crypt --yes"), True),
    Verb("forget", "stop keeping modules restored by hand or on demand",
         "Later plans may trim these again (a policy exclude does the same).",
         ("kmodtrim forget xfs",)),
    Verb("observe", "show what the machine shows: loaded modules, devices, filesystems",
         "List the modules loaded now, the observations on record, the devices with a "
         "matching driver and the boot storage chain. --record remembers this boot's "
         "loaded modules.", ("kmodtrim observe", "kmodtrim observe --record")),
    Verb("index", "index the kernel's modules and show a summary",
         "Read every module's metadata (cached) and print what the kernel has.",
         ("kmodtrim index --rebuild",)),
    Verb("fleet", "merge many hosts' observations; export the merge for image builders",
         "The merge action reads observation exports (kmodtrim observe --export) and "
         "osquery kernel_modules result logs and writes one merge document: per module how "
         "many hosts and which images saw it, and the modules seen on enough hosts. The "
         "export action writes a merge as a mkosi KernelModules= drop-in, a dracut "
         "add_drivers conf or a kmodtrim policy drop-in; kmodtrim apply --root IMAGE "
         "--observed MERGE trims an image root to it.",
         ("kmodtrim fleet merge host*.json --min-hosts 2 -o merged.json",
          "kmodtrim fleet export --format mkosi merged.json -o mkosi.conf.d/50-fleet.conf")),
    Verb("kernel-event", "(for kernel install hooks) a kernel was added or removed",
         "Called by the kernel-install plugin and the Debian hooks. An added kernel is "
         "trimmed like the ones before it; a removed kernel's stash is forgotten.",
         ("kmodtrim kernel-event add 6.12.57+deb13-amd64",), True),
)


def _globals(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every verb takes, before or after the verb (see the module docstring)."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    env_root = os.environ.get("KMODTRIM_ROOT", "/")
    parser.add_argument("--root", type=Path, default=default(Path(env_root)), metavar="DIR",
                        help="operate on an image root instead of the live system "
                             "(default: $KMODTRIM_ROOT, else /)")
    for key in ("kernel", "policy"):
        option = OPTION_BY_KEY[key]
        parser.add_argument(option.flag, dest=key, default=default(None),
                            metavar=option.metavar, help=option.help,
                            type=Path if key == "policy" else str)
    observed = OPTION_BY_KEY["observed"]
    parser.add_argument(observed.flag, dest="observed", type=Path, action="append",
                        default=default([]), metavar=observed.metavar, help=observed.help)
    parser.add_argument("--symvers", type=Path, metavar="FILE", default=default(None),
                        help="the kernel's Module.symvers (exported symbols)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", default=default(None),
                        help="index cache directory (default ROOT/var/cache/kmodtrim)")
    parser.add_argument("--no-cache", action="store_true", default=default(False),
                        help="neither read nor write the index cache")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output (documents carry \"schema\")")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="print only warnings, errors and what was asked for")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="say more (each step, timings)")
    parser.add_argument("--offline", action="store_true", default=default(False),
                        help="never ask a running kmodtrimd; work in this process")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="debug log and tracebacks")


def _change(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb != "kernel-event":
        parser.add_argument(OPTION_BY_KEY["dry_run"].flag, dest="dry_run",
                            action="store_true", help=OPTION_BY_KEY["dry_run"].help)
        parser.add_argument("--yes", "-y", action="store_true",
                            help="do not ask for confirmation")
    for key in ("initramfs", "backend"):
        option = OPTION_BY_KEY[key]
        parser.add_argument(option.flag, dest=key, choices=list(option.choices),
                            default="auto" if key == "initramfs" else None,
                            help=option.help)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (also what man pages and completion are generated from);
    with ``only``, just that verb's parser under the top level (none for ``""``; see
    parser_for)."""
    parser = Parser(
        prog="kmodtrim",
        description="Keep installed kernel modules down to what this machine uses.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kmodtrim {__version__}")
    _globals(parser, top=True)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for verb in VERBS:
        if only is not None and verb.name != only:
            continue
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in verb.examples) \
            + "\n\n" + EXIT_CODES
        p = verbs.add_parser(verb.name, help=verb.summary,
                             description=textwrap.fill(verb.description, 88),
                             epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        _globals(p, top=False)
        if verb.changes:
            _change(p, verb.name)
        _arguments(p, verb.name)
    return parser


class _Stop(Exception):
    pass


class _VerbFinder(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Stop(message)


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` names, found by argparse itself with the global options (which
    may come first): None when that is not plain (a bad or missing verb, an option the top
    level does not take before the verb such as ``--help`` or ``--version``)."""
    if "--" in argv:  # argparse's own reading of it differs between the two parsers
        return None
    finder = _VerbFinder(prog="kmodtrim", add_help=False)
    _globals(finder, top=True)
    finder.add_argument("verb")
    finder.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        args, unknown = finder.parse_known_args(argv)
    except _Stop:
        return None
    known = {verb.name for verb in VERBS}
    return args.verb if not unknown and args.verb in known else None


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser to parse ``argv`` with: the verb's own and the top level only, when the
    verb is plain (most of the parser's cost is the verbs it does not need), else the
    whole one, which gives help and every error as it always has. ``--version`` first
    needs no verb at all: argparse answers it before it reads anything after it."""
    if argv[:1] == ["--version"]:
        return build_parser(only="")
    return build_parser(verb_of(argv))


def _arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """The verb's own arguments."""
    if verb in ("plan", "explain", "apply"):
        _option(p, "cloud", action="append", default=[])
    if verb == "index":
        p.add_argument("--rebuild", action="store_true",
                       help="ignore the cache and re-read every module")
    if verb == "plan":
        p.add_argument("--all", action="store_true", help="list every kept and removed module")
    elif verb == "explain":
        p.add_argument("name", metavar="NAME", help="module name or alias")
    elif verb == "observe":
        p.add_argument("--record", action="store_true",
                       help="remember the modules loaded now (for this boot)")
        _option(p, "export", action="store_true")
        _option(p, "salt")
        _option(p, "output", type=Path)
    elif verb == "fleet":
        _fleet(p)
    elif verb == "apply":
        option = OPTION_BY_KEY["force"]
        p.add_argument(option.flag, dest="force", action="store_true", help=option.help)
    elif verb == "show":
        p.add_argument("generation", type=int, metavar="GEN")
    elif verb == "rollback":
        p.add_argument("generation", type=int, nargs="?", metavar="GEN")
    elif verb in ("restore", "forget"):
        p.add_argument("names", nargs="+", metavar="NAME")
        if verb == "restore":
            _option(p, "on_demand", action="store_true")
    elif verb == "status":
        p.add_argument("--verify", action="store_true",
                       help="read and hash every stash copy (default: check each is present)")
    elif verb == "kernel-event":
        p.add_argument("action", choices=list(KernelAction))
        p.add_argument("kver", metavar="KVER")
        p.set_defaults(dry_run=False, yes=True)


def _option(p: argparse.ArgumentParser, key: str, **kwargs: object) -> None:
    """A verb's own option as request.OPTIONS declares it."""
    option = OPTION_BY_KEY[key]
    flags = [option.flag] + ([option.short] if option.short else [])
    if option.choices:
        kwargs["choices"] = list(option.choices)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    p.add_argument(*flags, dest=key, help=option.help, **kwargs)  # type: ignore[arg-type]


def _fleet(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="fleet_action", metavar="ACTION", parser_class=Parser,
                               required=True)
    merge = actions.add_parser(
        FleetAction.MERGE, help="merge observation exports and osquery result logs",
        description="Merge observation exports and osquery kernel_modules result logs "
                    "(JSON lines) into one document, printed or written with --output.")
    merge.add_argument("files", nargs="+", type=Path, metavar="FILE")
    threshold = merge.add_mutually_exclusive_group()
    _option(threshold, "min_hosts")  # type: ignore[arg-type]
    _option(threshold, "min_share")  # type: ignore[arg-type]
    _option(merge, "output", type=Path)
    export = actions.add_parser(
        FleetAction.EXPORT, help="write a merge for mkosi, dracut or a kmodtrim policy",
        description="Write the modules a merge keeps as a mkosi KernelModules= drop-in, "
                    "a dracut add_drivers conf or a kmodtrim policy drop-in.")
    export.add_argument("merge", type=Path, metavar="MERGE")
    _option(export, "format", required=True)
    _option(export, "output", type=Path)
