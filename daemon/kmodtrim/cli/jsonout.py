"""``--json`` output: a document as ``json.dumps(doc, indent=2)`` writes it, byte for byte,
in about a third of the time. With an indent, the standard library leaves its C encoder
for a generator per container (a plan document is ~10⁵ tokens); here the containers are
walked in one function and every string goes through the C string encoder, a list of
strings in one join. Only the tree shapes documents have are supported: a container
inside itself recurses until RecursionError instead of json's ValueError."""

from __future__ import annotations

from json.encoder import INFINITY
from json.encoder import encode_basestring_ascii as _string
from typing import Any

_int = int.__repr__
_float = float.__repr__


def dumps_indented(doc: Any, indent: int = 2) -> str:
    """``json.dumps(doc, indent=indent)`` (ASCII, keys in their order, NaN allowed).
    Raises TypeError for a value or key JSON cannot hold, as json does."""
    out: list[str] = []
    write = out.append
    keys: dict[str, str] = {}  # a string key's text with ": ", made once per document

    def encode(o: Any, level: int) -> None:
        if isinstance(o, dict):
            if not o:
                write("{}")
                return
            inner = "\n" + " " * (indent * (level + 1))
            separator = "," + inner
            write("{" + inner)
            first = True
            for key, value in o.items():
                if first:
                    first = False
                else:
                    write(separator)
                if type(key) is str:
                    text = keys.get(key)
                    if text is None:
                        text = keys[key] = _string(key) + ": "
                    write(text)
                else:  # not cached: True and 1 are one dict key, but not one JSON key
                    write(_key(key) + ": ")
                kind = type(value)
                if kind is str:
                    write(_string(value))
                elif kind is int:
                    write(_int(value))
                elif value is None:
                    write("null")
                elif value is True:
                    write("true")
                elif value is False:
                    write("false")
                elif kind is list and value and all(type(item) is str for item in value):
                    # a list of strings (a module's files) is written here, not recursed
                    # into: a plan has thousands
                    deeper = "\n" + " " * (indent * (level + 2))
                    write("[" + deeper + ("," + deeper).join(map(_string, value))
                          + "\n" + " " * (indent * (level + 1)) + "]")
                else:
                    encode(value, level + 1)
            write("\n" + " " * (indent * level) + "}")
        elif isinstance(o, list | tuple):
            if not o:
                write("[]")
                return
            inner = "\n" + " " * (indent * (level + 1))
            separator = "," + inner
            if all(type(item) is str for item in o):
                write("[" + inner + separator.join(map(_string, o)) + "\n"
                      + " " * (indent * level) + "]")
                return
            write("[")
            first = True
            for item in o:
                write(inner if first else separator)
                first = False
                encode(item, level + 1)
            write("\n" + " " * (indent * level) + "]")
        else:
            write(_scalar(o))

    encode(doc, 0)
    return "".join(out)


def _scalar(o: Any) -> str:
    if isinstance(o, str):
        return _string(o)
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return _int(o)
    if isinstance(o, float):
        return _float_text(o)
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _key(key: Any) -> str:
    """A key as json writes it: keys are strings, other scalars are spelt as strings."""
    if isinstance(key, str):
        return _string(key)
    if isinstance(key, float):
        return _string(_float_text(key))
    if key is True:
        return '"true"'
    if key is False:
        return '"false"'
    if key is None:
        return '"null"'
    if isinstance(key, int):
        return _string(_int(key))
    raise TypeError(f"keys must be str, int, float, bool or None, "
                    f"not {key.__class__.__name__}")


def _float_text(o: float) -> str:
    if o != o:
        return "NaN"
    if o == INFINITY:
        return "Infinity"
    if o == -INFINITY:
        return "-Infinity"
    return _float(o)
