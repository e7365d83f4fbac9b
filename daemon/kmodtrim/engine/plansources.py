"""Where the files a plan takes out would come back from: the plan's files still in the
tree, each assigned the stash or the package archive under the policy's ``[stash]``
settings. Apart from the engine's transition (engine/operations.py applies what this
decides), so that ``kmodtrim plan`` answers without importing it."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fsutil
from ..backends.detect import resolved_name
from ..index import ModuleIndex
from ..sources.decide import Assigned, assign_sources
from ..sources.families import FAMILY_CLASSES
from ..sources.likely import likely_offline
from ..takeout import PutRequest

if TYPE_CHECKING:
    from ..planner import Plan
    from ..policy import LoadedPolicy


def trim_requests(root: Path, plan: Plan, already: AbstractSet[str]) -> list[PutRequest]:
    """The files ``plan`` takes out that are still in the tree and not already out
    (``already``: the in-root paths the current generation holds out of the tree)."""
    to_stash: list[PutRequest] = []
    with fsutil.Walk(root) as walk:
        for m in plan.remove:
            for path in m.files:
                if path not in already and walk.lexists(path):
                    to_stash.append(PutRequest(path, "module", m.name, plan.kernel))
    for fw in plan.firmware_remove:
        if fw.path not in already:
            to_stash.append(PutRequest(fw.path, "firmware", ",".join(fw.wanted_by), None))
    return to_stash


def assign_plan_sources(root: Path, plan: Plan, index: ModuleIndex, policy: LoadedPolicy,
                        already: AbstractSet[str], backend: str = "auto") -> Assigned:
    """The files ``plan`` takes out, each with where it comes back from under the policy's
    ``[stash]`` settings: the archive only where a package manager has an archive family
    (dpkg with apt, rpm with dnf: sources/families.py) and the backend is not the stash
    alone (``backend``: the option, ``auto`` meaning the policy's)."""
    option = policy.settings.backend if backend == "auto" else backend
    stash = policy.settings.stash

    # No platform named (none detected offline is every platform; clouds = [] keeps no
    # platform's drivers in the tree): local copies for any platform's, as before.
    platforms = plan.platform.names or None if plan.platform is not None else None

    def likely(request: PutRequest) -> bool:
        entry = index.modules.get(request.module or "")
        return request.kind == "module" and entry is not None and likely_offline(
            entry.name, entry.relpath, entry.info.aliases, platforms)

    return assign_sources(
        root, trim_requests(root, plan, already), keep=stash.keep, budget_mib=stash.budget_mib,
        archive=resolved_name(root, option) in FAMILY_CLASSES, likely=likely)
