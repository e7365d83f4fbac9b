"""The files that install kmodtrimd into a system: the systemd unit, the D-Bus bus policy,
activation file and interface description, the polkit actions and the tmpfiles.d entry --
checked with the real tools that consume them (systemd-analyze, dbus-daemon,
systemd-tmpfiles, xmllint)."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dbusfixture import bus_config
from kmodtrim.dbus import api
from need import need

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
SERVICE = UNITS / "kmodtrimd.service"
BUS_POLICY = UNITS / "org.kmodtrim.KmodTrim1.conf"
ACTIVATION = UNITS / "org.kmodtrim.KmodTrim1.service"
POLKIT = UNITS / "org.kmodtrim.policy"
TMPFILES = UNITS / "kmodtrim.tmpfiles"
CONTRACT = UNITS / "org.kmodtrim.KmodTrim1.xml"

BUS_NAME = "org.kmodtrim.KmodTrim1"
OBJECT_PATH = "/org/kmodtrim/KmodTrim1"
MANAGER = "org.kmodtrim.KmodTrim1.Manager"
JOB = "org.kmodtrim.KmodTrim1.Job"
# The D-Bus contract's table says which methods are open to everyone.
READ_ONLY_METHODS = {m.name for m in api.MANAGER.methods if m.read_only}
MUTATING_METHODS = {m.name for m in api.MANAGER.methods if not m.read_only}
NOBODY = 65534

# Measured with systemd 252: 3.5 ("OK"); 3.0 before restores from the package archive
# needed IP for apt's downloader. A change that loosens the sandbox fails here; one that
# tightens it should lower this number.
MAX_EXPOSURE = 3.5

C_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "SYSTEMD_COLORS": "0"}


def unit_settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value assigned in the unit file, in order."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


# --- systemd unit --------------------------------------------------------------------


def _verify_root(tmp_path: Path, with_daemon: bool = True) -> Path:
    """A scratch root for `systemd-analyze verify --root=`: the unit, a stand-in
    /usr/bin/kmodtrimd (verify checks that ExecStart= is executable, inside the root) and
    the few units the service's implicit dependencies name, so nothing is read from the
    host's /usr/bin or unit directories."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(SERVICE, root / "etc/systemd/system" / SERVICE.name)
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for target in ("sysinit.target", "basic.target", "shutdown.target", "local-fs.target",
                   "multi-user.target"):
        (units / target).write_text("[Unit]\nDescription=stand-in\n")
    (units / "dbus.socket").write_text("[Socket]\nListenStream=/run/dbus/system_bus_socket\n")
    if with_daemon:
        daemon = root / "usr/bin/kmodtrimd"
        daemon.parent.mkdir(parents=True)
        daemon.write_text("#!/bin/sh\nexit 0\n")
        daemon.chmod(0o755)
    return root


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", "--generators=no",
         SERVICE.name], capture_output=True, text=True, env=C_ENV, timeout=60, check=False)


def test_service_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    need("systemd-analyze")
    proc = _verify(_verify_root(tmp_path))
    # verify only warns (exit 0) about unknown keys and bad values: demand silence.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""


def test_verify_would_notice_a_missing_daemon_binary(tmp_path: Path) -> None:
    # Proves the check above looks at ExecStart= inside the scratch root.
    need("systemd-analyze")
    proc = _verify(_verify_root(tmp_path, with_daemon=False))
    assert proc.returncode != 0
    assert "/usr/bin/kmodtrimd" in proc.stderr


def test_service_sandbox_exposure_stays_at_or_below_measured_level() -> None:
    need("systemd-analyze")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(SERVICE)],
                          capture_output=True, text=True, env=C_ENV, timeout=60, check=False)
    match = re.search(r"Overall exposure level for kmodtrimd\.service: (\d+\.\d+)",
                      proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_service_is_a_dbus_service_with_watchdog_and_restart() -> None:
    s = unit_settings(SERVICE)
    assert s[("Service", "Type")] == ["dbus"]
    assert s[("Service", "BusName")] == [BUS_NAME]
    assert s[("Service", "ExecStart")] == ["/usr/bin/kmodtrimd"]
    assert s[("Service", "Restart")] == ["on-failure"]
    assert s[("Service", "WatchdogSec")]
    assert s[("Service", "NotifyAccess")] == ["main"]
    assert ("Install", "WantedBy") in s


def test_service_can_write_every_path_the_daemon_writes_and_nothing_else() -> None:
    s = unit_settings(SERVICE)
    assert s[("Service", "ProtectSystem")] == ["strict"]
    writable = {p.lstrip("-") for v in s[("Service", "ReadWritePaths")] for p in v.split()}
    for path in ("/lib/modules", "/usr/lib/modules", "/lib/firmware", "/boot",
                 "/etc/dpkg/dpkg.cfg.d", "/etc/rpm", "/etc/modprobe.d", "/var/lib/dpkg",
                 "/var/lib/rpm"):
        assert path in writable, f"{path} is not writable for kmodtrimd"
    assert "/etc" not in writable and "/" not in writable and "/usr" not in writable
    assert not any(p.startswith("/etc/kmodtrim") for p in writable)
    # State and cache come from systemd; the configuration stays the administrator's.
    assert s[("Service", "StateDirectory")] == ["kmodtrim"]
    assert s[("Service", "CacheDirectory")] == ["kmodtrim"]
    assert ("Service", "ConfigurationDirectory") not in s


def test_service_keeps_what_a_module_writing_daemon_needs() -> None:
    s = unit_settings(SERVICE)
    assert ("Service", "ProtectKernelModules") not in s
    caps = set(" ".join(s[("Service", "CapabilityBoundingSet")]).split())
    assert "CAP_SYS_MODULE" in caps
    assert not caps & {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO"}
    # IP only for the package manager's downloader (restores from the archive).
    assert s[("Service", "RestrictAddressFamilies")] == ["AF_UNIX AF_NETLINK AF_INET AF_INET6"]
    assert ("Service", "IPAddressAllow") not in s
    assert ("Service", "PrivateNetwork") not in s  # hides /sys/class/net, see the unit


# --- D-Bus bus policy and activation ------------------------------------------------


@dataclass(frozen=True)
class Bus:
    address: str



# Owns the name as root and answers every method call sent to it with "ok MEMBER", so a
# test sees whether the bus let a call through (authorisation proper is the daemon's).
RESPONDER = """
import asyncio, sys
from dbus_next.aio import MessageBus
from dbus_next import Message, MessageType

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    def answer(msg):
        if msg.message_type == MessageType.METHOD_CALL and msg.destination == sys.argv[2]:
            return Message.new_method_return(msg, "s", ["ok " + msg.member])
        if msg.message_type == MessageType.SIGNAL and msg.interface == "org.example.Test":
            print("signal " + msg.member, flush=True)
        return None
    bus.add_message_handler(answer)
    await bus.request_name(sys.argv[2])
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                           body=["type='signal',interface='org.example.Test'"]))
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


def _read_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"{proc.args!r} printed nothing within {timeout} s")
    return proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=5)  # also closes the pipes
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A private dbus-daemon configured like the system bus, with kmodtrim's policy."""
    need("dbus-daemon", "dbus-send", root=True)  # the policy is checked for root and another uid
    base = tmp_path_factory.mktemp("bus")
    servicedir = base / "system-services"
    servicedir.mkdir()
    shutil.copy(ACTIVATION, servicedir / ACTIVATION.name)
    config = base / "system.conf"
    # Abstract socket: reachable by the unprivileged test uid without opening up tmp dirs.
    config.write_text(bus_config(f"kmodtrim-test-{os.getpid()}-{id(base)}",
                                 f"<servicedir>{servicedir}</servicedir>"))
    daemon = subprocess.Popen(
        ["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile",
         "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = _read_line(daemon)
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        yield Bus(address)
    finally:
        _stop(daemon)


@pytest.fixture(scope="module")
def responder(bus: Bus) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", RESPONDER, bus.address, BUS_NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _read_line(proc) == "ready"
        yield proc
    finally:
        _stop(proc)


def dbus_send(bus: Bus, *args: str, uid: int = 0,
              dest: str = BUS_NAME) -> subprocess.CompletedProcess[str]:
    argv = ["dbus-send", f"--bus={bus.address}", "--print-reply", "--reply-timeout=5000",
            f"--dest={dest}", *args]
    if uid != 0:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, env=C_ENV, timeout=30,
                          check=False)


def denied(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode != 0 and "org.freedesktop.DBus.Error.AccessDenied" in proc.stderr


def request_name(bus: Bus, uid: int) -> subprocess.CompletedProcess[str]:
    return dbus_send(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus.RequestName",
                     f"string:{BUS_NAME}", "uint32:4", uid=uid, dest="org.freedesktop.DBus")


def test_bus_policy_lets_only_root_own_the_name(bus: Bus) -> None:
    need("setpriv")
    as_nobody = request_name(bus, NOBODY)
    assert denied(as_nobody), as_nobody.stdout + as_nobody.stderr
    as_root = request_name(bus, 0)
    # 1: primary owner (the connection closes right after, releasing the name again).
    assert as_root.returncode == 0, as_root.stderr
    assert "uint32 1" in as_root.stdout


@pytest.mark.usefixtures("responder")
@pytest.mark.parametrize(("path", "member", "args"), [
    (OBJECT_PATH, "org.freedesktop.DBus.Introspectable.Introspect", ()),
    (OBJECT_PATH, "org.freedesktop.DBus.Peer.Ping", ()),
    (OBJECT_PATH, "org.freedesktop.DBus.Properties.Get", (f"string:{MANAGER}",
                                                          "string:Version")),
    (OBJECT_PATH, "org.freedesktop.DBus.Properties.GetAll", (f"string:{MANAGER}",)),
    *[(OBJECT_PATH, f"{MANAGER}.{m}", ()) for m in sorted(READ_ONLY_METHODS)],
    # Let through on purpose: the daemon authorises these (uid 0 or polkit).
    *[(OBJECT_PATH, f"{MANAGER}.{m}", ()) for m in sorted(MUTATING_METHODS)],
    (f"{OBJECT_PATH}/job/1", f"{JOB}.Cancel", ()),
])
def test_bus_policy_lets_everyone_reach_the_daemon(bus: Bus, path: str, member: str,
                                                   args: tuple[str, ...]) -> None:
    need("setpriv")
    proc = dbus_send(bus, path, member, *args, uid=NOBODY)
    assert proc.returncode == 0, proc.stderr
    assert f'"ok {member.rsplit(".", 1)[1]}"' in proc.stdout


@pytest.mark.usefixtures("responder")
@pytest.mark.parametrize(("member", "args"), [
    ("org.freedesktop.DBus.Properties.Set",
     (f"string:{MANAGER}", "string:State", "variant:string:idle")),
    (f"{MANAGER}.SomethingNotInThePolicy", ()),
    (f"{JOB}.Restart", ()),
    ("org.example.Other.Trim", ()),
])
def test_bus_policy_refuses_other_calls_from_non_root(bus: Bus, member: str,
                                                      args: tuple[str, ...]) -> None:
    need("setpriv")
    assert denied(dbus_send(bus, OBJECT_PATH, member, *args, uid=NOBODY))
    as_root = dbus_send(bus, OBJECT_PATH, member, *args)
    assert as_root.returncode == 0, as_root.stderr  # root reaches everything


def test_bus_policy_lets_broadcast_signals_from_anyone_reach_the_daemon(
        bus: Bus, responder: subprocess.Popen[str]) -> None:
    # A <deny send_destination=...> rule in the default context would also drop every
    # broadcast signal a non-root sender emits before it reaches the daemon.
    need("setpriv")
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "dbus-send", f"--bus={bus.address}", "--type=signal", "/org/example/Test",
            "org.example.Test.Hello"]
    subprocess.run(argv, env=C_ENV, timeout=30, check=True)
    assert _read_line(responder, timeout=5) == "signal Hello"


def test_bus_accepts_the_activation_file(bus: Bus) -> None:
    # A system bus only lists a service whose file is named after the bus name and has
    # User=; the daemon itself is started by systemd (SystemdService=).
    proc = dbus_send(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus.ListActivatableNames",
                     dest="org.freedesktop.DBus")
    assert proc.returncode == 0, proc.stderr
    assert f'string "{BUS_NAME}"' in proc.stdout
    activation = unit_settings(ACTIVATION)
    assert activation[("D-BUS Service", "SystemdService")] == [SERVICE.name]
    assert activation[("D-BUS Service", "Exec")] == ["/bin/false"]


def _policy_members(context: str) -> dict[str, set[str]]:
    """Interface -> members the bus policy's <policy context=...> allows sending."""
    allowed: dict[str, set[str]] = {}
    for policy in ET.parse(BUS_POLICY).getroot().iter("policy"):
        if policy.get("context") != context:
            continue
        for rule in policy.iter("allow"):
            iface = rule.get("send_interface")
            if rule.get("send_destination") == BUS_NAME and iface:
                allowed.setdefault(iface, set()).add(rule.get("send_member") or "*")
    return allowed


def test_bus_policy_lists_exactly_the_methods_the_daemon_exports() -> None:
    # A method added to the daemon but not to the policy is unreachable for non-root
    # callers (polkit never gets asked); one removed from the daemon leaves a stale rule.
    from dbus_next.service import ServiceInterface

    from kmodtrim.dbus import interfaces as service

    def exported(cls: Any, name: str) -> set[str]:
        # Without the daemon behind it: only the class's @method declarations matter.
        iface = object.__new__(cls)
        ServiceInterface.__init__(iface, name)
        return {m.name for m in iface.introspect().methods}

    allowed = _policy_members("default")
    assert exported(service.ManagerInterface, MANAGER) == allowed[MANAGER]
    assert exported(service.JobInterface, JOB) == allowed[JOB]
    assert allowed[MANAGER] == READ_ONLY_METHODS | MUTATING_METHODS
    assert allowed[JOB] == {m.name for m in api.JOB.methods}
    assert allowed["org.freedesktop.DBus.Properties"] == {"Get", "GetAll"}


# --- polkit --------------------------------------------------------------------------

# The structure polkit(8) documents for .policy files.
POLKIT_DTD = """<!ELEMENT policyconfig (vendor?, vendor_url?, icon_name?, action*)>
<!ELEMENT action (description+, message+, vendor?, vendor_url?, icon_name?, defaults?,
                  annotate*)>
<!ATTLIST action id CDATA #REQUIRED>
<!ELEMENT description (#PCDATA)>
<!ATTLIST description xml:lang CDATA #IMPLIED gettext-domain CDATA #IMPLIED>
<!ELEMENT message (#PCDATA)>
<!ATTLIST message xml:lang CDATA #IMPLIED gettext-domain CDATA #IMPLIED>
<!ELEMENT vendor (#PCDATA)>
<!ELEMENT vendor_url (#PCDATA)>
<!ELEMENT icon_name (#PCDATA)>
<!ELEMENT defaults (allow_any?, allow_inactive?, allow_active?)>
<!ELEMENT allow_any (#PCDATA)>
<!ELEMENT allow_inactive (#PCDATA)>
<!ELEMENT allow_active (#PCDATA)>
<!ELEMENT annotate (#PCDATA)>
<!ATTLIST annotate key CDATA #REQUIRED>
"""


def test_polkit_actions_are_valid_against_polkit_structure(tmp_path: Path) -> None:
    need("xmllint")
    dtd = tmp_path / "policyconfig.dtd"
    dtd.write_text(POLKIT_DTD)
    proc = subprocess.run(["xmllint", "--noout", "--nonet", "--dtdvalid", str(dtd),
                           str(POLKIT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_polkit_declares_the_four_actions_admin_only() -> None:
    root = ET.parse(POLKIT).getroot()
    actions = {a.get("id"): a for a in root.iter("action")}
    assert set(actions) == {"org.kmodtrim.trim", "org.kmodtrim.restore",
                            "org.kmodtrim.rollback", "org.kmodtrim.configure"}
    for action_id, action in actions.items():
        assert (action.findtext("description") or "").strip(), action_id
        assert (action.findtext("message") or "").strip(), action_id
        found = action.find("defaults")
        assert found is not None, action_id
        defaults = {d.tag: (d.text or "").strip() for d in found}
        assert defaults == {"allow_any": "no", "allow_inactive": "no",
                            "allow_active": "auth_admin_keep"}, action_id


def test_xml_files_are_well_formed() -> None:
    for path in (POLKIT, BUS_POLICY, CONTRACT):
        ET.parse(path)  # raises ParseError


# The D-Bus specification's introspect.dtd (with annotations on arguments, as GDBus reads).
INTROSPECT_DTD = """<!ELEMENT node (node|interface|annotation)*>
<!ATTLIST node name CDATA #IMPLIED>
<!ELEMENT interface (method|signal|property|annotation)*>
<!ATTLIST interface name CDATA #REQUIRED>
<!ELEMENT method (arg|annotation)*>
<!ATTLIST method name CDATA #REQUIRED>
<!ELEMENT signal (arg|annotation)*>
<!ATTLIST signal name CDATA #REQUIRED>
<!ELEMENT arg (annotation)*>
<!ATTLIST arg name CDATA #IMPLIED type CDATA #REQUIRED direction (in|out) #IMPLIED>
<!ELEMENT property (annotation)*>
<!ATTLIST property name CDATA #REQUIRED type CDATA #REQUIRED
                   access (read|write|readwrite) #REQUIRED>
<!ELEMENT annotation EMPTY>
<!ATTLIST annotation name CDATA #REQUIRED value CDATA #REQUIRED>
"""


def test_dbus_interface_file_is_valid_introspection_xml(tmp_path: Path) -> None:
    need("xmllint")
    dtd = tmp_path / "introspect.dtd"
    dtd.write_text(INTROSPECT_DTD)
    proc = subprocess.run(["xmllint", "--noout", "--nonet", "--dtdvalid", str(dtd),
                           str(CONTRACT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    interfaces = {i.get("name") for i in ET.parse(CONTRACT).getroot().iter("interface")}
    assert interfaces == {MANAGER, JOB}


# --- tmpfiles.d ----------------------------------------------------------------------


def test_tmpfiles_creates_state_and_cache_directories(tmp_path: Path) -> None:
    need("systemd-tmpfiles")
    need(root=True)  # the entries chown to root
    proc = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                           str(TMPFILES)], capture_output=True, text=True, env=C_ENV,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    for rel, mode in (("var/lib/kmodtrim", 0o700), ("var/cache/kmodtrim", 0o755)):
        st = (tmp_path / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 0, 0), rel
