"""scan_firmware lists each firmware file once, also on a usrmerged root (Debian 13), where
/lib/firmware and /usr/lib/firmware are one directory. A few files on a scratch root."""

from __future__ import annotations

from pathlib import Path

from kmodtrim.planner import scan_firmware


def _root(tmp_path: Path, merged: str | None) -> Path:
    root = tmp_path / "root"
    firmware = root / "usr/lib/firmware/vendor"
    firmware.mkdir(parents=True)
    (firmware / "a.bin.xz").write_bytes(b"x" * 3)
    (firmware / "b.bin").symlink_to("a.bin.xz")
    if merged == "lib":
        (root / "lib").symlink_to("usr/lib")
    elif merged == "lib/firmware":
        (root / "lib").mkdir()
        (root / "lib/firmware").symlink_to("../usr/lib/firmware")
    return root


EXPECTED = {"/usr/lib/firmware/vendor/a.bin.xz": 3,
            "/usr/lib/firmware/vendor/b.bin": "/usr/lib/firmware/vendor/a.bin.xz"}


def test_a_usrmerged_root_lists_each_file_once_under_usr(tmp_path: Path) -> None:
    assert scan_firmware(_root(tmp_path, "lib")) == EXPECTED


def test_a_linked_firmware_directory_lists_each_file_once_under_usr(tmp_path: Path) -> None:
    assert scan_firmware(_root(tmp_path, "lib/firmware")) == EXPECTED


def test_separate_trees_are_both_listed(tmp_path: Path) -> None:
    root = _root(tmp_path, None)
    (root / "lib/firmware").mkdir(parents=True)
    (root / "lib/firmware/old.bin").write_bytes(b"y")
    assert scan_firmware(root) == {**EXPECTED, "/lib/firmware/old.bin": 1}
