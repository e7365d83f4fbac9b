"""State records read strictly from JSON: StashedFile, RemovedPackage, Generation."""

from __future__ import annotations

from typing import Any

import pytest

from kmodtrim.errors import StoreError
from kmodtrim.records import GENERATION_ZERO, Generation, RemovedPackage, StashedFile

KVER = "6.1.0-unit-amd64"
MODULE = f"/lib/modules/{KVER}/kernel/drivers/gpu/virtio-gpu.ko"
SHA = "0123456789abcdef" * 4


def file_doc(**changes: object) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": MODULE, "size": 10, "sha256": SHA, "mode": 0o644, "uid": 0, "gid": 0,
        "mtime_ns": 5, "kind": "module", "module": "virtio_gpu", "kernel": KVER,
        "package": None, "link": None,
    }
    doc.update(changes)
    return doc


def package_doc(**changes: object) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "linux-modules-extra-unit", "version": "1.0-1", "arch": "amd64",
        "backend": "dpkg", "metadata": {"Package": "linux-modules-extra-unit"},
        "files": [file_doc(kind="package", path="/usr/share/doc/x/copyright")],
        "control": [file_doc(kind="package-control", path="/var/lib/dpkg/info/x.md5sums",
                             module="md5sums")],
        "dirs": [["/usr/share/doc/x", 0o755]], "absent": ["/usr/share/doc/x/changelog.gz"],
    }
    doc.update(changes)
    return doc


def generation_doc(**changes: object) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "number": 2, "created": "2026-01-02T03:04:05+0000", "action": "apply",
        "description": "trim", "removed": [file_doc()], "stashed": [MODULE], "restored": [],
        "kernels": [KVER], "rollback_to": None, "keep_reasons": {"virtio_net": "observed"},
        "regen": {}, "packages": [package_doc()], "packages_removed": ["x"],
        "packages_reinstalled": [], "exclusion_backends": ["dpkg"],
    }
    doc.update(changes)
    return doc


def refused_file(doc: object) -> str:
    with pytest.raises(StoreError) as caught:
        StashedFile.from_json(doc)
    return str(caught.value)


# -- StashedFile -------------------------------------------------------------------------


def test_stashed_file_round_trips_through_json() -> None:
    record = StashedFile.from_json(file_doc())
    assert record.to_json() == file_doc()
    assert StashedFile.from_json(record.to_json()) == record


def test_stashed_file_kind_defaults_to_module() -> None:
    doc = file_doc()
    del doc["kind"]
    assert StashedFile.from_json(doc).kind == "module"


def test_stashed_symlink_record_keeps_its_target() -> None:
    record = StashedFile.from_json(file_doc(kind="firmware", path="/lib/firmware/a.bin",
                                            link="b.bin"))
    assert record.link == "b.bin"


@pytest.mark.parametrize("key", ["path", "size", "sha256", "mode", "uid", "gid", "mtime_ns"])
def test_stashed_file_missing_a_field_is_refused(key: str) -> None:
    doc = file_doc()
    del doc[key]
    assert refused_file(doc) == f"stashed file record: missing field {key!r}"


@pytest.mark.parametrize(("key", "value", "found"), [
    ("size", "10", "str"), ("size", True, "bool"), ("mode", 4.0, "float"),
    ("path", None, "NoneType"), ("module", 3, "int"), ("link", [], "list"),
])
def test_stashed_file_field_of_the_wrong_type_is_refused(key: str, value: object,
                                                         found: str) -> None:
    assert refused_file(file_doc(**{key: value})).endswith(f"found {found}")


@pytest.mark.parametrize("key", ["size", "uid", "gid", "mtime_ns", "mode"])
def test_negative_numbers_are_refused(key: str) -> None:
    assert refused_file(file_doc(**{key: -1})) == \
        f"stashed file record: field {key!r} must not be negative"


def test_mode_beyond_permission_bits_is_refused() -> None:
    assert "is not a file mode" in refused_file(file_doc(mode=0o100644))


@pytest.mark.parametrize("sha", ["", "ab" * 31, "AB" * 32, "zz" * 32, SHA + "0"])
def test_sha256_that_is_not_64_lowercase_hex_digits_is_refused(sha: str) -> None:
    assert "sha256 is not 64 hex digits" in refused_file(file_doc(sha256=sha))


def test_unknown_kind_is_refused() -> None:
    assert refused_file(file_doc(kind="script")) == "stashed file record: unknown kind 'script'"


@pytest.mark.parametrize(("kind", "path"), [
    ("module", "/etc/passwd"), ("module", "/usr/bin/sudo"), ("firmware", MODULE),
    ("package", "/etc/sudoers"),
])
def test_path_outside_the_trees_of_its_kind_is_refused(kind: str, path: str) -> None:
    assert f"a {kind} file must lie under" in refused_file(file_doc(kind=kind, path=path))


@pytest.mark.parametrize("path", ["/../x", f"/lib/modules/{KVER}/../../../etc/passwd",
                                  "relative.ko", "/lib//modules/x.ko"])
def test_path_that_is_not_normalised_and_absolute_is_refused(path: str) -> None:
    assert "not a normalised absolute path" in refused_file(file_doc(path=path))


@pytest.mark.parametrize("name", [None, "../postinst", "a/b", "x" * 201])
def test_package_control_file_needs_a_plain_file_name(name: str | None) -> None:
    doc = file_doc(kind="package-control", path="/var/lib/dpkg/info/x.postinst", module=name)
    assert "is not a plain file name" in refused_file(doc)


def test_record_that_is_not_an_object_is_refused() -> None:
    assert refused_file([MODULE]) == "stashed file record: expected an object, found list"


# -- RemovedPackage ----------------------------------------------------------------------


def test_removed_package_round_trips_through_json() -> None:
    package = RemovedPackage.from_json(package_doc())
    assert package.to_json() == package_doc()
    assert RemovedPackage.from_json(package.to_json()) == package
    assert package.blobs == {SHA}


def test_removed_package_directory_mode_keeps_only_permission_bits() -> None:
    package = RemovedPackage.from_json(package_doc(dirs=[["/usr/share/doc/x", 0o40755]]))
    assert package.dirs == (("/usr/share/doc/x", 0o755),)


def test_package_listing_root_entry_is_accepted() -> None:
    assert RemovedPackage.from_json(package_doc(dirs=[["/.", 0o755]])).dirs[0][0] == "/."


@pytest.mark.parametrize("entry", [["/usr/x"], ["/usr/x", "755"], ["/usr/x", True],
                                   {"path": "/usr/x"}, "/usr/x"])
def test_removed_package_dirs_entry_must_be_path_and_mode(entry: object) -> None:
    with pytest.raises(StoreError, match=r"a dirs entry is not \[path, mode\]"):
        RemovedPackage.from_json(package_doc(dirs=[entry]))


@pytest.mark.parametrize("changes", [
    {"dirs": [["/usr/../etc", 0o755]]},
    {"absent": ["/usr/share/../../etc/passwd"]},
    {"files": [file_doc(kind="package", path="/etc/passwd")]},
    {"control": [file_doc(kind="package-control", path="/x/../y", module="postinst")]},
])
def test_removed_package_with_an_unsafe_path_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(StoreError, match="refusing path"):
        RemovedPackage.from_json(package_doc(**changes))


@pytest.mark.parametrize("key", ["name", "version", "arch", "backend"])
def test_removed_package_missing_a_field_is_refused(key: str) -> None:
    doc = package_doc()
    del doc[key]
    with pytest.raises(StoreError, match=f"missing field '{key}'"):
        RemovedPackage.from_json(doc)


# -- Generation --------------------------------------------------------------------------


def test_generation_round_trips_through_json() -> None:
    generation = Generation.from_json(generation_doc())
    doc = generation.to_json()
    assert doc["removed_bytes"] == 10
    assert Generation.from_json(doc) == generation
    assert generation.referenced_blobs == {SHA}


def test_generation_zero_is_the_untrimmed_tree() -> None:
    assert Generation.from_json(GENERATION_ZERO.to_json()) == GENERATION_ZERO
    assert GENERATION_ZERO.removed == ()


def test_generation_with_only_number_and_action_takes_the_defaults() -> None:
    generation = Generation.from_json({"number": 1, "action": "apply"})
    assert (generation.removed, generation.packages, generation.rollback_to) == ((), (), None)


@pytest.mark.parametrize("key", ["number", "action"])
def test_generation_missing_a_required_field_is_refused(key: str) -> None:
    doc = generation_doc()
    del doc[key]
    with pytest.raises(StoreError, match=f"generation manifest: missing field '{key}'"):
        Generation.from_json(doc)


@pytest.mark.parametrize(("key", "value"), [
    ("number", -1), ("number", "2"), ("rollback_to", "1"), ("stashed", [MODULE, 3]),
    ("keep_reasons", []), ("removed", {}), ("kernels", KVER),
])
def test_generation_field_of_the_wrong_type_or_range_is_refused(key: str, value: object) -> None:
    with pytest.raises(StoreError, match=f"generation manifest: field '{key}'"):
        Generation.from_json(generation_doc(**{key: value}))


def test_generation_removing_a_file_outside_the_module_trees_is_refused() -> None:
    with pytest.raises(StoreError, match="a module file must lie under"):
        Generation.from_json(generation_doc(removed=[file_doc(path="/etc/passwd")]))
