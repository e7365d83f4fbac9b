"""After the files move: depmod, then the initramfs, for each kernel changed — and the
way back when a transition is undone (the previous image returns)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import regen
from ..errors import StashError
from .journal import InitramfsPending, Journal


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _image_bytes(image: Path) -> int:
    """What an initramfs image and its kept previous image take under /boot."""
    return sum(path.stat().st_size for path in (image, regen.previous_path(image))
               if path.is_file())


def regenerate(root: Path, kernels: Iterable[str], required: dict[str, set[str]],
               method: str, journal: Journal,
               fault_point: Callable[[str], None]) -> dict[str, Any]:
    """depmod, then the initramfs, for each kernel. Before an image can be swapped, the
    journal records its current hash, so recovery can tell whether the swap happened."""
    results: dict[str, Any] = {}
    for kernel in sorted(set(kernels)):
        started = time.perf_counter()
        regen.run_depmod(root, kernel)
        entry: dict[str, Any] = {"depmod_seconds": round(time.perf_counter() - started, 3)}
        fault_point("after-depmod")
        detected = regen.detect_initramfs_method(root, kernel) if method == "auto" else method
        if detected != "skip":
            image = regen.initramfs_path(root, kernel, detected)
            journal.initramfs_pending[kernel] = InitramfsPending(str(image), file_sha256(image))
            journal.save(root)
            before = _image_bytes(image)
            result = regen.regenerate_initramfs(
                root, kernel, required.get(kernel, set()), method)  # type: ignore[arg-type]
            entry["initramfs"] = {
                "method": result.method,
                "image": str(result.image) if result.image else None,
                "previous": str(result.previous) if result.previous else None,
                "skipped": result.skipped_reason,
                "seconds": round(result.seconds, 3),
                "boot_growth_bytes": _image_bytes(image) - before,
            }
            fault_point("after-initramfs")
        results[kernel] = entry
    return results


def restore_initramfs(root: Path, journal: Journal) -> None:
    """Undo any initramfs swap an interrupted or failed transition made: the image goes
    back to the bytes the journal recorded (or away, if there was none)."""
    for kernel, pending in journal.initramfs_pending.items():
        image = Path(pending.image)
        before = pending.sha256
        if file_sha256(image) == before:
            continue  # never swapped
        previous = regen.previous_path(image)
        if before is not None and file_sha256(previous) != before:
            raise StashError(
                f"cannot restore the initramfs of {kernel}: {previous} is not the image "
                "it replaced",
                hint=f"regenerate it (update-initramfs -u -k {kernel} or dracut --force)",
            )
        result = regen.InitramfsResult(
            method="", image=image, previous=previous if before is not None else None,
            modules=frozenset(), seconds=0.0, skipped_reason=None,
        )
        regen.restore_previous_initramfs(root, kernel, result)
