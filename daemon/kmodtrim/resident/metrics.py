"""node_exporter textfile-collector metrics of one kmodtrimd, written atomically after
each job, after new observations and at start-up (never on a timer).

The file is ``DIR/kmodtrim.prom`` (DIR: ``--metrics-dir``; for the live root by default
Debian's textfile directory, /var/lib/prometheus/node-exporter, and only if it exists;
for an image root only where told). Every value comes from the daemon's own small state:
the current generation, the stash directory's size, the recorded boots, and the restore
counters it keeps since it started. No per-module labels: one series per kernel at most.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..state.files import replace_file, state_dir

DEFAULT_TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")
METRICS_FILE = "kmodtrim.prom"
TRIM_ACTIONS = frozenset({"apply"})  # generations that trimmed (kernel events too)

log = logging.getLogger("kmodtrim.daemon")


@dataclass
class RestoreCounters:
    """Modules restored since kmodtrimd started: for a device that appeared (self-heal),
    for modprobe (a Restore with on_demand: ``kmodtrim restore --on-demand``) and by hand
    (any other Restore: ``kmodtrim restore NAME``)."""

    self_heal: int = 0
    on_demand: int = 0
    by_hand: int = 0


@dataclass(frozen=True)
class MetricsState:
    """What the metrics are computed from (plain data): ``generation`` is the current
    generation's summary (store.summary_of)."""

    generation: Mapping[str, Any]
    stash_bytes: int
    boots: int
    last_trim: float | None  # epoch of the latest trimming generation
    counters: RestoreCounters = field(default_factory=RestoreCounters)


def created_epoch(created: str) -> float | None:
    """A generation's creation time (``created``) as an epoch (None when unreadable)."""
    try:
        return datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(float(value))


def render_metrics(state: MetricsState) -> str:
    """The text exposition format (version 0.0.4) of ``state``."""
    kernels = {kernel: (int(entry["module_files"]), int(entry["bytes"]))
               for kernel, entry in state.generation["kernels"].items()}
    removed = int(state.generation["removed_bytes"])
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               values: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in values)

    metric("kmodtrim_generation", "gauge", "The current generation (0: as installed).",
           [("", state.generation["generation"])])
    metric("kmodtrim_removed_bytes", "gauge", "Bytes of the files out of the tree.",
           [("", removed)])
    metric("kmodtrim_stash_bytes", "gauge", "Bytes the local stash takes on disk.",
           [("", state.stash_bytes)])
    metric("kmodtrim_freed_bytes", "gauge",
           "Disk freed: bytes out of the tree less the stash on disk.",
           [("", removed - state.stash_bytes)])
    metric("kmodtrim_trimmed_modules", "gauge", "Modules out of the tree, per kernel.",
           [(f'{{kernel="{_label(k)}"}}', v[0]) for k, v in sorted(kernels.items())])
    metric("kmodtrim_trimmed_bytes", "gauge", "Bytes out of the tree, per kernel.",
           [(f'{{kernel="{_label(k)}"}}', v[1]) for k, v in sorted(kernels.items())])
    metric("kmodtrim_last_trim_timestamp_seconds", "gauge",
           "When the latest trim was made (0: never).",
           [("", float(state.last_trim or 0))])
    metric("kmodtrim_observation_boots", "gauge", "Boots whose loaded modules are recorded.",
           [("", state.boots)])
    metric("kmodtrim_self_heal_restores_total", "counter",
           "Modules restored for a device that appeared, since kmodtrimd started.",
           [("", state.counters.self_heal)])
    metric("kmodtrim_on_demand_restores_total", "counter",
           "Modules restored because modprobe asked for them (restore --on-demand), since "
           "kmodtrimd started.", [("", state.counters.on_demand)])
    metric("kmodtrim_restores_by_hand_total", "counter",
           "Modules restored on any other request (kmodtrim restore NAME, D-Bus Restore), "
           "since kmodtrimd started.", [("", state.counters.by_hand)])
    return "\n".join(lines) + "\n"


def stash_bytes(root: Path) -> int:
    """What the stash directory holds on disk (its packs and objects)."""
    total = 0
    pending = [state_dir(root) / "stash"]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


def metrics_dir(root: Path, given: Path | None, live: bool) -> Path | None:
    """Where to write: ``given``, else the default textfile directory for the live root
    when it exists (node_exporter installed); None: nowhere."""
    if given is not None:
        return given
    return DEFAULT_TEXTFILE_DIR if live and DEFAULT_TEXTFILE_DIR.is_dir() else None


def write_metrics(directory: Path, text: str) -> None:
    """Replace DIR/kmodtrim.prom atomically (node_exporter never reads half a file: the
    temporary file does not end in .prom). Logged, never raised: metrics never stop the
    daemon."""
    try:
        replace_file(directory / METRICS_FILE, text.encode(), durable=False)
    except OSError as exc:
        log.warning("cannot write metrics to %s: %s", directory, exc.strerror or exc)
