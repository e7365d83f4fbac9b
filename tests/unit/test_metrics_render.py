"""kmodtrimd's node_exporter metrics rendered from plain state: one series per kernel at
most (no per-module labels), the text exposition format's HELP/TYPE lines."""

from __future__ import annotations

from kmodtrim.records import Generation, StashedFile
from kmodtrim.resident.metrics import MetricsState, RestoreCounters, created_epoch, render_metrics
from kmodtrim.store import summary_of


def _file(name: str, kernel: str, size: int, kind: str = "module") -> StashedFile:
    return StashedFile(path=f"/lib/modules/{kernel}/kernel/{name}.ko", size=size,
                       sha256="0" * 64, mode=0o644, uid=0, gid=0, mtime_ns=0, kind=kind,
                       module=name, kernel=kernel)


GENERATION = Generation(
    number=3, created="2026-12-01T10:00:00+0000", action="apply", description="trim",
    removed=(_file("a", "6.1.0-27-amd64", 1000), _file("b", "6.1.0-27-amd64", 500),
             _file("c", "6.1.0-28-amd64", 250),
             _file("fw", "6.1.0-28-amd64", 50, kind="firmware")))


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_metrics_per_kernel_and_totals() -> None:
    text = render_metrics(MetricsState(summary_of(GENERATION), stash_bytes=300, boots=4,
                                       last_trim=created_epoch(GENERATION.created),
                                       counters=RestoreCounters(self_heal=2, on_demand=1,
                                                                by_hand=5)))
    assert samples(text) == {
        "kmodtrim_generation": "3",
        "kmodtrim_removed_bytes": "1800",
        "kmodtrim_stash_bytes": "300",
        "kmodtrim_freed_bytes": "1500",
        'kmodtrim_trimmed_modules{kernel="6.1.0-27-amd64"}': "2",
        'kmodtrim_trimmed_modules{kernel="6.1.0-28-amd64"}': "1",
        'kmodtrim_trimmed_bytes{kernel="6.1.0-27-amd64"}': "1500",
        'kmodtrim_trimmed_bytes{kernel="6.1.0-28-amd64"}': "300",
        "kmodtrim_last_trim_timestamp_seconds": "1796119200",
        "kmodtrim_observation_boots": "4",
        "kmodtrim_self_heal_restores_total": "2",
        "kmodtrim_on_demand_restores_total": "1",
        "kmodtrim_restores_by_hand_total": "5",
    }
    assert "# TYPE kmodtrim_self_heal_restores_total counter" in text
    assert not any('module="' in line for line in text.splitlines())


def test_an_untrimmed_root_reports_zeroes() -> None:
    untrimmed = Generation(number=0, created="", action="untrimmed", description="")
    values = samples(render_metrics(MetricsState(summary_of(untrimmed), 0, 0,
                                                 created_epoch(untrimmed.created))))
    assert values["kmodtrim_last_trim_timestamp_seconds"] == "0"
    assert values["kmodtrim_freed_bytes"] == "0"
    assert not any(k.startswith("kmodtrim_trimmed_modules") for k in values)
