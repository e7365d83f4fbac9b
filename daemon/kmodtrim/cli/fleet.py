"""``kmodtrim observe --export``, ``kmodtrim fleet merge`` and ``kmodtrim fleet export``:
the documents a fleet passes around (kmodtrim/fleet/). Nothing here asks a daemon."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .term import Console


def _emit(text: str, output: Path | None, console: Console) -> None:
    if output is None:
        console.out.write(text)
        return
    from ..state.files import atomic_write_bytes

    atomic_write_bytes(output, text.encode())
    console.note(f"wrote {output}")


def _json(doc: object) -> str:
    import json

    return json.dumps(doc, indent=2) + "\n"


def observe_export(args: argparse.Namespace, console: Console) -> int:
    """This host's (or image root's) observation export."""
    from ..errors import InputError
    from ..fleet.export import export_document
    from ..fleet.host import read_host_facts
    from ..state.observations import read_observations, read_restored

    if not args.export:
        raise InputError("--salt and --output go with --export",
                         hint="kmodtrim observe --export [--salt SALT] [--output FILE]")
    if args.record:
        raise InputError("--record and --export are two runs: record, then export")

    facts = read_host_facts(args.root, args.salt)
    doc = export_document(facts, read_observations(args.root), read_restored(args.root),
                          time.time())
    _emit(_json(doc), args.output, console)
    return 0


def fleet(args: argparse.Namespace, console: Console) -> int:
    """``fleet merge`` or ``fleet export``."""
    from ..request import FleetAction

    if args.fleet_action == FleetAction.MERGE:
        from ..fleet.merge import Threshold, merge_observations, parse_min_hosts, parse_min_share
        from ..fleet.read import read_merge_inputs

        threshold = Threshold(
            min_hosts=parse_min_hosts(args.min_hosts) if args.min_hosts else None,
            min_share=parse_min_share(args.min_share) if args.min_share else None)
        doc = merge_observations(read_merge_inputs(args.files), threshold)
        _emit(_json(doc), args.output, console)
        kept = len(doc["keep"])
        console.note(f"{doc['hosts']} hosts, {len(doc['modules'])} modules seen, {kept} "
                     f"kept (seen on at least {doc['threshold']['needed_hosts']} hosts)")
        return 0
    from ..fleet.formats import render
    from ..fleet.read import read_merge_document
    from ..request import FleetFormat

    merge = read_merge_document(args.merge)
    _emit(render(merge, FleetFormat(args.format), str(args.merge)), args.output, console)
    return 0
