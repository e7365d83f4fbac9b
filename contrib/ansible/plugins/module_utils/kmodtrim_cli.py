"""Running the kmodtrim command line from a module: one place for the executable, the
common options and the JSON documents it prints (``--json``)."""

from __future__ import annotations

import json
import shlex
from typing import Any

COMMON_ARGS: dict[str, Any] = {
    "root": {"type": "path", "default": "/"},
    "kmodtrim_bin": {"type": "str", "default": "kmodtrim"},
}


def command(params: dict[str, Any], *args: str) -> list[str]:
    """argv of ``kmodtrim ARGS --root ROOT`` (``kmodtrim_bin`` may hold several words,
    e.g. ``python3 -m kmodtrim.cli``)."""
    return [*shlex.split(params["kmodtrim_bin"]), *args, "--root", params["root"]]


def run_json(module: Any, argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` and parse what it printed; fails the module with kmodtrim's own
    one-line error when it exits non-zero."""
    rc, out, err = module.run_command(argv)
    if rc != 0:
        module.fail_json(msg=(err.strip() or out.strip() or f"exit status {rc}"),
                         rc=rc, cmd=argv)
    try:
        doc: dict[str, Any] = json.loads(out)
    except ValueError:
        module.fail_json(msg="kmodtrim did not print a JSON document", stdout=out, cmd=argv)
    return doc
