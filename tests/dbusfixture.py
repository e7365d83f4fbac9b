"""A private, system-bus-like dbus-daemon for tests, and kmodtrimd running on it.

The bus is a real ``dbus-daemon --nofork --print-address`` with a configuration modelled on
Debian's system.conf (EXTERNAL auth; by default nobody may own names or send method calls,
signals and replies may flow) that includes the project's own bus policy,
units/org.kmodtrim.KmodTrim1.conf. It listens on an abstract socket so that a test can
also call it as an unprivileged user (tmp_path's parents are not searchable by them).

kmodtrimd runs as a subprocess with ``DBUS_SYSTEM_BUS_ADDRESS`` pointing at the bus, so it
connects exactly as it does to the real system bus.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kmodtrim.dbus.client import daemon_running, manager_properties
from need import need

__all__ = ["BUS_POLICY", "PrivateBus", "private_bus", "running_daemon", "running_polkitd",
           "start_private_bus"]

REPO = Path(__file__).resolve().parent.parent
BUS_POLICY = REPO / "units" / "org.kmodtrim.KmodTrim1.conf"

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:abstract={abstract}</listen>
  {extra}
  <!-- The defaults of the real system bus (system.conf): deny method calls and owning
       unless a service's own policy allows them. -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def bus_config(abstract: str, extra: str = "") -> str:
    """A dbus-daemon configuration like the real system bus's that includes the project's
    own bus policy. ``extra`` is more configuration (e.g. a ``<servicedir>``)."""
    return CONFIG.format(abstract=abstract, extra=extra, policy=BUS_POLICY)


@dataclass(frozen=True)
class PrivateBus:
    address: str
    config: Path
    pid: int

    def env(self) -> dict[str, str]:
        """This process's environment with the private bus as the system bus."""
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}


@contextmanager
def start_private_bus(directory: Path, extra: str = "") -> Iterator[PrivateBus]:
    """Run a private system-like dbus-daemon (config in ``directory``) while in the block;
    ``extra`` is more bus configuration (see bus_config)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "bus.conf"
    config.write_text(bus_config(f"kmodtrim-test-{uuid.uuid4().hex}", extra))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--print-address", "--nofork"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"dbus-daemon did not start: {err}")
    try:
        yield PrivateBus(address, config, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def private_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    """A private system bus; DBUS_SYSTEM_BUS_ADDRESS points at it for the test."""
    with start_private_bus(tmp_path / "bus") as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        yield bus


@contextmanager
def running_daemon(bus: PrivateBus, root: Path, *args: str,
                   env: dict[str, str] | None = None,
                   timeout: float = 20.0) -> Iterator[subprocess.Popen[str]]:
    """kmodtrimd on ``bus`` serving ``root``, started and idle (its start-up done)."""
    log = root.parent / f"kmodtrimd-{uuid.uuid4().hex[:8]}.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmodtrim.daemon", "--root", str(root), *args],
            env={**bus.env(), **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kmodtrimd exited {proc.returncode}:\n{log.read_text()}")
            if daemon_running(bus.address) and \
                    manager_properties(bus_address=bus.address)["State"] == "idle":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"kmodtrimd did not get ready:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        _stop(proc, 30)


def _stop(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# A real polkit authority on the private bus

POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_NAME = "org.freedesktop.PolicyKit1"
# What Debian's org.freedesktop.PolicyKit1.conf grants on the system bus: polkitd (which
# changes to its own user before it connects) owns the name, and kmodtrimd (root) may call
# it. A user policy, because ``extra`` comes before the default context's denials.
POLKIT_BUS_RULES = f"""<policy user="polkitd"><allow own="{POLKIT_NAME}"/></policy>
  <policy user="root"><allow send_destination="{POLKIT_NAME}"/></policy>"""


def _name_has_owner(bus: PrivateBus, name: str) -> bool:
    proc = subprocess.run(
        ["dbus-send", f"--bus={bus.address}", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
        capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "boolean true" in proc.stdout


@contextmanager
def running_polkitd(bus: PrivateBus, directory: Path, rules: str) -> Iterator[None]:
    """polkitd on ``bus`` (started with POLKIT_BUS_RULES as ``extra``) that knows the
    project's polkit actions (units/org.kmodtrim.policy) and the JavaScript ``rules``.

    It runs in a mount namespace of its own where tmpfs mounts hide the host's rules and
    actions directories, so nothing on this machine changes. Skips the test unless run as
    root with polkitd, dbus-send and unshare installed.
    """
    need(str(POLKITD), "unshare", "dbus-send", root=True)
    directory.mkdir(parents=True, exist_ok=True)
    rules_file = directory / "50-kmodtrim-test.rules"
    rules_file.write_text(rules)
    actions = REPO / "units" / "org.kmodtrim.policy"
    script = f"""set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 kmodtrim-test /etc/polkit-1/rules.d
mount -t tmpfs -o mode=0755 kmodtrim-test /usr/share/polkit-1/rules.d
mount -t tmpfs -o mode=0755 kmodtrim-test /usr/share/polkit-1/actions
install -m 0644 '{rules_file}' /etc/polkit-1/rules.d/
install -m 0644 '{actions}' /usr/share/polkit-1/actions/
exec '{POLKITD}' --no-debug
"""
    log = directory / "polkitd.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], env=bus.env(),
                                stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _name_has_owner(bus, POLKIT_NAME):
            if proc.poll() is not None:
                raise RuntimeError(f"polkitd exited {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"polkitd did not take its name:\n{log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        _stop(proc, 10)
