"""kmodtrimd's footprint and self-healing latency on a trimmed Debian cloud kernel.

Reports: idle RSS after start-up (target ≤ 25 MiB) and again after a restore job and a plan
(jobs and plans run in worker processes, so the daemon should not grow): once reads are
quiet (dbus/limits.py: QUIET, the plan's answer still cached), and once the answer cache
has expired (CACHE_TTL); CPU time and context switches (all threads) over an idle period
(target ~0; default 60 s), and the latency from a device uevent for a trimmed driver to
that driver back in the tree with depmod rerun (target ≤ 1 s). The daemon runs on a
private dbus-daemon standing in for the system bus.

    .venv/bin/python benchmarks/bench_daemon.py [--idle-seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OBSERVED  # first: it puts tests/ on the path

from dbusfixture import running_daemon, start_private_bus
from kernels import copy_kernel_tree, prepare_kernel
from kmodtrim.dbus.limits import CACHE_TTL, QUIET

# A virtio input device appearing (virtio_input is not in the recorded VM: trimmed).
DEVICE_ADD = (b"add@/devices/pci0000:00/0000:00:09.0/virtio5\0ACTION=add\0"
              b"DEVPATH=/devices/pci0000:00/0000:00:09.0/virtio5\0SUBSYSTEM=virtio\0"
              b"MODALIAS=virtio:d00000012v00001AF4\0SEQNUM=4242\0")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far: a
    daemon that wakes up while idle (a timer, a poll) adds to it."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread has ended
            continue
        for line in text.splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settle(pid: int, quiet: float = 2.0, limit: float = 30.0) -> None:
    """Wait until start-up's tail (its workers' answers, giving memory back) is over: no
    CPU time used for ``quiet`` seconds (at most ``limit``)."""
    started = time.monotonic()
    last, since = _cpu_seconds(pid), time.monotonic()
    while time.monotonic() - started < limit and time.monotonic() - since < quiet:
        time.sleep(0.25)
        now = _cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()


async def _heal_latency(root: Path) -> float:
    from kmodtrim.daemon import start

    daemon, connection = await start(root, "system", observe=False)
    try:
        target = next(root.glob("lib/modules/*/kernel/drivers/virtio/virtio_input.ko"), None)
        moddir = next(root.glob("lib/modules/*"))
        assert target is None, "virtio_input must be trimmed first"
        started = time.perf_counter()
        daemon.handle_uevent(DEVICE_ADD)
        path = moddir / "kernel/drivers/virtio/virtio_input.ko"
        while not (path.exists() and daemon.job is None
                   and "virtio_input.ko" in (moddir / "modules.dep").read_text()):
            await asyncio.sleep(0.005)
            if time.perf_counter() - started > 60:
                raise RuntimeError("the driver did not come back within 60 s")
        return time.perf_counter() - started
    finally:
        connection.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    pristine = prepare_kernel("cloud")
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        tree = copy_kernel_tree(pristine, scratch / "root")
        subprocess.run([sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--initramfs",
                        "skip", "--root", str(tree.root), "--kernel", tree.kver, "--symvers",
                        str(tree.symvers), "--observed", str(OBSERVED)],
                       check=True, capture_output=True)
        with start_private_bus(scratch / "bus") as bus:
            with running_daemon(bus, tree.root) as proc:
                _settle(proc.pid)
                rss = _rss_kib(proc.pid)
                cpu_before = _cpu_seconds(proc.pid)
                switches_before = _context_switches(proc.pid)
                time.sleep(args.idle_seconds)
                idle_switches = _context_switches(proc.pid) - switches_before
                idle_cpu = _cpu_seconds(proc.pid) - cpu_before
                rss_after = _rss_kib(proc.pid)
                env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
                for verb in (["restore", "sctp", "--yes", "--initramfs", "skip"],
                             ["plan"]):
                    subprocess.run([sys.executable, "-m", "kmodtrim.cli", *verb, "--root",
                                    str(tree.root)], check=True, capture_output=True, env=env)
                time.sleep(QUIET + 0.5)  # reads are quiet: the daemon gave memory back
                rss_after_jobs = _rss_kib(proc.pid)
                time.sleep(CACHE_TTL + QUIET)
                rss_after_jobs_settled = _rss_kib(proc.pid)
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
            latency = asyncio.run(_heal_latency(tree.root))
    figures = {
        "kernel": tree.kver,
        "idle_rss_mib": round(rss / 1024, 1),
        "idle_rss_mib_after_idle": round(rss_after / 1024, 1),
        "idle_rss_mib_after_jobs": round(rss_after_jobs / 1024, 1),
        "idle_rss_mib_after_jobs_settled": round(rss_after_jobs_settled / 1024, 1),
        "idle_seconds": args.idle_seconds,
        "idle_cpu_seconds": round(idle_cpu, 3),
        "idle_context_switches": idle_switches,
        "device_event_to_restored_driver_seconds": round(latency, 3),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"kmodtrimd on a trimmed {tree.kver} root (private system bus)")
        print(f"  idle RSS               {rss / 1024:6.1f} MiB (after "
              f"{args.idle_seconds:g} s idle: {rss_after / 1024:.1f} MiB)   (target ≤ 25 MiB)")
        print(f"  idle RSS after a restore job and a plan  {rss_after_jobs / 1024:6.1f} MiB "
              f"(once the answer cache expired: {rss_after_jobs_settled / 1024:.1f} MiB)")
        print(f"  CPU over {args.idle_seconds:g} s idle    {idle_cpu:6.2f} s, "
              f"{idle_switches} context switches   (target ~0)")
        print(f"  device event → driver back with depmod  {latency:5.2f} s   (target ≤ 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
