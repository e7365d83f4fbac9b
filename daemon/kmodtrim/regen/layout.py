"""Where a root keeps what regeneration touches: its module trees, whether it is the
running system, which initramfs generator it has installed, its kernel-install entry
directories, and the paths of a kernel's initramfs image and of the kept previous one."""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from .. import fsutil
from ..errors import InputError
from ..inputs import read_optional_input
from ..paths import PREVIOUS_SUFFIX as PREVIOUS_SUFFIX
from .errors import InitramfsError

InitramfsMethod = Literal["auto", "skip", "dracut", "update-initramfs", "kernel-install"]
DetectedMethod = Literal["dracut", "update-initramfs", "kernel-install", "skip"]

NEW_SUFFIX = ".kmodtrim-new"

_MODULE_BASES = ("lib/modules", "usr/lib/modules")
# Where kernel-install puts entry directories ($BOOT/$ENTRY_TOKEN/$KVER/).
_BLS_BOOT_DIRS = ("efi", "boot", "boot/efi")


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
