"""What an operation did (or, dry, would do): the paths it moved, its notes, and the
bytes it took out of the tree net of the stash."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..records import Generation


@dataclass(frozen=True)
class Bytes:
    """What an operation did to the disk: bytes it took out of the tree and put back, and
    how much the stash grew (negative: it shrank). A dry run's growth is at most the
    local copies' file sizes (the stash compresses uncompressed modules)."""

    tree_out: int
    tree_in: int
    stash_growth: int
    boot_growth: int = 0  # initramfs images under /boot (a dry run does not know it)

    @property
    def net_freed(self) -> int:
        """Tree bytes out, less tree bytes back in, less the stash's and /boot's growth."""
        return self.tree_out - self.tree_in - self.stash_growth - self.boot_growth

    def to_json(self) -> dict[str, int]:
        return {"tree_bytes_out": self.tree_out, "tree_bytes_in": self.tree_in,
                "stash_growth_bytes": self.stash_growth,
                "boot_growth_bytes": self.boot_growth, "net_freed_bytes": self.net_freed}


@dataclass(frozen=True)
class Outcome:
    """What an operation did (or, with dry_run, would do)."""

    generation: Generation | None  # None for a dry run or a no-op
    stash: tuple[str, ...]
    restore: tuple[str, ...]
    dry_run: bool
    notes: tuple[str, ...] = ()
    regen: dict[str, Any] = field(default_factory=dict)
    packages_removed: tuple[str, ...] = ()  # whole packages removed (or, dry, to remove)
    packages_reinstalled: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()  # files not put back: their stash copy is damaged
    bytes: Bytes = field(default_factory=lambda: Bytes(0, 0, 0))

    def to_json(self) -> dict[str, Any]:
        return {
            **self.bytes.to_json(),
            "damaged": list(self.damaged),
            "generation": self.generation.number if self.generation else None,
            "dry_run": self.dry_run,
            "stash": list(self.stash),
            "restore": list(self.restore),
            "notes": list(self.notes),
            "regen": self.regen,
            "packages_removed": list(self.packages_removed),
            "packages_reinstalled": list(self.packages_reinstalled),
        }
