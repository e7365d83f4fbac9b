"""Every input file is read with a size cap, and FIFOs, sockets and devices are refused
without being opened: /dev/zero, a FIFO nobody writes to, a huge file or a decompression
bomb gives a one-line error naming the file (and the cap), never a hang or a MemoryError."""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import zstandard

from kmodtrim import elf, inputs
from kmodtrim.errors import InputError, ObservationError, PolicyError
from kmodtrim.index import build_index
from kmodtrim.inputs import (
    MAX_CONFIG_BYTES,
    MAX_KERNEL_METADATA_BYTES,
    MAX_MODULE_BYTES,
    MAX_OBSERVATION_BYTES,
    decompress_bounded,
    read_input,
)
from kmodtrim.modprobe import read_modprobe_config
from kmodtrim.observe import (
    ObservedName,
    merge_observed,
    read_filesystems,
    read_observed_file,
    read_proc_modules,
)
from kmodtrim.policy import load_policy
from modbuild import ModSpec, build_tree

T = TypeVar("T")
KVER = "6.1.0-test"
MIB = 1 << 20


def finishes(call: Callable[[], T], *fifos: Path, timeout: float = 10.0) -> T:
    """``call()``'s result (or exception); fails the test if it is still blocked after
    ``timeout`` (on one of ``fifos``, which are then opened for writing to release it)."""
    outcome: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:  # a writer end lets the blocked open return, then EOF
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"blocked for {timeout} s: a FIFO was opened for reading")
    if raised:
        raise raised[0]
    return outcome[0]


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes taking no space."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


# -- the helper --------------------------------------------------------------------------


def test_read_input_refuses_what_is_not_a_regular_file_without_opening_it(
    tmp_path: Path, unix_socket: Path
) -> None:
    pipe = fifo(tmp_path / "pipe")
    cases = {
        pipe: "a FIFO", unix_socket: "a socket", Path("/dev/zero"): "a character device",
        Path("/dev/null"): "a character device", tmp_path: "a directory",
    }
    for path, kind in cases.items():
        def read(path: Path = path) -> bytes:
            return read_input(path, limit=MIB, what="test file")

        with pytest.raises(InputError) as caught:
            finishes(read, pipe)
        assert str(caught.value) == f"{path}: cannot read test file: not a regular file ({kind})"


def test_read_input_caps_the_size_and_names_the_cap(tmp_path: Path) -> None:
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * MIB)
    assert read_input(exact, limit=MIB, what="test file") == b"x" * MIB
    big = sparse(tmp_path / "big", MIB + 1)
    with pytest.raises(InputError, match=r"^.*/big: cannot read test file: larger than the "
                                         r"1 MiB limit$"):
        read_input(big, limit=MIB, what="test file")
    # /proc files say size 0: the cap holds while reading, too.
    status = Path("/proc/self/status")
    assert b"Name:" in read_input(status, limit=MIB, what="status")
    with pytest.raises(InputError, match="larger than the 10 bytes limit"):
        read_input(status, limit=10, what="status")


def test_caps_are_declared_once_and_generous() -> None:
    assert MAX_MODULE_BYTES == 256 * MIB
    assert elf.MAX_MODULE_BYTES == MAX_MODULE_BYTES
    assert MAX_KERNEL_METADATA_BYTES == 64 * MIB
    assert MAX_CONFIG_BYTES == MAX_OBSERVATION_BYTES == 16 * MIB


def bombs(size: int) -> dict[str, bytes]:
    """Small streams decompressing to ``size`` zero bytes; zstd both with and without the
    content size in its frame header."""
    streaming = zstandard.ZstdCompressor(level=1).compressobj()
    return {
        "xz": lzma.compress(bytes(size), preset=0),
        "gzip": gzip.compress(bytes(size), compresslevel=1),
        "zstd": zstandard.ZstdCompressor(level=1).compress(bytes(size)),
        "zstd-unsized": streaming.compress(bytes(size)) + streaming.flush(),
    }


def test_a_decompression_bomb_never_allocates_more_than_the_cap() -> None:
    limit = 2 * MIB
    for kind, stream in bombs(64 * MIB).items():
        compression = kind.removesuffix("-unsized")
        tracemalloc.start()
        try:
            with pytest.raises(InputError, match="decompresses to more than the 2 MiB limit"):
                decompress_bounded(stream, compression, limit=limit, what="test", shown="b")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * limit, (kind, peak)
    for kind, stream in bombs(limit).items():  # at the cap: still read
        compression = kind.removesuffix("-unsized")
        assert decompress_bounded(stream, compression, limit=limit, what="t", shown="b") == \
            bytes(limit)


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd"])
def test_truncated_and_corrupt_streams_are_one_line_errors(compression: str) -> None:
    stream = bombs(MIB)[compression]
    with pytest.raises(InputError, match=r"^f: cannot read t: (truncated|corrupt) "):
        decompress_bounded(stream[: len(stream) // 2], compression, limit=2 * MIB,
                           what="t", shown="f")
    with pytest.raises(InputError, match=r"^f: cannot read t: corrupt "):
        decompress_bounded(b"\x00garbage" * 20, compression, limit=MIB, what="t", shown="f")


@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd"])
def test_streams_larger_than_one_piece_round_trip(compression: str) -> None:
    # Incompressible data: several input pieces and several output pieces per stream.
    data = os.urandom(3 * MIB) + bytes(2 * MIB)
    stream = {"xz": lambda: lzma.compress(data, preset=0),
              "gzip": lambda: gzip.compress(data, compresslevel=1),
              "zstd": lambda: zstandard.ZstdCompressor(level=1).compress(data)}[compression]()
    assert decompress_bounded(stream, compression, limit=len(data), what="t", shown="f") == data
    with pytest.raises(InputError, match="decompresses to more than"):
        decompress_bounded(stream, compression, limit=len(data) - 1, what="t", shown="f")
    with pytest.raises(InputError, match=r"^f: cannot read t: (truncated|corrupt) "):
        decompress_bounded(stream[:-100], compression, limit=len(data), what="t", shown="f")


# -- observations ------------------------------------------------------------------------


def test_observed_dev_zero_and_fifo_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ObservationError, match=r"^/dev/zero: cannot read observed-modules "
                                               r"file: not a regular file \(a character"):
        finishes(lambda: read_observed_file(Path("/dev/zero")))
    pipe = fifo(tmp_path / "pipe")
    with pytest.raises(ObservationError, match=r"not a regular file \(a FIFO\)"):
        finishes(lambda: read_observed_file(pipe), pipe)


def test_observed_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    big = sparse(tmp_path / "big.txt", MAX_OBSERVATION_BYTES + 1)
    with pytest.raises(ObservationError, match="larger than the 16 MiB limit"):
        read_observed_file(big)


def test_a_huge_observed_line_is_not_echoed_whole(tmp_path: Path) -> None:
    for content in ("x/" * 2_500_000, "virtio_net " + "x" * 5_000_000):
        path = tmp_path / "seen.txt"
        path.write_text(content + "\n")
        with pytest.raises(ObservationError) as caught:
            read_observed_file(path)
        message, hint = str(caught.value), caught.value.hint or ""
        assert "…" in message and len(message) < 200 and len(hint) < 200


def test_proc_and_mount_files_that_are_fifos_are_refused(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    pipe = fifo(tmp_path / "proc/modules")
    with pytest.raises(ObservationError, match=r"^/proc/modules: .*not a regular file"):
        finishes(lambda: read_proc_modules(tmp_path), pipe)
    (tmp_path / "etc").mkdir()
    pipe = fifo(tmp_path / "etc/fstab")
    with pytest.raises(ObservationError, match=r"^/etc/fstab: .*not a regular file"):
        finishes(lambda: read_filesystems(tmp_path), pipe)


def test_merge_observed_keeps_each_module_once_from_its_first_source() -> None:
    from_file = [ObservedName("virtio_net", "seen.txt", 1), ObservedName("ext4", "seen.txt", 2)]
    supplied = [ObservedName("ext4", "supplied earlier (seen.txt)", None),
                ObservedName("loop", "supplied earlier (seen.txt)", None)]
    recorded = [ObservedName("virtio_net", "recorded on 1 boot(s)", None)]
    assert merge_observed(from_file, supplied, recorded) == [*from_file, supplied[1]]


# -- the policy --------------------------------------------------------------------------


def test_policy_that_is_dev_null_or_a_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^/dev/null: cannot read policy file: not a "
                                          r"regular file \(a character device\)$"):
        load_policy(tmp_path, Path("/dev/null"))
    pipe = fifo(tmp_path / "policy.toml")
    with pytest.raises(PolicyError, match=r"not a regular file \(a FIFO\)$"):
        finishes(lambda: load_policy(tmp_path, pipe), pipe)
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path, tmp_path / "missing.toml")


def test_policy_dropin_fifo_is_refused_and_dev_null_still_masks(tmp_path: Path) -> None:
    dropins = tmp_path / "etc/kmodtrim/policy.d"
    dropins.mkdir(parents=True)
    (dropins / "10-masked.toml").symlink_to("/dev/null")
    (tmp_path / "etc/kmodtrim/policy.toml").symlink_to("/dev/null")  # masked: defaults
    assert load_policy(tmp_path).settings.rules == []
    pipe = fifo(dropins / "20-pipe.toml")
    with pytest.raises(PolicyError, match=r"20-pipe\.toml: .*not a regular file \(a FIFO\)"):
        finishes(lambda: load_policy(tmp_path), pipe)


def test_policy_over_the_cap_is_refused(tmp_path: Path) -> None:
    big = sparse(tmp_path / "big.toml", MAX_CONFIG_BYTES + 1)
    with pytest.raises(PolicyError, match="larger than the 16 MiB limit"):
        load_policy(tmp_path, big)


@pytest.mark.parametrize("text", [
    "rules = " + "[" * 5000 + "]" * 5000,
    "min_observation = " + "{a = " * 5000 + "1" + "}" * 5000,
    "[" + ".".join(["a"] * 5000) + "]\nx = 1",
    "rules = " + "[" * 40 + "]" * 40,
])
def test_deeply_nested_policy_is_a_policy_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text + "\n")
    with pytest.raises(PolicyError, match=r"deep\.toml: TOML nested .*a policy nests at most 2"):
        load_policy(tmp_path, path)


def test_a_huge_rule_or_value_is_not_echoed_whole(tmp_path: Path) -> None:
    for text in ('rules = ["' + "a b" * 2_000_000 + '"]', 'mode = "' + "m" * 5_000_000 + '"'):
        path = tmp_path / "p.toml"
        path.write_text(text + "\n")
        with pytest.raises(PolicyError) as caught:
            load_policy(tmp_path, path)
        assert "…" in str(caught.value) and len(str(caught.value)) < 300


# -- the module tree ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    build_tree(root, KVER, [ModSpec("core", exports=("core_fn",))], builtin=("ext4",))
    return root


def moddir(root: Path) -> Path:
    return root / "lib/modules" / KVER


def test_a_fifo_or_device_module_is_a_parse_error_not_a_hang(tree: Path) -> None:
    pipe = fifo(moddir(tree) / "kernel/pipe.ko")
    (moddir(tree) / "kernel/zero.ko.xz").symlink_to("/dev/zero")
    index, _ = finishes(lambda: build_index(tree, KVER, use_cache=False), pipe)
    assert sorted(index.modules) == ["core"]
    assert sorted(str(e) for e in index.parse_errors) == [
        f"{moddir(tree)}/kernel/pipe.ko: not a readable kernel module: "
        "not a regular file (a FIFO)",
        f"{moddir(tree)}/kernel/zero.ko.xz: not a readable kernel module: "
        "not a regular file (a character device)",
    ]


def test_a_module_over_the_cap_is_a_parse_error(tree: Path) -> None:
    sparse(moddir(tree) / "kernel/huge.ko.zst", MAX_MODULE_BYTES + 1)
    index, _ = build_index(tree, KVER, use_cache=False)
    assert [str(e) for e in index.parse_errors] == [
        f"{moddir(tree)}/kernel/huge.ko.zst: not a readable kernel module: "
        "larger than the 256 MiB limit"
    ]


def test_builtin_modinfo_that_is_dev_zero_is_refused(tree: Path) -> None:
    modinfo = moddir(tree) / "modules.builtin.modinfo"
    modinfo.unlink()
    modinfo.symlink_to("/dev/zero")
    with pytest.raises(InputError, match=r"modules\.builtin\.modinfo: cannot read "
                                         r"builtin-modules list: not a regular file"):
        build_index(tree, KVER, use_cache=False)


def test_builtin_list_over_the_cap_is_refused(tree: Path) -> None:
    sparse(moddir(tree) / "modules.builtin", MAX_KERNEL_METADATA_BYTES + 1)
    with pytest.raises(InputError, match=r"modules\.builtin: .*larger than the 64 MiB limit"):
        build_index(tree, KVER, use_cache=False)


def test_symvers_decompression_bomb_is_refused(tree: Path) -> None:
    compressor = lzma.LZMACompressor(preset=0)
    chunk = bytes(MIB)
    stream = b"".join(compressor.compress(chunk) for _ in range(65)) + compressor.flush()
    (moddir(tree) / "symvers.xz").write_bytes(stream)
    with pytest.raises(InputError, match=r"symvers\.xz: cannot read kernel symbol list: "
                                         r"decompresses to more than the 64 MiB limit"):
        build_index(tree, KVER, use_cache=False)


def test_symvers_fifo_is_refused(tree: Path, tmp_path: Path) -> None:
    pipe = fifo(tmp_path / "Module.symvers")
    with pytest.raises(InputError, match=r"Module\.symvers: .*not a regular file \(a FIFO\)"):
        finishes(lambda: build_index(tree, KVER, use_cache=False, symvers=pipe), pipe)


def test_index_cache_that_is_a_fifo_is_rebuilt(tree: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    pipe = fifo(cache_dir / f"index-{KVER}.marshal")
    index, stats = finishes(lambda: build_index(tree, KVER, cache_dir=cache_dir), pipe)
    assert sorted(index.modules) == ["core"] and stats.parsed == 1
    assert (cache_dir / f"index-{KVER}.marshal").is_file()  # replaced by a real cache


def test_modprobe_d_fifo_is_refused_and_dev_null_masks(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc/modprobe.d", tmp_path / "lib/modprobe.d"
    etc.mkdir(parents=True)
    lib.mkdir(parents=True)
    (lib / "a.conf").write_text("blacklist pcspkr\n")
    (etc / "a.conf").symlink_to("/dev/null")  # masks lib's a.conf
    (lib / "b.conf").write_text("blacklist floppy\n")
    assert read_modprobe_config(tmp_path).blacklist == {"floppy"}
    pipe = fifo(etc / "c.conf")
    with pytest.raises(InputError, match=r"c\.conf: cannot read modprobe\.d file: not a "
                                         r"regular file \(a FIFO\)"):
        finishes(lambda: read_modprobe_config(tmp_path), pipe)
    pipe.unlink()
    sparse(etc / "c.conf", MAX_CONFIG_BYTES + 1)
    with pytest.raises(InputError, match="larger than the 16 MiB limit"):
        read_modprobe_config(tmp_path)


def test_module_reads_go_through_the_bounded_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap a test lowers in elf is the one decompression honours.
    monkeypatch.setattr(elf, "MAX_MODULE_BYTES", MIB)
    with pytest.raises(InputError, match="decompresses to more than the 1 MiB limit"):
        elf.decompress(bombs(2 * MIB)["zstd"], "zstd", "m.ko.zst")
    assert inputs.MAX_MODULE_BYTES == 256 * MIB


def test_kmodtrims_own_on_demand_file_is_not_read_as_configuration(tmp_path: Path) -> None:
    """Its lines are installs for trimmed modules and those modules' own aliases: the
    index has them from the modules themselves, and reading thousands of them cost every
    plan and restore. Every other file is read as kmod reads it."""
    from kmodtrim.ondemand import CONF_PATH

    conf = tmp_path / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (tmp_path / CONF_PATH.lstrip("/")).write_text(
        "install xfs /usr/bin/kmodtrim restore --on-demand xfs $CMDLINE_OPTS\n"
        "alias fs-xfs xfs\n")
    (conf / "local.conf").write_text("alias my-nic virtio_net\ninstall dummy /bin/true\n")
    config = read_modprobe_config(tmp_path)
    assert config.aliases == (("my_nic", "virtio_net"),)
    assert config.install_commands == {"dummy": "/bin/true"}
    assert config.files == ("/etc/modprobe.d/local.conf",)
