"""kmodtrimd itself: start-up snapshot, uevent observation, self-healing, the live uevent
socket, sd_notify and stopping. The daemon runs in-process on a real private bus where a
test injects recorded kernel uevents through ``Daemon.handle_uevent`` (the code path the
netlink socket feeds), and as a subprocess where signals and sd_notify are the subject.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.message import Message

from dbusfixture import PrivateBus, private_bus, running_daemon
from kmodtrim.daemon import start
from kmodtrim.dbus import BUS_NAME, MANAGER_INTERFACE
from kmodtrim.dbus.client import daemon_running
from kmodtrim.dbus.service import DaemonConnection
from kmodtrim.executor import Options, apply_plan
from kmodtrim.operations import Target, make_plan_for
from kmodtrim.resident.core import Daemon
from kmodtrim.resident.watch import open_uevent_socket
from kmodtrim.store import current_generation, read_observations, record_observation
from modbuild import ModSpec, scratch_root

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

KVER = "6.1.0-test"
NIC_ALIAS = "pci:v0000ABCDd00001234sv*sd*bc02sc00i*"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("fs_b", aliases=("fs-testfs",)),
    ModSpec("nic_lib", exports=("nic_fn",)),
    ModSpec("nic_x", imports=("nic_fn",), depends=("nic_lib",), aliases=(NIC_ALIAS,)),
    ModSpec("unused_c", imports=("core_fn",), depends=("core",)),
)
POLICY = "presets = []\nclouds = []\nrules = []\n[min_observation]\nboots = 1\ndays = 0\n"
BOOT_ID = "5b7a6f36-3c7e-4a51-9d63-1f1e2f0e1a01"
# Recorded from a bookworm VM (udevadm monitor --kernel --property), as the kernel sends
# them: "ACTION@DEVPATH" then NUL-separated KEY=VALUE pairs.
MODULE_ADD = (b"add@/module/fs_b\0ACTION=add\0DEVPATH=/module/fs_b\0SUBSYSTEM=module\0"
              b"SEQNUM=2411\0")
DEVICE_ADD = (b"add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0"
              b"DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0"
              b"PCI_CLASS=20000\0PCI_ID=ABCD:1234\0PCI_SUBSYS_ID=1AF4:0001\0"
              b"PCI_SLOT_NAME=0000:00:05.0\0"
              b"MODALIAS=pci:v0000ABCDd00001234sv00001AF4sd00000001bc02sc00i00\0SEQNUM=2412\0")
UNMATCHED_DEVICE_ADD = DEVICE_ADD.replace(b"ABCD", b"EEEE")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
    (root / "proc/modules").write_text(
        "core 16384 1 - Live 0x0000000000000000\n")
    return root


def _module(root: Path, name: str) -> Path:
    return root / f"lib/modules/{KVER}/kernel/drivers/test/{name}.ko"


@asynccontextmanager
async def _serving(root: Path) -> AsyncIterator[tuple[Daemon, DaemonConnection]]:
    daemon, connection = await start(root, "system", observe=True)
    try:
        yield daemon, connection
    finally:
        connection.disconnect()


async def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------


def test_startup_snapshot_and_module_uevents_are_recorded_as_observed(
    private_bus: PrivateBus, root: Path
) -> None:
    async def scenario() -> None:
        async with _serving(root) as (daemon, _):
            assert read_observations(root)[BOOT_ID]["modules"] == ["core"]
            assert daemon.observed_since > 0
            daemon.handle_uevent(MODULE_ADD)
            daemon.handle_uevent(b"libudev\0not a kernel event")  # ignored
            daemon.handle_uevent(b"\xff\xfe garbage")  # ignored
            await _wait_for(lambda: "fs_b" in read_observations(root)[BOOT_ID]["modules"])

    asyncio.run(scenario())
    assert read_observations(root)[BOOT_ID]["modules"] == ["core", "fs_b"]


def test_uevents_that_arrive_during_start_up_are_handled_once_it_is_done(
    private_bus: PrivateBus, root: Path
) -> None:
    """The uevent socket opens before start-up's work (which runs in worker processes):
    what arrives meanwhile waits for it, then counts for this boot."""
    async def scenario() -> None:
        daemon = Daemon(root)
        daemon.handle_uevent(MODULE_ADD)
        await asyncio.sleep(0.2)
        assert read_observations(root) == {}  # start-up has not said which boot this is
        await asyncio.to_thread(daemon.load)
        await daemon.started()
        await _wait_for(lambda: "fs_b" in read_observations(root)[BOOT_ID]["modules"])

    asyncio.run(scenario())


def test_trimmed_module_restored_when_device_appears(
    private_bus: PrivateBus, root: Path
) -> None:
    record_observation(root, BOOT_ID, ["core", "fs_b"])  # one boot: the policy's minimum
    result = make_plan_for(Target(root=root, kernel=KVER))
    apply_plan(root, result.plan, result.index, result.evidence, result.policy,
               Options(initramfs="skip"))
    assert not _module(root, "nic_x").exists() and not _module(root, "nic_lib").exists()
    assert current_generation(root).number == 1

    async def scenario() -> list[list[object]]:
        async with _serving(root) as (daemon, _):
            listener: Any = await MessageBus(bus_address=private_bus.address).connect()
            restored: list[list[object]] = []
            listener.add_message_handler(
                lambda m: restored.append(m.body) if m.member == "ModuleRestored" else None)
            await listener.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                body=[f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}'"]))
            daemon.handle_uevent(UNMATCHED_DEVICE_ADD)  # no trimmed driver: nothing to do
            daemon.handle_uevent(DEVICE_ADD)
            await _wait_for(lambda: bool(restored))
            listener.disconnect()
            return restored

    restored = asyncio.run(scenario())
    assert restored == [["nic_x", DEVICE_ADD.split(b"MODALIAS=")[1].split(b"\0")[0].decode(), 2]]
    assert _module(root, "nic_x").exists() and _module(root, "nic_lib").exists()
    assert not _module(root, "unused_c").exists()  # only what the device needs came back
    dep = (root / f"lib/modules/{KVER}/modules.dep").read_text()
    assert "kernel/drivers/test/nic_x.ko: kernel/drivers/test/nic_lib.ko" in dep
    generation = current_generation(root)
    assert generation.number == 2 and generation.action == "restore"
    # From now on the driver counts as observed: a re-plan keeps it.
    assert "nic_x" in read_observations(root)[BOOT_ID]["modules"]
    replan = make_plan_for(Target(root=root, kernel=KVER)).plan
    assert "nic_x" in {m.name for m in replan.keep}


def test_device_uevent_without_trimmed_driver_starts_no_job(
    private_bus: PrivateBus, root: Path
) -> None:
    async def scenario() -> None:
        async with _serving(root) as (daemon, _):
            daemon.handle_uevent(DEVICE_ADD)  # nothing is trimmed: nic_x is in the tree
            await asyncio.sleep(0.2)
            assert daemon.job is None and daemon.current_generation == 0

    asyncio.run(scenario())
    assert current_generation(root).number == 0


def test_live_uevent_socket_is_read_by_the_event_loop(tmp_path: Path) -> None:
    try:
        open_uevent_socket().close()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT,
                         errno.EAFNOSUPPORT):
            pytest.skip(f"the kernel refuses a NETLINK_KOBJECT_UEVENT socket here: {exc}")
        raise

    async def scenario() -> None:
        daemon = Daemon(tmp_path)
        assert daemon.start_uevent_listener()
        sock = daemon.watch.socket
        assert sock is not None and sock.family == socket.AF_NETLINK
        assert sock.getsockname()[1] == 1  # the kernel's multicast group
        # The loop watches the socket (the only thing that wakes an idle daemon).
        loop = asyncio.get_running_loop()
        assert loop.remove_reader(sock.fileno())
        loop.add_reader(sock.fileno(), daemon.watch.read, sock)
        daemon.close()

    asyncio.run(scenario())


def test_daemon_notifies_ready_and_stops_cleanly_on_sigterm(
    private_bus: PrivateBus, root: Path, tmp_path: Path
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    with running_daemon(private_bus, root, "--no-observe", env=env) as proc:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any("STATUS=idle (generation 0)" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        stopping = notify.recv(4096).decode()
        assert "STOPPING=1" in stopping
    assert not daemon_running(private_bus.address)
    # --no-observe: the start-up snapshot was not recorded.
    assert read_observations(root) == {}


def test_second_daemon_refuses_to_start_while_the_name_is_owned(
    private_bus: PrivateBus, root: Path
) -> None:
    with running_daemon(private_bus, root, "--no-observe"):
        proc = subprocess.run(
            [sys.executable, "-m", "kmodtrim.daemon", "--root", str(root), "--no-observe"],
            env=private_bus.env(), capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 1
        assert "already owned" in proc.stderr


def test_unprivileged_process_cannot_own_the_name(private_bus: PrivateBus) -> None:
    # The bus policy refuses the name before the daemon would read anything under the root
    # (any directory nobody can read will do; the daemon writes only after owning it).
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "kmodtrim.daemon", "--root", "/usr/share", "--no-observe"],
        env={**private_bus.env(), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "cannot own org.kmodtrim.KmodTrim1" in proc.stderr
    assert "AccessDenied" in proc.stderr or "not allowed" in proc.stderr



def test_auto_mode_trims_once_the_minimum_observation_is_met(
    private_bus: PrivateBus, root: Path
) -> None:
    (root / "etc/kmodtrim/policy.toml").write_text('mode = "auto"\n' + POLICY)

    async def scenario() -> None:
        async with _serving(root) as (daemon, _):
            # Start-up recorded this boot (/proc/modules: core): one boot is the minimum.
            await _wait_for(lambda: daemon.job is None and daemon.current_generation == 1)

    asyncio.run(scenario())
    assert _module(root, "core").exists()
    assert not _module(root, "unused_c").exists() and not _module(root, "nic_x").exists()
    assert current_generation(root).action == "apply"


def test_manual_mode_never_trims_by_itself(private_bus: PrivateBus, root: Path) -> None:
    async def scenario() -> None:
        async with _serving(root) as (daemon, _):
            daemon.handle_uevent(MODULE_ADD)
            await asyncio.sleep(0.5)
            assert daemon.job is None

    asyncio.run(scenario())
    assert current_generation(root).number == 0 and _module(root, "unused_c").exists()
