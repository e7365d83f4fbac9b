"""A fleet merge rendered for image builders (``kmodtrim fleet export --format``), pure:
the merge's keep list as

- mkosi: a drop-in (``mkosi.conf.d/NAME.conf``) setting ``KernelModules=`` in
  ``[Content]``: glob patterns matched against module file basenames, ``.ko`` and the
  compression suffix ignored; mkosi adds the modules' module and firmware dependencies.
  A name's ``_`` is written ``[_-]`` since a module's file may spell it either way;
- dracut: a conf (``/etc/dracut.conf.d/NAME.conf``, read by the shell) appending the
  names to ``add_drivers``;
- policy: a kmodtrim policy drop-in (``/etc/kmodtrim/policy.d/NAME.toml``) whose rules
  keep the names on every later plan.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..documents import FLEET_SCHEMA, MERGE_KIND
from ..errors import InputError
from ..names import is_valid_module_name
from ..request import FleetFormat


def keep_of(merge: Any, origin: str) -> list[str]:
    """The kept module names of a merge document. Raises InputError naming ``origin``
    for another kind or schema, a malformed keep list, or an empty one (an image
    keeping no module at all is never what was meant)."""
    kind = merge.get("kind") if isinstance(merge, dict) else None
    if kind != MERGE_KIND:
        raise InputError(f"{origin}: a document of kind {kind!r}, not a fleet merge",
                         hint="give what 'kmodtrim fleet merge' wrote")
    if merge.get("schema") != FLEET_SCHEMA:
        raise InputError(f"{origin}: a fleet merge of schema {merge.get('schema')!r}; this "
                         f"kmodtrim reads schema {FLEET_SCHEMA}",
                         hint="merge again with this kmodtrim")
    keep = merge.get("keep")
    if not isinstance(keep, list) or not all(isinstance(n, str) and is_valid_module_name(n)
                                             for n in keep):
        raise InputError(f"{origin}: 'keep' is not a list of module names")
    if not keep:
        raise InputError(f"{origin}: the merge keeps no module (threshold "
                         f"{json.dumps(merge.get('threshold'))})",
                         hint="merge with a lower --min-hosts or --min-share")
    return sorted(set(keep))


def _header(merge: dict[str, Any], comment: str) -> str:
    threshold = merge.get("threshold") or {}
    lines = [
        f"kmodtrim fleet export: {len(merge['keep'])} modules seen on at least "
        f"{threshold.get('needed_hosts')} of {merge.get('hosts')} hosts",
        f"kernel family {merge.get('kernel_family') or 'not given'}; images: "
        + (", ".join(i["image"] for i in merge.get("images", ())) or "none"),
    ]
    return "".join(f"{comment} {line}\n" for line in lines)


def mkosi_pattern(name: str) -> str:
    """A mkosi ``KernelModules=`` glob for module ``name`` whichever of ``_``/``-`` its
    file name uses."""
    return name.replace("_", "[_-]")


def render_mkosi(merge: dict[str, Any], keep: list[str]) -> str:
    patterns = [mkosi_pattern(n) for n in keep]
    body = "KernelModules=" + "\n               ".join(patterns)
    return (_header(merge, "#") + "# mkosi adds their module and firmware dependencies.\n"
            "\n[Content]\n" + body + "\n")


def render_dracut(merge: dict[str, Any], keep: list[str]) -> str:
    return _header(merge, "#") + 'add_drivers+=" ' + " ".join(keep) + ' "\n'


def render_policy(merge: dict[str, Any], keep: list[str]) -> str:
    rules = "".join(f"  {json.dumps(n)},\n" for n in keep)
    return (_header(merge, "#") + "# A kmodtrim policy drop-in: later plans keep these "
            "(and their dependencies).\nrules = [\n" + rules + "]\n")


RENDERERS: dict[FleetFormat, Callable[[dict[str, Any], list[str]], str]] = {
    FleetFormat.MKOSI: render_mkosi,
    FleetFormat.DRACUT: render_dracut,
    FleetFormat.POLICY: render_policy,
}


def render(merge: Any, fmt: FleetFormat, origin: str = "the merge") -> str:
    """The merge document ``merge`` as ``fmt``. Raises InputError (see keep_of)."""
    keep = keep_of(merge, origin)
    return RENDERERS[fmt](merge, keep)
