"""A manifest's records read in bulk (records.stashed_files): the one-pass checks accept
exactly what the field-by-field reading accepts, build equal records, and leave every
refusal (and its message) to the field-by-field reading."""

from __future__ import annotations

from typing import Any

import pytest

from kmodtrim.errors import StoreError
from kmodtrim.fsutil import UnsafePathError, check_relative
from kmodtrim.records import (
    StashedFile,
    paths_are_normalised,
    stashed_files,
)
from kmodtrim.takeout import Source

from .test_records import KVER, MODULE, SHA, file_doc

PATHS = [
    MODULE, "/", "", "x", "relative.ko", "/a", "/a/", "//a", "/a//b", "/.", "/..", "/a/.",
    "/a/..", "/./a", "/../a", "/a/./b", "/a/../b", "/a/.b", "/a/..b", "/a/b.", "/a/b..",
    "/...", "/a/.../b", "/a\x00b", "/a/\x00", "\x00/a", "/a\nb", "/.hidden", "/a b/c",
]


def accepted(path: str) -> bool:
    try:
        check_relative(path)
    except UnsafePathError:
        return False
    return True


@pytest.mark.parametrize("path", PATHS)
def test_one_path_is_normalised_as_check_relative_says(path: str) -> None:
    assert paths_are_normalised([path]) is accepted(path)


@pytest.mark.parametrize("path", PATHS)
def test_a_bad_path_anywhere_among_good_ones_is_found(path: str) -> None:
    for position in range(3):
        paths = [MODULE, "/lib/firmware/a.bin"]
        paths.insert(position, path)
        assert paths_are_normalised(paths) is accepted(path)


def test_no_paths_are_all_normalised() -> None:
    assert paths_are_normalised([])


def docs() -> list[dict[str, Any]]:
    return [
        file_doc(),
        file_doc(path=f"/lib/modules/{KVER}/kernel/a.ko", module="a", size=0),
        file_doc(path="/lib/firmware/x.bin", kind="firmware", module=None, kernel=None),
        file_doc(path=f"/lib/modules/{KVER}/kernel/l.ko", link="b.ko", sha256="f" * 64),
        file_doc(path=f"/lib/modules/{KVER}/kernel/r.ko", source="archive",
                 package="linux-image-unit", version="6.1.0-1"),
        file_doc(path=f"/lib/modules/{KVER}/kernel/s.ko", source="stash", extra="ignored"),
        file_doc(kind="package", path="/usr/share/doc/x/copyright"),
        file_doc(kind="package-control", path="/var/lib/dpkg/info/x.md5sums",
                 module="md5sums"),
        {k: v for k, v in file_doc(path=f"/lib/modules/{KVER}/k.ko").items()
         if k not in ("kind", "module", "kernel", "package", "link")},
    ]


def built_by_init(doc: dict[str, Any]) -> StashedFile:
    return StashedFile(
        path=doc["path"], size=doc["size"], sha256=doc["sha256"], mode=doc["mode"],
        uid=doc["uid"], gid=doc["gid"], mtime_ns=doc["mtime_ns"],
        kind=doc.get("kind", "module"), module=doc.get("module"), kernel=doc.get("kernel"),
        package=doc.get("package"), link=doc.get("link"),
        source=Source(doc.get("source", "stash")), version=doc.get("version"))


def test_records_read_in_bulk_equal_those_built_by_their_init() -> None:
    expected = [built_by_init(doc) for doc in docs()]
    records = stashed_files(docs())
    assert list(records) == expected
    for record, twin in zip(records, expected, strict=True):
        assert type(record) is StashedFile
        assert list(record.__dict__) == list(twin.__dict__)  # to_json's key order
        assert record.to_json() == twin.to_json()
        assert hash(record) == hash(twin)
        assert record.has_blob is twin.has_blob
    assert records[4].source is Source.ARCHIVE


def test_one_record_reads_as_in_bulk() -> None:
    for doc in docs():
        assert StashedFile.from_json(doc) == stashed_files([doc])[0]


BAD = [
    {"path": None}, {"size": "10"}, {"size": True}, {"mode": 4.0}, {"size": -1},
    {"uid": -1}, {"mtime_ns": -5}, {"mode": 0o100644}, {"module": 3}, {"link": []},
    {"kernel": 1}, {"package": 2}, {"version": 3}, {"sha256": "AB" * 32},
    {"sha256": "ab" * 31}, {"sha256": SHA + "0"}, {"sha256": "g" * 64}, {"kind": "script"},
    {"kind": 1}, {"path": "/etc/passwd"}, {"path": f"/lib/modules/{KVER}/../../etc/x"},
    {"path": "/lib//modules/x.ko"}, {"path": "/lib/modules/x/"}, {"path": "/lib/modules/\x00"},
    {"source": "nowhere"}, {"source": None}, {"source": ["stash"]},
    {"source": "archive"}, {"source": "archive", "package": "-x", "version": "1"},
    {"kind": "package-control", "path": "/var/lib/dpkg/info/x.postinst", "module": "a/b"},
    {"kind": "package-control", "path": "/var/lib/dpkg/info/x.postinst", "module": None},
]


@pytest.mark.parametrize("changes", BAD, ids=repr)
def test_a_bad_record_among_good_ones_is_refused_as_alone(changes: dict[str, Any]) -> None:
    bad = file_doc(**changes)
    with pytest.raises(StoreError) as alone:
        StashedFile.from_json(bad)
    for position in (0, 3, len(docs())):
        batch: list[Any] = docs()
        batch.insert(position, bad)
        with pytest.raises(StoreError) as in_bulk:
            stashed_files(batch)
        assert str(in_bulk.value) == str(alone.value)


@pytest.mark.parametrize("key", ["path", "size", "sha256", "mode", "uid", "gid", "mtime_ns"])
def test_a_record_missing_a_field_is_refused_in_bulk(key: str) -> None:
    bad = file_doc()
    del bad[key]
    with pytest.raises(StoreError, match=f"missing field {key!r}"):
        stashed_files([*docs(), bad])


def test_a_record_that_is_not_an_object_is_refused_in_bulk() -> None:
    with pytest.raises(StoreError, match="expected an object, found list"):
        stashed_files([*docs(), [MODULE]])
