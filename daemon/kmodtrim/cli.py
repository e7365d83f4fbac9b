"""The ``kmodtrim`` command line. Thin: parses, calls operations, prints.

Exit status: 0 success, 1 the operation failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__
from .errors import KmodtrimError
from .operations import (
    PlanResult,
    Target,
    explain,
    gather_evidence,
    human_bytes,
    load_index,
    make_plan_for,
)
from .planner import Plan

log = logging.getLogger("kmodtrim")
TOP_SAVINGS = 15


class UsageExit(Exception):
    """argparse wants to stop with a message and status (kept so main() decides)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageExit(2, f"{self.prog}: error: {message}\n{self.format_usage().rstrip()}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="operate on an image root instead of the live system")
    parser.add_argument("--kernel", metavar="KVER",
                        help="kernel version (default: running kernel, else newest installed)")
    parser.add_argument("--observed", type=Path, action="append", default=[], metavar="FILE",
                        help="modules seen loaded: names one per line, '#' comments, "
                        "/proc/modules or lsmod lines (repeatable)")
    parser.add_argument("--policy", type=Path, metavar="FILE",
                        help="policy file to use instead of ROOT/etc/kmodtrim/policy.toml")
    parser.add_argument("--symvers", type=Path, metavar="FILE",
                        help="the kernel's Module.symvers (exported symbols)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="index cache directory (default ROOT/var/cache/kmodtrim)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--debug", action="store_true", help="debug log and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kmodtrim",
        description="Keep installed kernel modules down to what this machine uses.",
    )
    parser.add_argument("--version", action="version", version=f"kmodtrim {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    p = verbs.add_parser("index", help="index the kernel's modules and show a summary")
    _common(p)
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the cache and re-read every module")
    p = verbs.add_parser("plan", help="show what would be kept and removed")
    _common(p)
    p.add_argument("--all", action="store_true", help="list every kept and removed module")
    p = verbs.add_parser("explain", help="why a module is kept or removed")
    _common(p)
    p.add_argument("name", metavar="NAME", help="module name or alias")
    p = verbs.add_parser("observe", help="show what is observed on the root")
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmodtrim``; returns the exit status."""
    parser = build_parser()
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
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    target = Target(
        root=args.root,
        kernel=args.kernel,
        observed_files=tuple(args.observed),
        policy_file=args.policy,
        cache_dir=args.cache_dir,
        symvers=args.symvers,
        use_cache=not args.no_cache,
    )
    try:
        if not args.root.is_dir():
            print(f"kmodtrim: error: --root {args.root}: not a directory", file=sys.stderr)
            return 2
        return int(VERBS[args.verb](args, target, sys.stdout))
    except KmodtrimError as exc:
        if args.debug:
            log.exception("failed")
        print(f"kmodtrim: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"kmodtrim: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


def _dump(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")


# ---------------------------------------------------------------------------------------
# Verbs


def cmd_index(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    started = time.perf_counter()
    index, stats = load_index(target, rebuild=args.rebuild)
    elapsed = time.perf_counter() - started
    aliases = sum(len(e.info.aliases) for e in index.modules.values())
    doc = {
        "kernel": index.kernel,
        "module_dir": str(index.moddir),
        "modules": len(index.modules),
        "builtins": len(index.builtins),
        "aliases": aliases,
        "total_bytes": index.total_bytes(),
        "kernel_exports": len(index.kernel_exports),
        "kernel_exports_source": index.kernel_exports_source,
        "files": stats.files,
        "parsed": stats.parsed,
        "cached": stats.cached,
        "seconds": round(elapsed, 3),
        "parse_errors": [str(e) for e in index.parse_errors],
    }
    if args.json:
        _dump(doc, out)
    else:
        print(f"kernel {index.kernel}: {len(index.modules)} modules "
              f"({human_bytes(index.total_bytes())}), {len(index.builtins)} builtins, "
              f"{aliases} aliases", file=out)
        print(f"kernel exports: {len(index.kernel_exports)} symbols, "
              f"{index.kernel_exports_source}", file=out)
        print(f"read {stats.parsed} files, {stats.cached} from cache, in {elapsed:.2f} s", file=out)
        for err in index.parse_errors:
            print(f"warning: {err}", file=out)
    return 1 if index.parse_errors else 0


def _print_plan(plan: Plan, out: TextIO, show_all: bool) -> None:
    total = plan.total_bytes or 1
    print(f"kernel {plan.kernel} (root {plan.root})", file=out)
    print(f"  keep   {len(plan.keep):5d} modules  {human_bytes(plan.keep_bytes):>10}", file=out)
    print(f"  remove {len(plan.remove):5d} modules  {human_bytes(plan.remove_bytes):>10}  "
          f"({100 * plan.remove_bytes / total:.1f}% of {human_bytes(plan.total_bytes)})",
          file=out)
    if plan.firmware_remove:
        print(f"  firmware: remove {len(plan.firmware_remove)} files "
              f"({human_bytes(plan.firmware_bytes)})", file=out)
    roots = Counter()
    for m in plan.keep:
        roots[m.reasons[0].kind if m.reasons[0].via is None else "dependency"] += 1
    print("  kept because: " + ", ".join(f"{k} {n}" for k, n in roots.most_common()), file=out)
    if plan.unresolved_symbols:
        print(f"  SYMBOL CHECK FAILED: {len(plan.unresolved_symbols)} unresolved symbols",
              file=out)
    else:
        print("  symbol check: every kept module's symbols resolve "
              f"(kernel exports: {plan.kernel_exports_source})", file=out)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=out)
    biggest = sorted(plan.remove, key=lambda m: m.size, reverse=True)
    shown = biggest if show_all else biggest[:TOP_SAVINGS]
    if shown:
        print(f"\n{'biggest savings' if not show_all else 'remove'}:", file=out)
        for m in shown:
            print(f"  {human_bytes(m.size):>10}  {m.name}", file=out)
        if len(biggest) > len(shown):
            print(f"  … and {len(biggest) - len(shown)} more (--all lists them)", file=out)
    if show_all:
        print("\nkeep:", file=out)
        for k in plan.keep:
            print(f"  {human_bytes(k.size):>10}  {k.name}: {k.reasons[0].describe()}", file=out)


def cmd_plan(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    result = make_plan_for(target)
    if args.json:
        _dump(result.plan.to_json(), out)
    else:
        _print_plan(result.plan, out, args.all)
    return 0


def cmd_explain(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    result: PlanResult = make_plan_for(target)
    explanation = explain(result, args.name)
    if args.json:
        _dump({
            "name": explanation.name,
            "status": explanation.status,
            "path": explanation.path,
            "size": explanation.size,
            "chains": [
                [{"module": module, "kind": r.kind, "detail": r.detail, "via": r.via,
                  "text": r.describe()} for module, r in chain]
                for chain in explanation.chains
            ],
            "policy_rule": explanation.policy_rule,
        }, out)
    else:
        print("\n".join(explanation.lines()), file=out)
    return 0


def cmd_observe(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    evidence = gather_evidence(target)
    index = None
    try:
        index, _ = load_index(target)
    except KmodtrimError:
        index = None  # observing works without a module tree; matching needs one
    devices = []
    for dev in evidence.devices:
        drivers = index.match_alias(dev.modalias) if index is not None else []
        devices.append({"devpath": dev.devpath, "modalias": dev.modalias, "drivers": drivers})
    doc = {
        "root": str(target.root),
        "kernel": index.kernel if index is not None else None,
        "loaded": [o.name for o in evidence.loaded],
        "observed": [{"name": o.name, "source": o.source, "line": o.line}
                     for o in evidence.observed],
        "devices": devices,
        "filesystems": [{"type": f.fstype, "mountpoint": f.mountpoint, "source": f.source}
                        for f in evidence.filesystems],
        "root_drivers": [{"module": d.module, "mountpoint": d.mountpoint, "devpath": d.devpath}
                         for d in evidence.root_drivers],
    }
    if args.json:
        _dump(doc, out)
        return 0
    print(f"loaded now: {len(evidence.loaded)} modules", file=out)
    if evidence.loaded:
        print("  " + " ".join(o.name for o in evidence.loaded), file=out)
    if evidence.observed:
        print(f"observed (from files): {len(evidence.observed)} modules", file=out)
    matched = [d for d in devices if d["drivers"]]
    print(f"devices with a modalias: {len(devices)}, matched by a module: {len(matched)}",
          file=out)
    for d in matched:
        print(f"  {d['modalias']}: {', '.join(d['drivers'])}", file=out)
    print("filesystems: " + ", ".join(sorted({f.fstype for f in evidence.filesystems})), file=out)
    for d in evidence.root_drivers:
        print(f"storage driver of {d.mountpoint}: {d.module}", file=out)
    return 0


VERBS = {
    "index": cmd_index,
    "plan": cmd_plan,
    "explain": cmd_explain,
    "observe": cmd_observe,
}


if __name__ == "__main__":
    sys.exit(main())
