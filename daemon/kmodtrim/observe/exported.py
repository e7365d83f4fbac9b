"""``--observed`` files that are kmodtrim's own fleet documents: an observation export
(``kmodtrim observe --export``) gives the modules it lists, a fleet merge (``kmodtrim
fleet merge``) its ``keep`` list — the modules enough hosts saw."""

from __future__ import annotations

import json
from typing import Any

from ..documents import EXPORT_KIND, FLEET_SCHEMA, MERGE_KIND
from ..errors import ObservationError
from ..inputs import quote_input
from ..names import is_valid_module_name, normalize

_HINT = ("give a kmodtrim observation export or fleet merge document, or a text file "
         "with one module name per line")


def looks_like_document(text: str) -> bool:
    """True when ``text`` is meant as a JSON document (starts with ``{``)."""
    return text.lstrip("\ufeff \t\r\n").startswith("{")


def parse_observation_document(text: str, origin: str) -> list[tuple[str, str]]:
    """The module names an export or merge document in ``text`` vouches for (normalised,
    each once, in the document's order), each with its source: ``origin`` and what the
    document is.

    Raises ObservationError naming ``origin`` for text that is not JSON, a document of
    another kind or schema, or a module entry that is not a module name.
    """
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ObservationError(f"{origin}:{exc.lineno}: not a JSON document: {exc.msg}",
                               hint=_HINT) from None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in (EXPORT_KIND, MERGE_KIND):
        raise ObservationError(f"{origin}: a JSON document of kind "
                               f"{quote_input(str(kind))}, not an observation export or "
                               "a fleet merge", hint=_HINT)
    if doc.get("schema") != FLEET_SCHEMA:
        raise ObservationError(f"{origin}: a {kind} of schema {doc.get('schema')!r}; this "
                               f"kmodtrim reads schema {FLEET_SCHEMA}",
                               hint="export or merge it again with this kmodtrim")
    if kind == EXPORT_KIND:
        entries = doc.get("modules")
        names = [e.get("name") if isinstance(e, dict) else None
                 for e in (entries if isinstance(entries, list) else [None])]
        source = f"{origin} (observation export)"
    else:
        keep = doc.get("keep")
        names = keep if isinstance(keep, list) else [None]
        source = f"{origin} (fleet merge of {doc.get('hosts')} hosts)"
    found: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not is_valid_module_name(name):
            raise ObservationError(f"{origin}: {quote_input(str(name))} in the {kind} is "
                                   "not a module name", hint=_HINT)
        found.setdefault(normalize(name), source)
    return list(found.items())
