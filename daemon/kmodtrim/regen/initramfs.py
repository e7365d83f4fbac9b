"""Regenerating a kernel's initramfs: built beside the current image with the root's own
generator, verified to hold every required module, swapped in with the previous image kept,
and put back from that kept copy on rollback."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ..errors import CommandError, InputError
from ..names import normalize
from ..run import run
from .errors import InitramfsError
from .layout import (
    _MODULE_BASES,
    NEW_SUFFIX,
    PREVIOUS_SUFFIX,
    InitramfsMethod,
    _bls_initrd,
    _detect,
    _exists_any,
    _generator,
    _is_live,
    initramfs_path,
    previous_path,
)
from .lister import list_initramfs

_RESTORE_SUFFIX = ".kmodtrim-restore"
_GENERATOR_TIMEOUT = 1800.0


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


def _images_of(root: Path, kernel: str) -> list[Path]:
    """Where kernel's initramfs may be, whichever generator wrote it."""
    candidates = [
        initramfs_path(root, kernel, "update-initramfs"),
        root / "boot" / f"initramfs-{kernel}.img",
    ]
    bls = _bls_initrd(root, kernel)
    if bls is not None:
        candidates.append(bls)
    return candidates


def drop_booted_previous(root: Path, kernel: str, booted_at: float) -> list[Path]:
    """Delete the kept previous images of ``kernel`` (the running one) whose replacement
    was in place before this boot began (``booted_at``, seconds since the epoch): the
    boot loaded the new image and got far enough to run us, so the old one is no longer
    the way back. An image swapped in after the boot began has not booted yet: its
    previous image stays (and a boot that fails never gets here). Returns what went."""
    dropped = []
    for image in _images_of(root, kernel):
        previous = previous_path(image)
        try:
            if previous.is_file() and image.stat().st_mtime < booted_at:
                previous.unlink()
                dropped.append(previous)
        except FileNotFoundError:
            continue
    return dropped


def forget_previous_initramfs(root: Path, kernel: str) -> list[Path]:
    """Delete the kept previous images of kernel (for a kernel being removed); return them.

    Package removal deletes the image itself but knows nothing of ``*.kmodtrim-prev``.
    Raises nothing for absent files; OSError for files that cannot be deleted.
    """
    removed = []
    for image in _images_of(root, kernel):
        for leftover in (previous_path(image), image.with_name(image.name + NEW_SUFFIX)):
            if leftover.exists():
                leftover.unlink()
                removed.append(leftover)
    return removed
