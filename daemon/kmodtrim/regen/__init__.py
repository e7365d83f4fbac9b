"""Regeneration after module files changed: a full depmod, then a verified initramfs.

depmod always runs in full (``depmod -a``), never ``-A``: removing a file makes nothing
newer, and restored files keep their old mtimes, so the quick check would skip the work.

The initramfs is rebuilt with the generator the root itself uses, *beside* the current image
(``IMAGE.kmodtrim-new``), listed and checked to contain every required (boot-critical)
module, and only then swapped in with ``rename``.  The image it replaces is kept as
``IMAGE.kmodtrim-prev`` (e.g. ``/boot/initrd.img-KVER.kmodtrim-prev``,
``/boot/initramfs-KVER.img.kmodtrim-prev``, ``ENTRY_DIR/initrd.kmodtrim-prev``) so that a
rollback can put it back byte for byte.  Boot loaders look for exact image names, so the
kept copy is never booted by accident.  It is kept only until the new image has booted:
kmodtrimd, starting in a boot that began after the swap, drops it
(``drop_booted_previous``); until then ``status`` counts it against the bytes freed.

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

The package's files: layout.py says where a root keeps its trees and images and which
generator it uses, depmod.py runs depmod, lister.py reads images, initramfs.py regenerates,
swaps and restores them, errors.py holds InitramfsError.
"""

from __future__ import annotations

from .depmod import run_depmod
from .errors import InitramfsError
from .initramfs import (
    InitramfsResult,
    drop_booted_previous,
    forget_previous_initramfs,
    regenerate_initramfs,
    restore_previous_initramfs,
)
from .layout import (
    NEW_SUFFIX,
    PREVIOUS_SUFFIX,
    DetectedMethod,
    InitramfsMethod,
    boot_dir,
    detect_initramfs_method,
    initramfs_path,
    previous_path,
)
from .lister import list_initramfs, verify_initramfs

__all__ = [
    "NEW_SUFFIX",
    "PREVIOUS_SUFFIX",
    "DetectedMethod",
    "InitramfsError",
    "InitramfsMethod",
    "InitramfsResult",
    "boot_dir",
    "detect_initramfs_method",
    "drop_booted_previous",
    "forget_previous_initramfs",
    "initramfs_path",
    "list_initramfs",
    "previous_path",
    "regenerate_initramfs",
    "restore_previous_initramfs",
    "run_depmod",
    "verify_initramfs",
]
