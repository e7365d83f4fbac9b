"""``--json`` output (cli/jsonout.py) is what ``json.dumps(doc, indent=2)`` writes, byte for
byte, for any document: nested objects and lists, tuples, empty containers, non-ASCII and
control characters, floats including NaN and infinities, non-string keys, enum values."""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.cli.jsonout import dumps_indented

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                    st.floats(allow_nan=True, allow_infinity=True))
keys = st.one_of(st.text(), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.lists(children, max_size=5).map(tuple),
                               st.lists(st.text(), max_size=5),
                               st.dictionaries(keys, children, max_size=5)),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_the_same_bytes_as_json(doc: Any) -> None:
    assert dumps_indented(doc) == json.dumps(doc, indent=2)


class Kind(enum.StrEnum):
    MODULE = "module"


class Level(enum.IntEnum):
    HIGH = 3


def test_enum_values_and_keys_are_written_as_json_writes_them() -> None:
    doc = {Kind.MODULE: [Kind.MODULE, Level.HIGH, 1.5, -math.inf], "n": {Level.HIGH: None},
           "é\n": ("x", "ÿ"), "empty": [{}, [], ()]}
    assert dumps_indented(doc) == json.dumps(doc, indent=2)


@pytest.mark.parametrize("doc", [{"x": {1, 2}}, [object()], {(1, 2): "tuple key"}])
def test_what_json_cannot_hold_is_refused_as_json_refuses_it(doc: Any) -> None:
    with pytest.raises(TypeError) as ours:
        dumps_indented(doc)
    with pytest.raises(TypeError) as theirs:
        json.dumps(doc, indent=2)
    assert str(ours.value) == str(theirs.value)
