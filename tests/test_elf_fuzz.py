"""Fuzzing the module reader: whatever the bytes, the answer is a ModuleInfo or a
ModuleParseError — never another exception, a hang or a huge allocation.

Inputs are real gcc-built modules (64- and 32-bit, both byte orders) mutated three ways:
random byte flips, zeroed or truncated ranges, and targeted writes of extreme values into
the fields a reader trusts (ELF header, section header table, symbol table entries).
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kmodtrim.elf import ModuleInfo, decompress, parse_module, parse_module_reference, read_module
from kmodtrim.errors import ModuleParseError
from modbuild import ModSpec, compress_bytes, module_bytes, swap_elf_byte_order

FUZZ = settings(
    deadline=timedelta(milliseconds=500),
    database=None,  # nothing written into the working tree
    derandomize=True,  # the same examples in every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPEC = ModSpec(
    "fuzz-me",
    exports=("fz_open", "fz_close"),
    gpl_exports=("fz_gpl",),
    imports=("printk", "kmalloc"),
    weak_imports=("fz_maybe",),
    depends=("dep-a",),
    softdeps=("pre: crc32c post: fz-post",),
    weakdeps=("fz_weak",),
    aliases=("pci:v00001AF4d*", "fs-fuzz"),
    firmware=("fz/fw.bin",),
    modversions=True,
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the fields a reader trusts live, for one ELF class and byte order."""

    order: str  # struct byte order prefix
    header: tuple[tuple[int, str], ...]  # (offset, struct code) of each ELF header field
    section: tuple[tuple[int, str], ...]  # same for a section header entry
    symbol: tuple[tuple[int, str], ...]  # same for a symbol table entry
    symbol_size: int

    @staticmethod
    def of(data: bytes) -> Layout:
        order = "<" if data[5] == 1 else ">"
        if data[4] == 2:
            return Layout(
                order,
                header=((16, "H"), (18, "H"), (20, "I"), (24, "Q"), (32, "Q"), (40, "Q"),
                        (48, "I"), (52, "H"), (54, "H"), (56, "H"), (58, "H"), (60, "H"),
                        (62, "H")),
                section=((0, "I"), (4, "I"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"),
                         (40, "I"), (44, "I"), (48, "Q"), (56, "Q")),
                symbol=((0, "I"), (4, "B"), (5, "B"), (6, "H"), (8, "Q"), (16, "Q")),
                symbol_size=24,
            )
        return Layout(
            order,
            header=((16, "H"), (18, "H"), (20, "I"), (24, "I"), (28, "I"), (32, "I"),
                    (36, "I"), (40, "H"), (42, "H"), (44, "H"), (46, "H"), (48, "H"),
                    (50, "H")),
            section=tuple((4 * i, "I") for i in range(10)),
            symbol=((0, "I"), (4, "I"), (8, "I"), (12, "B"), (13, "B"), (14, "H")),
            symbol_size=16,
        )

    def read(self, data: bytes, offset: int, code: str) -> int:
        value: int = struct.unpack_from(self.order + code, data, offset)[0]
        return value

    def section_table(self, data: bytes) -> tuple[int, int, int]:
        """(e_shoff, e_shentsize, e_shnum)."""
        fields = dict(enumerate(self.header))
        shoff = self.read(data, *fields[5])
        return shoff, self.read(data, *fields[10]), self.read(data, *fields[11])

    def symbol_table(self, data: bytes) -> tuple[int, int]:
        """(offset, size) of .symtab's contents."""
        shoff, shentsize, shnum = self.section_table(data)
        for i in range(shnum):
            entry = shoff + i * shentsize
            if self.read(data, entry + self.section[1][0], "I") == 2:  # SHT_SYMTAB
                return (self.read(data, entry + self.section[4][0], self.section[4][1]),
                        self.read(data, entry + self.section[5][0], self.section[5][1]))
        raise AssertionError("no symbol table")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    scratch = tmp_path_factory.mktemp("fuzz-build")
    le64 = module_bytes(SPEC, scratch)
    le32 = module_bytes(dataclasses.replace(SPEC, arch="i386"), scratch)
    small = module_bytes(ModSpec("tiny", imports=("printk",)), scratch)
    return Corpus((le64, le32, swap_elf_byte_order(le64, machine=22),
                   swap_elf_byte_order(le32, machine=22), small))


def extreme(bits: int) -> st.SearchStrategy[int]:
    """Values that break readers: 0, 1, all ones, sign bits, small and huge counts."""
    top = (1 << bits) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 0xFF, 0xFFFF, top, top - 1, top >> 1, (top >> 1) + 1]),
        st.integers(0, 1 << 16),
        st.integers(0, top),
    ).map(lambda value: value & top)


class Corpus(tuple[bytes, ...]):
    """Seed inputs; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed modules>"


BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}


@st.composite
def mutated(draw: st.DrawFn, corpus: Corpus) -> bytes:
    """A module from the corpus with one to four mutations of any kind."""
    data = bytearray(draw(st.sampled_from(corpus)))
    lay = Layout.of(bytes(data))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(
            ["flip", "zero", "truncate", "header", "section", "symbol", "ident"]
        ))
        size = len(data)
        if size < 64 and kind not in ("flip", "zero", "truncate"):
            kind = "flip"
        if kind == "flip" and size:
            at = draw(st.integers(0, size - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "zero" and size:
            start = draw(st.integers(0, size - 1))
            end = draw(st.integers(start, min(size, start + 512)))
            data[start:end] = bytes(end - start)
        elif kind == "truncate":
            del data[draw(st.integers(0, size)):]
        elif kind == "ident":
            data[draw(st.integers(4, 15))] = draw(st.integers(0, 255))
        elif kind == "header":
            offset, code = draw(st.sampled_from(lay.header))
            struct.pack_into(lay.order + code, data, offset, draw(extreme(BITS[code])))
        elif kind == "section":
            try:
                shoff, shentsize, shnum = lay.section_table(bytes(data))
            except (struct.error, OverflowError):  # an earlier mutation broke the table
                continue
            index = draw(st.integers(0, max(shnum - 1, 0)))
            offset, code = draw(st.sampled_from(lay.section))
            at = shoff + index * shentsize + offset
            if at + BITS[code] // 8 <= len(data):
                struct.pack_into(lay.order + code, data, at, draw(extreme(BITS[code])))
        elif kind == "symbol":
            try:
                sym_off, sym_size = lay.symbol_table(bytes(data))
            except (struct.error, OverflowError, AssertionError):
                continue
            count = sym_size // lay.symbol_size
            if count == 0:
                continue
            index = draw(st.integers(0, count - 1))
            offset, code = draw(st.sampled_from(lay.symbol))
            at = sym_off + index * lay.symbol_size + offset
            if at + BITS[code] // 8 <= len(data):
                struct.pack_into(lay.order + code, data, at, draw(extreme(BITS[code])))
    return bytes(data)


def parses_or_refuses(data: bytes) -> ModuleInfo | None:
    """parse_module's answer, or None for a ModuleParseError; any other exception escapes."""
    try:
        info = parse_module(data, "fuzz.ko")
    except ModuleParseError as exc:
        assert exc.path == "fuzz.ko"
        event(f"refused: {exc.reason.split(' (')[0]}")  # --hypothesis-show-statistics
        return None
    assert isinstance(info, ModuleInfo) and info.name
    event("parsed")
    return info


def test_corpus_parses_cleanly(corpus: Corpus) -> None:
    names = [parse_module(data, "c.ko").name for data in corpus]
    assert names == ["fuzz_me"] * 4 + ["tiny"]


def test_mutations_change_the_input(corpus: Corpus) -> None:
    # The strategy is not vacuous: most examples differ from every original.
    seen: list[bool] = []

    @settings(FUZZ, max_examples=50)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        seen.append(data.draw(mutated(corpus)) not in corpus)

    collect()
    assert sum(seen) > 40


def test_fast_reader_only_ever_raises_module_parse_error(corpus: Corpus) -> None:
    @settings(FUZZ, max_examples=500)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        parses_or_refuses(data.draw(mutated(corpus)))

    check()


def test_reference_reader_only_ever_raises_module_parse_error(corpus: Corpus) -> None:
    @settings(FUZZ, max_examples=150)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        blob = data.draw(mutated(corpus))
        try:
            parse_module_reference(blob, "fuzz.ko")
        except ModuleParseError as exc:
            assert exc.path == "fuzz.ko"

    check()


def test_read_module_on_mutated_files_only_raises_module_parse_error(
    corpus: Corpus, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The uncompressed file path maps the file instead of reading it: fuzz that too.
    path = tmp_path_factory.mktemp("fuzz-files") / "fuzz.ko"

    @settings(FUZZ, max_examples=100)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        path.write_bytes(data.draw(mutated(corpus)))
        try:
            read_module(path)
        except ModuleParseError as exc:
            assert exc.path == str(path)

    check()


class Streams(tuple[tuple[str, bytes], ...]):
    """(compression, compressed module) seeds, with a short repr."""

    def __repr__(self) -> str:
        return f"<{len(self)} compressed seed modules>"


@st.composite
def mutated_stream(draw: st.DrawFn, streams: Streams) -> tuple[str, bytes]:
    compression, stream = draw(st.sampled_from(streams))
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "zero", "truncate", "append"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "zero" and data:
            start = draw(st.integers(0, len(data) - 1))
            end = draw(st.integers(start, min(len(data), start + 64)))
            data[start:end] = bytes(end - start)
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
    return compression, bytes(data)


@pytest.fixture(scope="module")
def streams(corpus: Corpus) -> Streams:
    return Streams((c, compress_bytes(corpus[0], c)) for c in ("xz", "gzip", "zstd"))


def test_decompression_only_ever_raises_module_parse_error(
    streams: Streams,
) -> None:
    @settings(FUZZ, max_examples=300)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        compression, blob = data.draw(mutated_stream(streams))
        try:
            parses_or_refuses(decompress(blob, compression, "fuzz.ko"))
        except ModuleParseError as exc:
            assert exc.path == "fuzz.ko"

    check()


def test_read_module_on_mutated_compressed_files_only_raises_module_parse_error(
    streams: Streams, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("fuzz-compressed")
    suffix = {"xz": ".ko.xz", "gzip": ".ko.gz", "zstd": ".ko.zst"}

    @settings(FUZZ, max_examples=100)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        compression, blob = data.draw(mutated_stream(streams))
        path = folder / ("fuzz" + suffix[compression])
        path.write_bytes(blob)
        try:
            read_module(path)
        except ModuleParseError as exc:
            assert exc.path == str(path)

    check()
