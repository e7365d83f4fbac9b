"""Regeneration after module files changed: a full depmod, then a verified initramfs.

depmod always runs in full (``depmod -a``), never ``-A``: removing a file makes nothing
newer, and restored files keep their old mtimes, so the quick check would skip the work.

The initramfs is rebuilt with the generator the root itself uses, *beside* the current image
(``IMAGE.kmodtrim-new``), listed and checked to contain every required (boot-critical)
module, and only then swapped in with ``rename``.  The image it replaces is kept as
``IMAGE.kmodtrim-prev`` (e.g. ``/boot/initrd.img-KVER.kmodtrim-prev``,
``/boot/initramfs-KVER.img.kmodtrim-prev``, ``ENTRY_DIR/initrd.kmodtrim-prev``) so that a
rollback can put it back byte for byte.  Boot loaders look for exact image names, so the
kept copy is never booted by accident.

Methods, and how each runs against a root that is not ``/`` (an offline image):

``dracut``
    On ``/``: ``dracut --force --kver KVER OUT`` with the system's own configuration.
    On a root with dracut installed (``ROOT/usr/lib/dracut/modules.d``): ``dracut --sysroot
    ROOT --no-hostonly`` — programs, dracut modules, configuration, kernel modules and
    firmware are all taken from the root.  On a root without dracut (only a kernel tree):
    this host's dracut and programs, with the root's kernel modules (``--kmoddir``),
    firmware (``--fwdir``) and configuration (``--conf``/``--confdir``: ``ROOT/etc/dracut.conf``
    and ``ROOT/etc/dracut.conf.d``, each only if present).
``update-initramfs`` (initramfs-tools)
    Runs ``mkinitramfs -o OUT KVER`` — the command ``update-initramfs -u`` runs, minus its
    in-place rename.  mkinitramfs reads modules only from ``/lib/modules`` of the system it
    runs on and has no option to point it elsewhere (``MODULESDIR`` is set inside the script,
    ``-r`` is the *boot* root device), so an offline root must be a complete system that
    is prepared for ``chroot`` (``ROOT/dev/null`` a device, ``ROOT/proc`` mounted); it then
    runs as ``chroot ROOT mkinitramfs``.  Otherwise an :class:`InitramfsError` says so.
``kernel-install``
    For roots whose initrd lives in a Boot Loader Specification entry directory
    (``{/efi,/boot,/boot/efi}/TOKEN/KVER/initrd``).  ``kernel-install add`` would rewrite
    the entry in place, with no chance to verify first, so it is not called: the image is
    built by the generator kernel-install's plugin would call (the root's dracut, else
    mkinitramfs), beside the entry's initrd, and swapped like the others.

Image listing (:func:`list_initramfs`) reads the archive itself: any number of uncompressed
``newc`` cpio segments (early microcode) followed by compressed ones (gzip, xz, lzma, bzip2,
zstd).  That does not depend on which of initramfs-tools or dracut is installed and does not
unpack anything to disk; only for lz4/lzo images it falls back to ``lsinitramfs``.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from . import fsutil
from .errors import CommandError, InputError, KernelNotFoundError
from .inputs import read_optional_input
from .names import module_name_from_path, normalize
from .run import run

InitramfsMethod = Literal["auto", "skip", "dracut", "update-initramfs", "kernel-install"]
DetectedMethod = Literal["dracut", "update-initramfs", "kernel-install", "skip"]

NEW_SUFFIX = ".kmodtrim-new"
PREVIOUS_SUFFIX = ".kmodtrim-prev"
_RESTORE_SUFFIX = ".kmodtrim-restore"

_MODULE_BASES = ("lib/modules", "usr/lib/modules")
# Where kernel-install puts entry directories ($BOOT/$ENTRY_TOKEN/$KVER/).
_BLS_BOOT_DIRS = ("efi", "boot", "boot/efi")
_GENERATOR_TIMEOUT = 1800.0
_DEPMOD_TIMEOUT = 600.0


class InitramfsError(CommandError):
    """The initramfs could not be generated, read, verified, swapped in or restored.

    Nothing was swapped in when this is raised by :func:`regenerate_initramfs`; the
    caller rolls the module change back.
    """

    dbus_name = "org.kmodtrim.KmodTrim1.Error.Initramfs"


@dataclass(frozen=True)
class InitramfsResult:
    """What :func:`regenerate_initramfs` did.

    ``image`` is the regenerated image (None when skipped), ``previous`` the kept copy of
    the image it replaced (None when there was none), ``modules`` the module names the new
    image contains, ``skipped_reason`` why nothing was generated (None when it was).
    """

    method: str
    image: Path | None
    previous: Path | None
    modules: frozenset[str]
    seconds: float
    skipped_reason: str | None


# ---------------------------------------------------------------------------------------
# depmod


def run_depmod(root: Path, kernel: str) -> None:
    """Rebuild every ``modules.*`` index of ``kernel`` under ``root`` (``depmod -a``).

    Raises KernelNotFoundError if the root has no module directory for the kernel, and
    CommandError if depmod fails.
    """
    if not any((root / base / kernel).is_dir() for base in _MODULE_BASES):
        raise KernelNotFoundError(
            f"no module directory for kernel {kernel} under {root} "
            f"(looked in {', '.join(base + '/' + kernel for base in _MODULE_BASES)})",
            hint="check --kernel and --root",
        )
    argv: list[str | Path] = ["depmod", "-a"]
    if not _is_live(root):
        argv += ["-b", root]
    run([*argv, kernel], timeout=_DEPMOD_TIMEOUT)


# ---------------------------------------------------------------------------------------
# Detection and paths


def _is_live(root: Path) -> bool:
    return root.resolve() == Path("/")


def _exists_any(root: Path, relpaths: Iterable[str]) -> bool:
    return any((root / rel).exists() for rel in relpaths)


def _generator(root: Path) -> Literal["dracut", "update-initramfs"] | None:
    """The initramfs generator installed in root, or None."""
    # update-initramfs itself belongs to Debian's initramfs-tools package, which conflicts
    # with the dracut package; the -core packages of both may coexist, so their files alone
    # do not decide.
    if _exists_any(root, ("usr/sbin/update-initramfs", "sbin/update-initramfs")):
        return "update-initramfs"
    if _exists_any(root, ("usr/bin/dracut", "usr/sbin/dracut", "etc/dracut.conf")):
        return "dracut"
    if _exists_any(root, ("usr/sbin/mkinitramfs", "sbin/mkinitramfs")) and (
        root / "etc/initramfs-tools"
    ).is_dir():
        return "update-initramfs"
    return None


def _entry_token(root: Path) -> str | None:
    """kernel-install's entry token: etc/kernel/entry-token, else the machine id."""
    for rel in ("etc/kernel/entry-token", "etc/machine-id"):
        with contextlib.suppress(InputError):
            data = read_optional_input(root / rel, limit=4096, what="entry token",
                                       skip_unreadable=True)
            token = (data or b"").decode("utf-8", "replace").strip()
            if token:
                return token
    return None


def _bls_initrd(root: Path, kernel: str) -> Path | None:
    """An existing initrd in a kernel-install entry directory for kernel, or None."""
    for boot in _BLS_BOOT_DIRS:
        base = root / boot
        if not base.is_dir():
            continue
        token = _entry_token(root)
        candidates = [base / token / kernel / "initrd"] if token else []
        candidates += sorted(base.glob(f"*/{glob.escape(kernel)}/initrd"))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def _detect(root: Path, kernel: str) -> tuple[DetectedMethod, str | None]:
    generator = _generator(root)
    if generator is None:
        return "skip", (
            f"no initramfs generator under {root} "
            "(neither initramfs-tools' update-initramfs nor dracut is installed)"
        )
    if _bls_initrd(root, kernel) is not None:
        return "kernel-install", None
    image = initramfs_path(root, kernel, generator)
    if not image.is_file():
        return "skip", f"kernel {kernel} has no initramfs to regenerate (no {image})"
    return generator, None


def detect_initramfs_method(root: Path, kernel: str) -> DetectedMethod:
    """The initramfs method root uses for kernel, or ``"skip"``.

    ``"update-initramfs"`` for initramfs-tools (Debian/Ubuntu), ``"dracut"`` when dracut is
    the generator (Fedora, or Debian with dracut), ``"kernel-install"`` when the kernel's
    initrd lives in a Boot Loader Specification entry directory; ``"skip"`` when no
    generator is installed or the kernel has no existing image.  Raises nothing.
    """
    return _detect(root, kernel)[0]


def boot_dir(root: Path) -> Path:
    """ROOT/boot as it really is: a link there is resolved inside the root (an image root's
    /boot link must not make kmodtrim write the host's /boot). Raises StoreError for a
    link that loops."""
    try:
        return fsutil.resolve(root, "/boot/initrd").parent
    except (FileNotFoundError, NotADirectoryError):
        return root / "boot"


def initramfs_path(root: Path, kernel: str, method: str) -> Path:
    """Where the initramfs of kernel lives under root for method.

    ``update-initramfs``: ``ROOT/boot/initrd.img-KVER``.  ``dracut``: whichever of
    ``ROOT/boot/initramfs-KVER.img`` (Fedora) and ``ROOT/boot/initrd.img-KVER`` (Debian)
    exists, else by the root's distribution.  ``kernel-install``: the entry directory's
    ``initrd``.  Raises InputError for an unknown method, InitramfsError when a
    kernel-install root has neither an entry directory nor an entry token.
    """
    boot = boot_dir(root)
    if method == "update-initramfs":
        return boot / f"initrd.img-{kernel}"
    if method == "dracut":
        fedora, debian = boot / f"initramfs-{kernel}.img", boot / f"initrd.img-{kernel}"
        for image in (fedora, debian):
            if image.is_file():
                return image
        return debian if (root / "etc/debian_version").exists() else fedora
    if method == "kernel-install":
        found = _bls_initrd(root, kernel)
        if found is not None:
            return found
        token = _entry_token(root)
        if token is None:
            raise InitramfsError(
                f"kernel {kernel} has no boot entry directory under {root} and the root has no "
                "entry token (etc/kernel/entry-token or etc/machine-id)",
                hint="install the kernel with kernel-install first, or choose another method",
            )
        return boot / token / kernel / "initrd"
    raise InputError(
        f"unknown initramfs method {method!r}",
        hint="use one of: " + ", ".join(get_args(InitramfsMethod)),
    )


def previous_path(image: Path) -> Path:
    """Where the image that ``image`` replaced is kept: ``IMAGE.kmodtrim-prev``."""
    return image.with_name(image.name + PREVIOUS_SUFFIX)


# ---------------------------------------------------------------------------------------
# Reading images


def list_initramfs(image: Path) -> set[str]:
    """The normalised names of the kernel modules contained in an initramfs image.

    Reads the cpio segments itself (see the module docstring); lz4/lzo-compressed
    segments are listed with ``lsinitramfs``.  Raises InitramfsError when the image cannot
    be read or is not an initramfs.
    """
    try:
        paths = _cpio_paths_of_file(image)
    except _NeedsExternalLister:
        paths = _external_paths(image)
    names: set[str] = set()
    for path in paths:
        # Only the module tree counts; a stray .ko elsewhere is not loadable by modprobe.
        if "lib/modules/" in path:
            name = module_name_from_path(path)
            if name is not None:
                names.add(name)
    return names


def verify_initramfs(image: Path, required: Iterable[str]) -> list[str]:
    """The required module names (normalised, sorted) that image does not contain.

    Raises InitramfsError when the image cannot be read.
    """
    present = list_initramfs(image)
    return sorted({normalize(name) for name in required} - present)


class _NeedsExternalLister(Exception):
    """A segment uses a compression the standard library cannot read."""


_CPIO_NEWC = (b"070701", b"070702")
_CPIO_HEADER = 110
_NONZERO = re.compile(rb"[^\x00]")


def _cpio_paths_of_file(image: Path) -> list[str]:
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise InitramfsError(f"{image}: cannot read initramfs image: {exc.strerror}") from exc
    if not data:
        raise InitramfsError(f"{image}: initramfs image is empty")
    try:
        return _segments(data)
    except _BadImage as exc:
        raise InitramfsError(f"{image}: not a readable initramfs: {exc}") from None


class _BadImage(Exception):
    pass


def _segments(data: bytes) -> list[str]:
    """Paths in a sequence of cpio archives, each plain or compressed, zero-padded between."""
    view = memoryview(data)
    paths: list[str] = []
    pos = 0
    seen_archive = False
    while True:
        found = _NONZERO.search(data, pos)
        if found is None:
            break
        pos = found.start()
        magic = bytes(view[pos : pos + 6])
        if magic in _CPIO_NEWC:
            pos = _cpio_archive(view, pos, paths)
        else:
            decompress = _decompressor_for(bytes(view[pos : pos + 6]))
            if decompress is None:
                if not seen_archive:
                    raise _BadImage(f"unknown format at offset {pos} (magic {magic.hex()})")
                # Trailing garbage after valid archives is what the kernel ignores too.
                break
            inner, used = decompress(view[pos:])
            if used <= 0:
                raise _BadImage(f"compressed segment at offset {pos} is empty")
            paths += _segments(inner)
            pos += used
        seen_archive = True
    if not seen_archive:
        raise _BadImage("no cpio archive found")
    return paths


def _cpio_archive(view: memoryview, pos: int, paths: list[str]) -> int:
    """Append the paths of the newc archive at pos (up to its trailer); return its end."""
    end = len(view)
    while True:
        if pos + _CPIO_HEADER > end:
            raise _BadImage(f"truncated cpio header at offset {pos}")
        header = bytes(view[pos : pos + _CPIO_HEADER])
        if header[:6] not in _CPIO_NEWC:
            raise _BadImage(f"bad cpio magic at offset {pos}")
        try:
            filesize = int(header[54:62], 16)
            namesize = int(header[94:102], 16)
        except ValueError:
            raise _BadImage(f"bad cpio header at offset {pos}") from None
        name_start = pos + _CPIO_HEADER
        name_end = name_start + namesize
        if namesize < 1 or name_end > end:
            raise _BadImage(f"bad cpio name size at offset {pos}")
        name = bytes(view[name_start : name_end - 1]).decode("utf-8", "surrogateescape")
        data_start = _align4(name_end)
        pos = _align4(data_start + filesize)
        if name == "TRAILER!!!":
            return min(pos, end)
        if data_start + filesize > end:
            raise _BadImage(f"cpio member {name!r} runs past the end of the image")
        paths.append(name.removeprefix("./").lstrip("/"))


def _align4(n: int) -> int:
    return (n + 3) & ~3


Decompress = Callable[[memoryview], tuple[bytes, int]]


def _decompressor_for(magic: bytes) -> Decompress | None:
    if magic.startswith(b"\x1f\x8b"):
        return lambda buf: _stream(zlib.decompressobj(wbits=31), buf, "gzip")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lambda buf: _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), buf, "xz")
    if magic.startswith(b"\x5d\x00\x00"):
        return lambda buf: _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), buf, "lzma")
    if magic.startswith(b"BZh"):
        return lambda buf: _stream(bz2.BZ2Decompressor(), buf, "bzip2")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard  # lazily: only zstd images need it

        return lambda buf: _stream(zstandard.ZstdDecompressor().decompressobj(), buf, "zstd")
    if magic.startswith((b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18", b"\x89LZO")):
        raise _NeedsExternalLister()
    return None


class _Decoder(Protocol):
    def decompress(self, data: memoryview, /) -> bytes: ...


def _stream(decoder: _Decoder, buf: memoryview, kind: str) -> tuple[bytes, int]:
    """Decompress one stream from buf; return its output and how many input bytes it used."""
    try:
        out = decoder.decompress(buf)
    except Exception as exc:  # zlib.error, LZMAError, OSError, ZstdError: all "corrupt"
        raise _BadImage(f"corrupt {kind} segment: {exc}") from None
    eof = getattr(decoder, "eof", True)
    if not eof:
        raise _BadImage(f"truncated {kind} segment")
    unused: bytes = getattr(decoder, "unused_data", b"")
    return out, len(buf) - len(unused)


def _external_paths(image: Path) -> list[str]:
    if shutil.which("lsinitramfs") is None:
        raise InitramfsError(
            f"{image}: initramfs is lz4/lzo-compressed and lsinitramfs is not installed",
            hint="install initramfs-tools-core (and lz4/lzop)",
        )
    done = run(["lsinitramfs", image], check=False, timeout=300)
    if done.returncode != 0 or not done.stdout.strip():
        raise InitramfsError(f"{image}: lsinitramfs could not list it:\n{done.stderr.strip()}")
    return [line.strip().removeprefix("./") for line in done.stdout.splitlines()]


# ---------------------------------------------------------------------------------------
# Generating


def _generator_for(root: Path, method: str) -> Literal["dracut", "update-initramfs"]:
    if method in ("dracut", "update-initramfs"):
        return method  # type: ignore[return-value]
    generator = _generator(root)
    if generator is None:
        raise InitramfsError(
            f"kernel-install layout under {root} but no initramfs generator is installed "
            "there (neither dracut nor initramfs-tools)",
            hint="install one in the root, or use --initramfs skip",
        )
    return generator


def _dracut_argv(root: Path, kernel: str, out: Path, empty_dir: Path) -> list[str | Path]:
    argv: list[str | Path] = ["dracut", "--force", "--kver", kernel]
    if _is_live(root):
        return [*argv, out]
    # The machine running kmodtrim is not the one that boots this image: no host-only.
    argv.append("--no-hostonly")
    if (root / "usr/lib/dracut/modules.d").is_dir():
        return [*argv, "--sysroot", root, out]
    moddir = next(
        (root / base / kernel for base in _MODULE_BASES if (root / base / kernel).is_dir()),
        root / "lib/modules" / kernel,
    )
    fw = root / "lib/firmware"
    argv += [
        "--kmoddir", moddir,
        "--fwdir", f"{fw}/updates/{kernel}:{fw}/updates:{fw}/{kernel}:{fw}",
    ]
    conf = root / "etc/dracut.conf"
    argv += ["--conf", conf if conf.is_file() else "/dev/null"]
    confdir = root / "etc/dracut.conf.d"
    # An empty directory of our own keeps this host's /etc/dracut.conf.d out.
    argv += ["--confdir", confdir if confdir.is_dir() else empty_dir]
    return [*argv, out]


def _mkinitramfs_argv(root: Path, kernel: str, out: Path) -> list[str | Path]:
    if _is_live(root):
        return ["mkinitramfs", "-o", out, kernel]
    dev_null = root / "dev/null"
    ready = (
        _exists_any(root, ("usr/sbin/mkinitramfs", "sbin/mkinitramfs"))
        and (root / "bin/sh").exists()
        and dev_null.exists()
        and stat.S_ISCHR(dev_null.stat().st_mode)
        and (root / "proc/self").exists()
    )
    if not ready:
        raise InitramfsError(
            f"cannot run initramfs-tools for {root}: mkinitramfs only reads modules from "
            "/lib/modules of the system it runs on, so it must run chrooted into a complete "
            "system with initramfs-tools installed, /dev and /proc mounted",
            hint=f"mount /dev and /proc under {root} (as image builders do), "
            "or choose --initramfs dracut or --initramfs skip",
        )
    return ["chroot", root, "mkinitramfs", "-o", "/" + str(out.relative_to(root)), kernel]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dest: Path) -> None:
    """dest becomes a byte-identical, synced copy of src (mode and times too)."""
    # A copy, never a hard link: dracut --force rewrites an existing output file in place
    # (cp), which would change a linked previous image with it.
    shutil.copy2(src, dest)
    _fsync(dest)


@contextlib.contextmanager
def _removed_on_error(*paths: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        raise


def regenerate_initramfs(
    root: Path,
    kernel: str,
    required: Iterable[str],
    method: InitramfsMethod = "auto",
) -> InitramfsResult:
    """Rebuild kernel's initramfs under root, verify it, and swap it in.

    The new image is written to ``IMAGE.kmodtrim-new``; if it lacks any of ``required``
    (module names; built-ins already left out) it is deleted and InitramfsError names the
    missing modules.  Otherwise the current image is kept as ``IMAGE.kmodtrim-prev`` and
    the new one renamed into place (both synced).  ``method="auto"`` uses
    :func:`detect_initramfs_method`; ``"skip"`` (or auto finding nothing to do) returns a
    result with ``skipped_reason``.  Raises InitramfsError when generation, listing or
    verification fails — nothing is swapped in then — and InputError for an unknown method.
    """
    started = time.perf_counter()
    wanted = sorted({normalize(name) for name in required})
    if method not in get_args(InitramfsMethod):
        raise InputError(
            f"unknown initramfs method {method!r}",
            hint="use one of: " + ", ".join(get_args(InitramfsMethod)),
        )
    chosen: str = method
    reason: str | None = None
    if method == "auto":
        chosen, reason = _detect(root, kernel)
    elif method == "skip":
        reason = "initramfs regeneration is disabled (method skip)"
    if chosen == "skip":
        return InitramfsResult("skip", None, None, frozenset(), time.perf_counter() - started,
                               reason)

    image = initramfs_path(root, kernel, chosen)
    generator = _generator_for(root, chosen)
    new = image.with_name(image.name + NEW_SUFFIX)
    previous = previous_path(image)
    image.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of an interrupted run are never worth keeping.
    new.unlink(missing_ok=True)
    with _removed_on_error(new), tempfile.TemporaryDirectory(prefix="kmodtrim-") as scratch:
        if generator == "dracut":
            argv = _dracut_argv(root, kernel, new, Path(scratch))
        else:
            argv = _mkinitramfs_argv(root, kernel, new)
        try:
            run(argv, timeout=_GENERATOR_TIMEOUT)
        except CommandError as exc:
            raise InitramfsError(
                f"{generator} could not build the initramfs of {kernel} for {root}; "
                f"nothing was changed:\n{exc.message}",
                hint=exc.hint,
            ) from exc
        if not new.is_file() or new.stat().st_size == 0:
            raise InitramfsError(f"{generator} reported success but wrote no image for {kernel}")
    with _removed_on_error(new):
        modules = frozenset(list_initramfs(new))
        missing = [name for name in wanted if name not in modules]
        if missing:
            raise InitramfsError(
                f"the new initramfs of {kernel} ({generator}) lacks boot-critical "
                f"module(s) {', '.join(missing)}; the current image {image} was left as it was",
                hint="make sure those modules are kept and the generator's configuration "
                "includes them (dracut: add_drivers; initramfs-tools: etc/initramfs-tools/modules)",
            )
        if image.is_file():
            os.chmod(new, stat.S_IMODE(image.stat().st_mode))
        _fsync(new)
        kept: Path | None = None
        if image.is_file():
            staged = image.with_name(image.name + PREVIOUS_SUFFIX + ".tmp")
            staged.unlink(missing_ok=True)
            _copy_synced(image, staged)
            os.replace(staged, previous)
            kept = previous
        os.replace(new, image)
        _fsync(image.parent)
    return InitramfsResult(chosen, image, kept, modules, time.perf_counter() - started, None)


def restore_previous_initramfs(root: Path, kernel: str, result: InitramfsResult) -> None:
    """Put back the image that result's regeneration replaced (byte-identical).

    The kept copy stays in place, so restoring twice is harmless.  When there was no image
    before, the regenerated one is removed.  Does nothing for a skipped result.  Raises
    InitramfsError if the kept copy is gone or cannot be copied.
    """
    if result.image is None:
        return
    image = result.image
    if not image.is_relative_to(root):
        raise InitramfsError(f"initramfs {image} of {kernel} is not under {root}")
    if result.previous is None:
        image.unlink(missing_ok=True)
        _fsync(image.parent)
        return
    if not result.previous.is_file():
        raise InitramfsError(
            f"cannot restore the initramfs of {kernel}: the kept image {result.previous} is gone",
            hint=f"regenerate it (e.g. `update-initramfs -u -k {kernel}` or "
            f"`dracut --force --kver {kernel}`)",
        )
    staged = image.with_name(image.name + _RESTORE_SUFFIX)
    staged.unlink(missing_ok=True)
    try:
        _copy_synced(result.previous, staged)
        os.replace(staged, image)
        _fsync(image.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise InitramfsError(
            f"cannot restore {image} from {result.previous}: {exc.strerror}"
        ) from exc


def forget_previous_initramfs(root: Path, kernel: str) -> list[Path]:
    """Delete the kept previous images of kernel (for a kernel being removed); return them.

    Package removal deletes the image itself but knows nothing of ``*.kmodtrim-prev``.
    Raises nothing for absent files; OSError for files that cannot be deleted.
    """
    candidates = [
        initramfs_path(root, kernel, "update-initramfs"),
        root / "boot" / f"initramfs-{kernel}.img",
    ]
    bls = _bls_initrd(root, kernel)
    if bls is not None:
        candidates.append(bls)
    removed = []
    for image in candidates:
        for leftover in (previous_path(image), image.with_name(image.name + NEW_SUFFIX)):
            if leftover.exists():
                leftover.unlink()
                removed.append(leftover)
    return removed
