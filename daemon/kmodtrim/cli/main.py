"""``kmodtrim``'s entry point: parse, pick the verb, run it, turn every failure into one
line. Each verb's module is imported only when that verb runs.

Exit status: 0 success, 1 the operation failed, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import KmodtrimError
from ..names import is_valid_kernel_version
from .parser import UsageExit, parser_for
from .term import Console

# verb → (module under kmodtrim.cli, function)
VERBS = {
    "status": ("read", "status"), "history": ("read", "history"), "show": ("read", "show"),
    "plan": ("read", "plan"), "explain": ("read", "explain"), "observe": ("read", "observe"),
    "index": ("read", "index"), "forget": ("read", "forget"),
    "apply": ("change", "apply"), "rollback": ("change", "rollback"),
    "restore": ("change", "restore"), "kernel-event": ("change", "kernel_event"),
    "fleet": ("fleet", "fleet"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmodtrim``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parser_for(argv)
    try:
        args = parser.parse_args(argv)
    except UsageExit as exc:
        print(exc.message, file=sys.stderr)
        return exc.status
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.verb is None:
        parser.print_help(sys.stderr)
        return 2
    import logging  # after parsing: --version and --help answer without it

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="kmodtrim: %(name)s: %(message)s")
    log = logging.getLogger("kmodtrim")
    console = Console(quiet=args.quiet, verbose=args.verbose, json=args.json)
    try:
        if not args.root.is_dir():
            console.error(f"--root {args.root}: not a directory")
            return 2
        if args.kernel is not None and not is_valid_kernel_version(args.kernel):
            console.error(f"--kernel {args.kernel[:80]!r}: not a kernel version")
            return 2
        module, function = VERBS[args.verb]
        if args.verb == "observe" and (args.export or args.salt or args.output):
            module, function = "fleet", "observe_export"
        run: Callable[[argparse.Namespace, Console], int] = getattr(
            importlib.import_module(f"kmodtrim.cli.{module}"), function)
        return int(run(args, console))
    except KmodtrimError as exc:
        if args.debug:
            log.exception("failed")
        console.error(exc.message, exc.hint)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("kmodtrim: interrupted; " + _state_after_interrupt(args.root), file=sys.stderr)
        return 130
    except (OSError, MemoryError, RecursionError, Exception) as exc:  # never a traceback
        if args.debug:
            log.exception("failed")
        console.error(_describe_unexpected(exc), "run it again with --debug for the details")
        return 1


def _describe_unexpected(exc: BaseException) -> str:
    """One line for an error no layer turned into a KmodtrimError."""
    if isinstance(exc, PermissionError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"permission denied{where}: changing the system's modules needs root"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    text = str(exc)
    text = text if len(text) <= 200 else text[:197] + "…"
    return f"unexpected {type(exc).__name__}: {text}" if text else \
        f"unexpected {type(exc).__name__}"


def _state_after_interrupt(root: Path) -> str:
    """What an interrupt left: the tree as it was, or an operation to finish or undo."""
    from ..store import read_journal

    try:
        if read_journal(root) is not None:
            return ("an operation was under way; it is finished or undone by the next "
                    "kmodtrim command that changes something (kmodtrim status shows it)")
    except KmodtrimError:
        return "the journal of the interrupted operation is damaged; run kmodtrim status"
    return "nothing was changed (the tree is as it was)"
