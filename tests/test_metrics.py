"""kmodtrimd's textfile metrics, scraped from a real prometheus-node-exporter listening on
the loopback address: written at start-up, and again after a self-heal and a requested
restore (counted apart), atomically (node_exporter reports no scrape error)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dbusfixture import PrivateBus, private_bus
from kmodtrim.daemon import start
from kmodtrim.executor import Options, apply_plan
from kmodtrim.operations import Target, make_plan_for
from kmodtrim.resident.jobs import Request
from kmodtrim.store import record_observation
from need import need
from test_daemon import BOOT_ID, DEVICE_ADD, KVER, _wait_for, root

__all__ = ["private_bus", "root"]  # fixtures, re-exported for pytest

NODE_EXPORTER = "prometheus-node-exporter"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def node_exporter(textfiles: Path) -> Iterator[str]:
    """prometheus-node-exporter with only its textfile collector, on 127.0.0.1; yields the
    metrics URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
         f"--collector.textfile.directory={textfiles}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "node_exporter did not answer"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(("kmodtrim_", "node_textfile_scrape_error")):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def test_node_exporter_serves_the_daemons_metrics_after_start_and_each_job(
        private_bus: PrivateBus, root: Path, tmp_path: Path) -> None:
    need(NODE_EXPORTER)
    record_observation(root, BOOT_ID, ["core", "fs_b"])
    result = make_plan_for(Target(root=root, kernel=KVER))
    apply_plan(root, result.plan, result.index, result.evidence, result.policy,
               Options(initramfs="skip"))
    textfiles = tmp_path / "textfile"  # the daemon makes it when told to write there

    async def scenario() -> tuple[dict[str, float], dict[str, float]]:
        daemon, connection = await start(root, "system", observe=True, metrics=textfiles)
        try:
            with node_exporter(textfiles) as url:
                at_start = scrape(url)
                daemon.handle_uevent(DEVICE_ADD)  # self-heal: nic_x comes back
                await _wait_for(lambda: daemon.current_generation == 2)
                await _wait_for(lambda: daemon.job is None)
                job, _ = daemon.restore(["unused_c"], Request(kernel=KVER))
                await job.finished.wait()
                assert job.result == "done", job.error_message
                await _wait_for(lambda: daemon.state == "idle")
                await asyncio.sleep(0.2)  # the job's last signals reach the bus
                return at_start, scrape(url)
        finally:
            daemon.close()
            connection.disconnect()

    at_start, after = asyncio.run(scenario())
    assert at_start["node_textfile_scrape_error"] == 0
    assert at_start["kmodtrim_generation"] == 1
    # nic_x, nic_lib, unused_c
    assert at_start['kmodtrim_trimmed_modules{kernel="6.1.0-test"}'] == 3
    assert at_start["kmodtrim_removed_bytes"] > 0
    assert at_start["kmodtrim_freed_bytes"] == \
        at_start["kmodtrim_removed_bytes"] - at_start["kmodtrim_stash_bytes"]
    assert at_start["kmodtrim_observation_boots"] == 1
    assert at_start["kmodtrim_last_trim_timestamp_seconds"] > time.time() - 600
    assert (at_start["kmodtrim_self_heal_restores_total"],
            at_start["kmodtrim_on_demand_restores_total"],
            at_start["kmodtrim_restores_by_hand_total"]) == (0, 0, 0)
    assert after["node_textfile_scrape_error"] == 0
    assert after["kmodtrim_generation"] == 3
    # The Restore of unused_c is by hand (no on_demand option): not an on-demand one.
    assert (after["kmodtrim_self_heal_restores_total"],
            after["kmodtrim_on_demand_restores_total"],
            after["kmodtrim_restores_by_hand_total"]) == (1, 0, 1)
    assert 'kmodtrim_trimmed_modules{kernel="6.1.0-test"}' not in after  # all back
    assert after["kmodtrim_last_trim_timestamp_seconds"] == \
        at_start["kmodtrim_last_trim_timestamp_seconds"]  # restores are not trims
    assert not any("module=" in key for key in after)
    assert [p.name for p in textfiles.iterdir()] == ["kmodtrim.prom"]  # no temporaries
