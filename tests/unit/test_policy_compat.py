"""The pydantic seam (kmodtrim/policy/compat*.py): the 1.10 implementation, run here on
the ``pydantic.v1`` that pydantic 2 carries, reports the same errors in the same words as
the pydantic 2 one for a table declared once against each. (The whole policy under a real
pydantic 1.10 is tests/test_policy_pydantic1.py.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import pytest

from kmodtrim.policy import compat_v1, compat_v2


def _no_x(value: str) -> str:
    if "x" in value:
        raise ValueError("no x here")
    return value


class Table2(compat_v2.StrictModel):
    count: compat_v2.NonNegativeInt = 1
    ratio: compat_v2.NonNegativeFloat = 0.5


if TYPE_CHECKING:  # for mypy, compat.py shows compat_v2's plain int and float
    Count1 = int
    Ratio1 = float
else:
    Count1 = compat_v1.NonNegativeInt
    Ratio1 = compat_v1.NonNegativeFloat


class Table1(compat_v1.StrictModel):
    count: Count1 = 1
    ratio: Ratio1 = 0.5


if TYPE_CHECKING:
    Word2 = str
    Word1 = str
else:
    Word2 = compat_v2.checked_str(_no_x)
    Word1 = compat_v1.checked_str(_no_x)


class Model2(compat_v2.StrictModel):
    choice: Literal["a", "b", "c"] = "a"
    flag: compat_v2.StrictBool = True
    words: list[Word2] = compat_v2.Field(default_factory=list)
    table: Table2 = compat_v2.Field(default_factory=Table2)


class Model1(compat_v1.StrictModel):
    choice: Literal["a", "b", "c"] = "a"
    flag: compat_v1.StrictBool = True
    words: list[Word1] = compat_v1.Field(default_factory=list)
    table: Table1 = compat_v1.Field(default_factory=Table1)


def errors_v2(data: Mapping[str, Any]) -> list[tuple[object, ...]]:
    with pytest.raises(compat_v2.ValidationError) as caught:
        compat_v2.validate(Model2, data)
    return [(e["type"], e["loc"], e["input"], e["ctx"].get("expected"), e["ctx"].get("ge"),
             e["ctx"].get("error")) for e in compat_v2.error_list(caught.value, data)]


def errors_v1(data: Mapping[str, Any]) -> list[tuple[object, ...]]:
    with pytest.raises(compat_v1.ValidationError) as caught:
        compat_v1.validate(Model1, data)
    return [(e["type"], e["loc"], e["input"], e["ctx"].get("expected"), e["ctx"].get("ge"),
             e["ctx"].get("error")) for e in compat_v1.error_list(caught.value, data)]


BAD: list[dict[str, Any]] = [
    {"choice": "d"},
    {"choice": 1},
    {"choice": ["a"]},
    {"flag": 1},
    {"flag": "true"},
    {"words": "one"},
    {"words": ["ok", 2, "xx"]},
    {"table": 3},
    {"table": {"count": "3"}},
    {"table": {"count": 1.0}},
    {"table": {"count": True}},
    {"table": {"count": -1}},
    {"table": {"ratio": True}},
    {"table": {"ratio": "1"}},
    {"table": {"ratio": -0.5}},
    {"table": {"ratio": float("inf")}},
    {"table": {"other": 1}},
    {"unknown": 1, "choice": "z"},
]


@pytest.mark.parametrize("data", BAD, ids=[str(d) for d in BAD])
def test_both_implementations_report_the_same_errors(data: dict[str, Any]) -> None:
    assert errors_v1(data) == errors_v2(data)


def test_nan_is_not_finite_under_both() -> None:
    # NaN != NaN, so compare the error types and places only.
    data = {"table": {"ratio": float("nan")}}
    assert [e[:2] for e in errors_v1(data)] == [e[:2] for e in errors_v2(data)] == [
        ("finite_number", ("table", "ratio"))]


def test_both_accept_and_dump_the_same() -> None:
    data = {"choice": "b", "flag": False, "words": ["a", "b"],
            "table": {"count": 0, "ratio": 2}}
    one, two = compat_v1.validate(Model1, data), compat_v2.validate(Model2, data)
    assert compat_v1.dump(one) == compat_v2.dump(two) == {**data, "table": {"count": 0,
                                                                            "ratio": 2.0}}
    assert isinstance(one.table.ratio, float) and isinstance(two.table.ratio, float)
    assert compat_v1.field_names(Model1) == compat_v2.field_names(Model2) == [
        "choice", "flag", "words", "table"]


SEEN: list[object] = []


def _record(value: str) -> str:
    SEEN.append((compat_v1.validation_context().get("where"),
                 compat_v2.validation_context().get("where")))
    return value


if TYPE_CHECKING:
    Recorded1 = str
    Recorded2 = str
else:
    Recorded1 = compat_v1.checked_str(_record)
    Recorded2 = compat_v2.checked_str(_record)


class Context1(compat_v1.StrictModel):
    name: Recorded1 = ""


class Context2(compat_v2.StrictModel):
    name: Recorded2 = ""


def test_validation_context_is_set_only_during_validate() -> None:
    SEEN.clear()
    # One context (vcontext.py) for both seams: a validator sees the context of the
    # validate call running, whichever seam runs it, and none outside one.
    compat_v1.validate(Context1, {"name": "a"}, context={"where": "one"})
    compat_v2.validate(Context2, {"name": "a"}, context={"where": "two"})
    assert SEEN == [("one", "one"), ("two", "two")]
    assert compat_v1.validation_context() == compat_v2.validation_context() == {}


def test_the_two_implementations_export_the_same_names() -> None:
    assert set(compat_v1.__all__) == set(compat_v2.__all__) - {"ErrorDetail"}


@pytest.mark.parametrize(("permitted", "worded"), [
    (("a",), "'a'"), (("a", "b"), "'a' or 'b'"), (("a", "b", "c"), "'a', 'b' or 'c'"),
])
def test_literal_values_are_worded_like_pydantic_2(permitted: tuple[str, ...],
                                                   worded: str) -> None:
    assert compat_v1._expected(permitted) == worded


def test_input_is_found_by_location_or_is_none() -> None:
    data = {"a": {"b": [1, {"c": "x"}]}}
    assert compat_v1._input_at(data, ("a", "b", 1, "c")) == "x"
    assert compat_v1._input_at(data, ("a", "b", 5)) is None
    assert compat_v1._input_at(data, ("a", "z")) is None


def test_the_policy_model_declares_its_fields_with_compat_types_only() -> None:
    """A bare int, float, bool or str would be strict under pydantic 2 but coerced by 1.10
    ("3" accepted as 3): model.py declares fields with compat's strict types."""
    import ast
    import inspect

    from kmodtrim.policy import model

    bare = {"int", "float", "bool", "str"}
    tree = ast.parse(inspect.getsource(model))
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign):
                names = {n.id for n in ast.walk(stmt.annotation) if isinstance(n, ast.Name)}
                assert not names & bare, f"{cls.name}.{ast.unparse(stmt.target)}"
