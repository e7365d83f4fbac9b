"""The write-ahead journal's JSON: round trip, versions, and strict reading (a journal
drives writes into the tree, so nothing in it is taken on trust)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kmodtrim.engine.journal import VERSION, InitramfsPending, Journal, Phase
from kmodtrim.errors import StoreError

ROOT = Path("/nonexistent-unit-root")
KVER = "6.1.0-unit-amd64"
MODULE = f"/lib/modules/{KVER}/kernel/drivers/gpu/virtio-gpu.ko"
SHA = "ab" * 32


def stashed_file(path: str = MODULE, **changes: object) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": path, "size": 1234, "sha256": SHA, "mode": 0o644, "uid": 0, "gid": 0,
        "mtime_ns": 1_700_000_000_000_000_000, "kind": "module", "module": "virtio_gpu",
        "kernel": KVER, "package": "linux-image-unit", "link": None,
    }
    doc.update(changes)
    return doc


def full_journal() -> dict[str, Any]:
    """A version-2 journal with every field set, as to_json writes it."""
    return {
        "version": VERSION, "action": "apply", "number": 3, "from": 2,
        "stash": [
            {"path": MODULE, "kind": "module", "module": "virtio_gpu", "kernel": KVER,
             "package": None},
            {"path": "/lib/firmware/vendor/fw.bin", "kind": "firmware", "module": None,
             "kernel": None, "package": "firmware-misc"},
        ],
        "restore": [stashed_file(f"/lib/modules/{KVER}/kernel/net/tun.ko", module="tun")],
        "kernels": [KVER], "backend": "auto", "package_backend": "dpkg",
        "packages_remove": ["linux-modules-extra-unit"], "packages_reinstall": [],
        "phase": "regenerating", "started": "2026-01-02T03:04:05+0000",
        "stashed_entries": [stashed_file()],
        "packages_captured": [{
            "name": "linux-modules-extra-unit", "version": "1.0", "arch": "amd64",
            "backend": "dpkg", "metadata": {"Section": "kernel"},
            "files": [stashed_file(kind="package")], "control": [], "dirs": [["/usr", 0o755]],
            "absent": [],
        }],
        "packages_removing": True, "packages_reinstalling": False,
        "initramfs_pending": {KVER: {"image": f"{ROOT}/boot/initrd.img-{KVER}", "sha256": SHA}},
        "regen": {"depmod": [KVER]},
    }


def refused(doc: object) -> str:
    with pytest.raises(StoreError) as caught:
        Journal.from_json(ROOT, doc)
    return str(caught.value)


# -- round trip and versions -------------------------------------------------------------


def test_journal_round_trips_through_json() -> None:
    journal = Journal.from_json(ROOT, full_journal())
    assert journal.to_json() == full_journal()
    assert Journal.from_json(ROOT, journal.to_json()) == journal


def test_journal_fields_are_read_as_typed_values() -> None:
    journal = Journal.from_json(ROOT, full_journal())
    assert journal.phase is Phase.REGENERATING
    assert journal.from_generation == 2
    assert [t.path for t in journal.stash] == [MODULE, "/lib/firmware/vendor/fw.bin"]
    assert journal.stashed_entries[0].sha256 == SHA
    assert journal.packages_captured[0].dirs == (("/usr", 0o755),)
    assert journal.initramfs_pending == {
        KVER: InitramfsPending(f"{ROOT}/boot/initrd.img-{KVER}", SHA)}


def test_new_journal_is_written_with_the_current_version_and_moving_phase() -> None:
    journal = Journal(action="apply", number=1, from_generation=0, stash=[], restore=[],
                      kernels=[KVER], backend="auto", package_backend=None)
    doc = journal.to_json()
    assert doc["version"] == VERSION == 2
    assert doc["phase"] == "moving"
    assert Journal.from_json(ROOT, doc) == journal


def test_version_1_journal_without_a_version_key_is_read_as_it_is() -> None:
    doc = full_journal()
    del doc["version"]
    assert Journal.from_json(ROOT, doc) == Journal.from_json(ROOT, full_journal())


def test_journal_with_only_the_required_fields_takes_the_defaults() -> None:
    journal = Journal.from_json(ROOT, {"action": "rollback", "number": 4, "from": 3})
    assert (journal.stash, journal.restore, journal.kernels) == ([], [], [])
    assert (journal.backend, journal.package_backend, journal.phase) == \
        ("auto", None, Phase.MOVING)
    assert journal.initramfs_pending == {}


@pytest.mark.parametrize("version", [0, 3, 99, "2", None])
def test_unknown_journal_version_is_refused_with_a_hint(version: object) -> None:
    doc = full_journal() | {"version": version}
    with pytest.raises(StoreError) as caught:
        Journal.from_json(ROOT, doc)
    assert "is not one this kmodtrim reads" in str(caught.value)
    assert caught.value.hint == "finish it with the kmodtrim that wrote it"


def test_touched_paths_are_every_path_taken_out_or_put_back() -> None:
    journal = Journal.from_json(ROOT, full_journal())
    assert journal.touched_paths() == [MODULE, "/lib/firmware/vendor/fw.bin",
                                       f"/lib/modules/{KVER}/kernel/net/tun.ko"]


# -- strict reading ----------------------------------------------------------------------


@pytest.mark.parametrize("doc", [None, [], "journal", 3])
def test_journal_that_is_not_an_object_is_refused(doc: object) -> None:
    assert refused(doc) == "journal: not an object"


@pytest.mark.parametrize("key", ["action", "number", "from"])
def test_journal_missing_a_required_field_is_refused(key: str) -> None:
    doc = full_journal()
    del doc[key]
    assert refused(doc) == f"journal: missing field {key!r}"


@pytest.mark.parametrize(("key", "value"), [
    ("number", "3"), ("number", True), ("from", 2.0), ("action", 1), ("stash", {}),
    ("packages_removing", 1), ("package_backend", 0), ("regen", []), ("started", None),
    ("restore", "none"),
])
def test_journal_field_of_the_wrong_type_is_refused(key: str, value: object) -> None:
    assert refused(full_journal() | {key: value}) == f"journal: field {key!r} has the wrong type"


@pytest.mark.parametrize("key", ["kernels", "packages_remove", "packages_reinstall"])
def test_name_list_holding_a_non_string_is_refused(key: str) -> None:
    assert refused(full_journal() | {key: ["ok", 7]}) == \
        f"journal: field {key!r} must be a list of names"


@pytest.mark.parametrize("path", [
    "/../x", "/lib/modules/../../etc/passwd", "lib/modules/x.ko", "//lib/modules/x.ko",
    "/lib/modules/./x.ko", "/lib/modules/x.ko/", "/lib/modules/\0x.ko", "/",
])
def test_stash_path_that_is_not_normalised_and_absolute_is_refused(path: str) -> None:
    doc = full_journal()
    doc["stash"][0]["path"] = path
    assert "not a normalised absolute path" in refused(doc)


@pytest.mark.parametrize(("kind", "path"), [
    ("module", "/etc/passwd"), ("module", "/lib/firmware/x.bin"),
    ("firmware", "/lib/modules/x.ko"), ("firmware", "/etc/shadow"),
])
def test_stash_path_outside_the_trees_of_its_kind_is_refused(kind: str, path: str) -> None:
    doc = full_journal()
    doc["stash"][0] |= {"kind": kind, "path": path}
    assert f"a {kind} file must lie under" in refused(doc)


@pytest.mark.parametrize("item", [MODULE, {"kind": "module"}, {"path": 7}])
def test_stash_item_without_a_path_is_refused(item: object) -> None:
    doc = full_journal()
    doc["stash"][0] = item
    assert refused(doc) == "journal: a stash item is not an object with a path"


def test_stash_item_field_of_the_wrong_type_is_refused() -> None:
    doc = full_journal()
    doc["stash"][0]["module"] = 1
    assert refused(doc) == "journal: a stash item field has the wrong type"


@pytest.mark.parametrize("field", ["restore", "stashed_entries"])
def test_unsafe_record_of_a_file_put_back_or_stashed_is_refused(field: str) -> None:
    doc = full_journal()
    doc[field] = [stashed_file("/etc/passwd")]
    assert "a module file must lie under" in refused(doc)


def test_captured_package_with_an_unsafe_file_is_refused() -> None:
    doc = full_journal()
    doc["packages_captured"][0]["files"] = [stashed_file("/etc/cron.d/x", kind="package")]
    assert "a package file must lie under" in refused(doc)


@pytest.mark.parametrize("kernel", ["..", "6.1/../x", "", "6.1 0"])
def test_kernel_that_is_not_a_kernel_version_is_refused(kernel: str) -> None:
    assert "is not a kernel version" in refused(full_journal() | {"kernels": [kernel]})


def test_unknown_phase_is_refused() -> None:
    assert refused(full_journal() | {"phase": "committing"}) == "journal: unknown phase"


@pytest.mark.parametrize("image", [
    "/etc/shadow", f"{ROOT}/etc/initrd.img", f"{ROOT}/boot/../etc/x", f"{ROOT}/boot",
    "boot/initrd.img", f"{ROOT}/bootleg/initrd.img",
])
def test_initramfs_image_outside_the_root_boot_or_efi_is_refused(image: str) -> None:
    doc = full_journal()
    doc["initramfs_pending"] = {KVER: {"image": image, "sha256": None}}
    assert "not an image in the root's /boot or /efi" in refused(doc)


def test_initramfs_image_in_the_root_efi_is_read() -> None:
    doc = full_journal()
    doc["initramfs_pending"] = {KVER: {"image": f"{ROOT}/efi/x/initrd", "sha256": None}}
    assert Journal.from_json(ROOT, doc).initramfs_pending[KVER].sha256 is None


def test_reading_does_not_change_the_document() -> None:
    doc = full_journal()
    before = copy.deepcopy(doc)
    Journal.from_json(ROOT, doc)
    assert doc == before


def test_stash_item_of_an_unknown_kind_is_refused() -> None:
    doc = full_journal()
    doc["stash"][0] |= {"kind": "bogus", "path": "/etc/shadow"}
    refused(doc)
