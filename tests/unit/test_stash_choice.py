"""Which trimmed files keep a local copy (sources/choice.py), the likely-offline families,
the stash's stored frames for compressed modules, and the restore source in records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kmodtrim.engine.journal import Journal
from kmodtrim.errors import StoreError
from kmodtrim.records import StashedFile
from kmodtrim.sources.choice import STASH_KEEP, Candidate, choose_local_copies
from kmodtrim.sources.likely import likely_offline
from kmodtrim.state.packfile import raw_frame
from kmodtrim.takeout import Source

MIB = 1 << 20
FILES = [
    Candidate("/lib/modules/K/a.ko", 3 * MIB, served=True, likely=True),
    Candidate("/lib/modules/K/b.ko", 1 * MIB, served=True, likely=True),
    Candidate("/lib/modules/K/c.ko", 5 * MIB, served=True, likely=False),
    Candidate("/lib/modules/K/gone.ko", 2 * MIB, served=False, likely=False),
]


def test_all_keeps_every_file_locally() -> None:
    assert choose_local_copies(FILES, "all", 0) == {c.path for c in FILES}


def test_none_keeps_only_what_the_archive_cannot_serve() -> None:
    assert choose_local_copies(FILES, "none", 100 * MIB) == {"/lib/modules/K/gone.ko"}


def test_likely_keeps_likely_files_within_the_budget_smallest_first() -> None:
    assert choose_local_copies(FILES, "likely", 100 * MIB) == {
        "/lib/modules/K/a.ko", "/lib/modules/K/b.ko", "/lib/modules/K/gone.ko"}
    # 2 MiB unserved count first; 1 MiB more fits (b), 3 MiB more does not (a).
    assert choose_local_copies(FILES, "likely", 4 * MIB) == {
        "/lib/modules/K/b.ko", "/lib/modules/K/gone.ko"}


def test_a_file_the_archive_cannot_serve_is_kept_whatever_the_budget() -> None:
    for keep in STASH_KEEP:
        assert "/lib/modules/K/gone.ko" in choose_local_copies(FILES, keep, 0)


def test_likely_families_are_hotplug_storage_nic_and_filesystems() -> None:
    assert likely_offline("virtio_scsi", "kernel/drivers/scsi/virtio_scsi.ko.xz")
    assert likely_offline("e1000e", "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko")
    assert likely_offline("xfs", "kernel/fs/xfs/xfs.ko")
    assert not likely_offline("snd_hda_intel", "kernel/sound/pci/hda/snd-hda-intel.ko")


def test_likely_families_follow_the_platform() -> None:
    # A KVM guest's local copies go to its own drivers, not Hyper-V's, Xen's or AWS's.
    kvm = ("kvm",)
    assert likely_offline("virtio_scsi", "kernel/drivers/scsi/virtio_scsi.ko", (), kvm)
    assert likely_offline("xfs", "kernel/fs/xfs/xfs.ko", (), kvm)
    assert likely_offline("usb_storage", "kernel/drivers/usb/storage/usb-storage.ko", (), kvm)
    for other in ("hv_storvsc", "xen_blkfront", "ena", "mlx5_core", "vmw_pvscsi"):
        assert not likely_offline(other, f"kernel/drivers/{other}.ko", (), kvm), other
        assert likely_offline(other, f"kernel/drivers/{other}.ko"), other  # any platform
    assert likely_offline("ena", "kernel/drivers/net/ethernet/amazon/ena/ena.ko", (),
                          ("aws",))


@pytest.mark.parametrize("size", [0, 1, 128 << 10, (128 << 10) + 1, 300_001])
def test_stored_frame_is_the_bytes_as_they_are_and_any_zstd_reader_decodes_it(
        size: int) -> None:
    data = os.urandom(size)
    frame = raw_frame(data)
    assert frame[16:16 + (128 << 10)] == data[:128 << 10]  # after the headers, as it is
    assert len(frame) - size <= 13 + 3 * (size // (128 << 10) + 1)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == data


RECORD = {"path": "/lib/modules/K/kernel/a.ko.xz", "size": 3, "sha256": "a" * 64,
          "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 1, "module": "a", "kernel": "K",
          "package": "linux-image-K"}


def test_a_record_without_a_source_reads_as_the_stash() -> None:
    entry = StashedFile.from_json(RECORD)
    assert entry.source is Source.STASH and entry.has_blob
    assert "source" not in entry.to_json() and "version" not in entry.to_json()


def test_an_archive_record_round_trips_and_needs_no_blob() -> None:
    doc = {**RECORD, "source": "archive", "version": "6.12.57-1"}
    entry = StashedFile.from_json(doc)
    assert (entry.source, entry.version, entry.has_blob) == (Source.ARCHIVE, "6.12.57-1",
                                                             False)
    assert StashedFile.from_json(entry.to_json()) == entry


@pytest.mark.parametrize("bad", [
    {"source": "cloud"},
    {"source": ["archive"]},
    {"source": "archive"},  # no version
    {"source": "archive", "version": "1", "package": "-o=Dir=/"},
    {"source": "archive", "version": "--print-uris"},
    {"source": "archive", "version": 3},
])
def test_a_bad_source_is_refused_naming_the_file(bad: dict[str, object]) -> None:
    with pytest.raises(StoreError, match=r"a\.ko\.xz"):
        StashedFile.from_json({**RECORD, **bad})


JOURNAL: dict[str, Any] = {
    "version": 2, "action": "apply", "number": 1, "from": 0, "kernels": ["K1"],
    "stash": [{"path": "/lib/modules/K1/kernel/a.ko.xz", "kind": "module", "module": "a",
               "kernel": "K1", "package": "linux-image-K1", "source": "archive",
               "version": "6.12.57-1"}]}


def test_a_journal_item_left_to_the_archive_round_trips() -> None:
    journal = Journal.from_json(Path("/nonexistent-unit-root"), JOURNAL)
    [item] = journal.stash
    assert (item.source, item.version) == (Source.ARCHIVE, "6.12.57-1")
    assert Journal.from_json(Path("/nonexistent-unit-root"), journal.to_json()) == journal


@pytest.mark.parametrize("source", ["cloud", ["archive"], 3])
def test_a_journal_item_with_an_unknown_source_is_refused(source: object) -> None:
    doc = {**JOURNAL, "stash": [{**JOURNAL["stash"][0], "source": source}]}
    with pytest.raises(StoreError, match="unknown source"):
        Journal.from_json(Path("/nonexistent-unit-root"), doc)
