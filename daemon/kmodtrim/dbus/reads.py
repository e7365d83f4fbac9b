"""What the read-only Manager methods compute (Plan and Explain: JSON documents with their
schema version; ListGenerations and ShowGeneration: typed values), the state their answers
depend on (the tokens limits.AnswerCache checks), and who is calling (uids, asked of the
bus once).

A token is cheap to take (a few ``stat`` calls, in the event loop's thread) and changes
whenever an input the daemon can see changes: the generation, the policy files, the
recorded observations, the installed module trees, the files a request names, and any
kernel uevent (devices and loaded modules). What it cannot see (e.g. /sys on a root the
daemon does not observe) is covered by the cache's time limit.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ..paths import MODULE_DIR_BASES
from ..resident.core import POLICY_FILES, Daemon
from ..resident.jobs import Request
from ..state.observations import observations_path
from ..state.summary import generations_dir
from . import typed
from .api import DOCUMENT_SCHEMA
from .auth import caller_uid
from .limits import Memo, Typed

UID_CACHE = 1024  # bus names whose uid is remembered


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when ``path`` is replaced, written or (a directory) gets entries."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def generations_token(daemon: Daemon) -> Hashable:
    """The state ListGenerations and ShowGeneration answers depend on."""
    return daemon.current_generation, _stamp(generations_dir(daemon.root))


def plan_token(daemon: Daemon, request: Request) -> Hashable:
    """The state Plan and Explain answers for ``request`` depend on (as far as a stat
    shows it; see the module docstring)."""
    root = daemon.root
    kernel = request.kernel or daemon.kernel_release
    paths = [*(root / name for name in POLICY_FILES), observations_path(root),
             generations_dir(root), root / "etc/fstab", root / "lib/firmware"]
    for base in MODULE_DIR_BASES:
        paths += [root / base, root / base / kernel, root / base / kernel / "modules.dep"]
    if request.policy is not None:
        paths.append(request.policy)
    paths.extend(request.observed)
    return (daemon.revision, daemon.current_generation, kernel,
            tuple(_stamp(p) for p in paths))


def document_text(doc: dict[str, Any]) -> str:
    """A Plan or Explain document as sent: JSON with its schema version first."""
    return json.dumps({"schema": DOCUMENT_SCHEMA, **doc})


def plan_text(daemon: Daemon, request: Request, token: Hashable, memo: Memo) -> str:
    """Plan's answer, made by a worker (and shared with the other lane while both want
    it). Runs in a lane's thread. Raises KmodtrimError on bad input."""
    return document_text(memo.get(("Plan", request, token),
                                  lambda: daemon.plan(request)))


def explain_text(daemon: Daemon, name: str, request: Request, token: Hashable,
                 _memo: Memo) -> str:
    """Explain's answer, made by a worker. Runs in a lane's thread. Raises
    UnknownModuleError, KmodtrimError on bad input."""
    return document_text(daemon.explain(name, request))


def generations_answer(daemon: Daemon, _memo: Memo) -> Typed:
    """ListGenerations' answer (``aa{sv}``). Runs in a lane's thread. Raises StoreError."""
    docs = daemon.list_generations()
    return Typed([typed.to_dbus(d, typed.SUMMARY) for d in docs], len(json.dumps(docs)))


def generation_answer(daemon: Daemon, number: int, _memo: Memo) -> Typed:
    """ShowGeneration's answer (``a{sv}``). Runs in a lane's thread. Raises
    NoSuchGenerationError."""
    doc = daemon.show_generation(number)
    return Typed(typed.to_dbus(doc, typed.GENERATION), len(json.dumps(doc)))


class CallerUids:
    """The Unix uid of bus connections, asked of the bus once per unique name (a unique
    name is never reused on a bus, so the answer cannot go stale); the last UID_CACHE
    answers are kept."""

    def __init__(self, bus: Any, size: int = UID_CACHE) -> None:
        self.bus = bus
        self.size = size
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._asking: dict[str, asyncio.Future[int | None]] = {}

    async def get(self, sender: str | None) -> int | None:
        """The uid of ``sender``, or None when it is unknown or the bus will not say."""
        if sender is None:
            return None
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        asking = self._asking.get(sender)
        if asking is None:  # many calls of a new connection ask the bus once
            asking = asyncio.ensure_future(caller_uid(self.bus, sender))
            self._asking[sender] = asking
            asking.add_done_callback(lambda _: self._asked(sender))
        return await asyncio.shield(asking)

    def _asked(self, sender: str) -> None:
        asking = self._asking.pop(sender)
        if asking.cancelled() or asking.exception() is not None:
            return
        uid = asking.result()
        if uid is not None:
            self._uids[sender] = uid
            while len(self._uids) > self.size:
                self._uids.popitem(last=False)
