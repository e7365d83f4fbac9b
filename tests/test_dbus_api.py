"""kmodtrimd's D-Bus API, called over a real private system bus (tests/dbusfixture.py).

The daemon runs as a subprocess on scratch roots: gcc-built modules for the quick tests,
a copy of Debian's cloud kernel where a job must take long enough to be overlapped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import introspection as intr
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from dbusfixture import (
    POLKIT_BUS_RULES,
    PrivateBus,
    private_bus,
    running_daemon,
    running_polkitd,
    start_private_bus,
)
from kernels import KernelTree, copy_kernel_tree
from kmodtrim.daemon import Daemon, Job
from kmodtrim.dbus import BUS_NAME, JOB_INTERFACE, MANAGER_INTERFACE, OBJECT_PATH, client
from kmodtrim.dbus.service import JobInterface, ManagerInterface
from kmodtrim.errors import BusyError, KmodtrimError, NoSuchGenerationError
from kmodtrim.store import generation_numbers
from modbuild import ModSpec, scratch_root

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("net_a", imports=("core_fn",), depends=("core",), aliases=("pci:v00001234d*",)),
    ModSpec("unused_c", imports=("core_fn",), depends=("core",)),
    ModSpec("unused_d"),
)
POLICY = "presets = []\nrules = []\n[min_observation]\nboots = 2\ndays = 0\n"
PINNED = Path(__file__).parent / "data" / "kmodtrim1-introspection.xml"
REGENERATE = "KMODTRIM_REGENERATE_INTROSPECTION"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)


@pytest.fixture
def observed(tmp_path: Path) -> Path:
    path = tmp_path / "observed.txt"
    path.write_text("net_a\n")
    return path


@pytest.fixture
def daemon_on(private_bus: PrivateBus, root: Path) -> Iterator[PrivateBus]:
    with running_daemon(private_bus, root):
        yield private_bus


def _module(root: Path, name: str) -> Path:
    return root / f"lib/modules/{KVER}/kernel/drivers/test/{name}.ko"


def _raw_call(bus: PrivateBus, member: str, signature: str = "", body: list[Any] | None = None,
              *, path: str = OBJECT_PATH, interface: str = MANAGER_INTERFACE) -> Message:
    async def call() -> Message:
        conn: Any = await MessageBus(bus_address=bus.address).connect()
        try:
            reply: Message = await conn.call(Message(
                destination=BUS_NAME, path=path, interface=interface, member=member,
                signature=signature, body=body or []))
            return reply
        finally:
            conn.disconnect()

    return asyncio.run(call())


def _as_nobody(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the client helper ``args`` as uid/gid 65534 with no groups."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "kmodtrim.dbus.client", *args],
        capture_output=True, text=True, check=False,
        env={**bus.env(), "PYTHONDONTWRITEBYTECODE": "1"},
    )


# ---------------------------------------------------------------------------------------


def test_read_methods_and_properties_answer_as_the_cli_would(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    props = client.manager_properties()
    assert props["KernelRelease"] == KVER and props["State"] == "idle"
    assert props["CurrentGeneration"] == 0 and props["Version"]
    plan = client.plan({"observed": [observed]})
    assert plan["kernel"] == KVER
    assert sorted(m["name"] for m in plan["remove"]) == ["unused_c", "unused_d"]
    assert {m["name"] for m in plan["keep"]} == {"core", "net_a"}
    cli = subprocess.run([sys.executable, "-m", "kmodtrim.cli", "plan", "--json", "--root",
                          str(root), "--observed", str(observed)],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["remove"] == plan["remove"]
    why = client.explain("core", {"observed": [observed]})
    assert why["status"] == "kept" and "dependency of net_a" in "\n".join(why["lines"])
    assert [g["generation"] for g in client.list_generations()] == [0]
    assert client.show_generation(0)["action"] == "untrimmed"


def test_cached_read_answers_follow_the_policy_they_depend_on(
    daemon_on: PrivateBus, root: Path
) -> None:
    """Read answers are cached and shared (kmodtrim/dbus/limits.py), never across a change
    of the files they depend on: here a policy drop-in keeping a module."""
    first = client.plan({})
    assert "unused_c" in {m["name"] for m in first["remove"]}
    assert client.plan({}) == first
    assert client.explain("unused_c", {})["status"] == "removed"
    dropins = root / "etc/kmodtrim/policy.d"
    dropins.mkdir(parents=True, exist_ok=True)
    (dropins / "50-keep.toml").write_text('rules = ["unused_c"]\n')
    assert "unused_c" in {m["name"] for m in client.plan({})["keep"]}
    assert client.explain("unused_c", {})["status"] == "kept"


def test_trim_then_rollback_over_dbus_moves_real_files(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    progress: list[tuple[str, float]] = []
    outcome = client.trim({"observed": [observed], "initramfs": "skip"},
                          lambda phase, value: progress.append((phase, value)))
    assert outcome["generation"] == 1
    assert not _module(root, "unused_c").exists() and not _module(root, "unused_d").exists()
    assert _module(root, "net_a").exists()
    assert "unused_c" not in (root / f"lib/modules/{KVER}/modules.dep").read_text()
    assert progress[-1] == ("finished", 1.0)
    assert [v for _, v in progress] == sorted(v for _, v in progress)
    assert client.manager_properties()["CurrentGeneration"] == 1

    outcome = client.rollback(None, {"initramfs": "skip"})  # undo the latest
    assert outcome["generation"] == 2 and len(outcome["restore"]) == 2
    assert _module(root, "unused_c").exists() and _module(root, "unused_d").exists()
    assert "unused_c" in (root / f"lib/modules/{KVER}/modules.dep").read_text()
    assert generation_numbers(root) == [0, 1, 2]
    assert client.list_generations()[-1]["action"] == "rollback"


def test_failed_job_reports_its_typed_error(daemon_on: PrivateBus, root: Path) -> None:
    # No observation recorded and none given: the policy's minimum is not met.
    with pytest.raises(KmodtrimError) as err:
        client.trim({"initramfs": "skip"})
    assert err.value.dbus_name == "org.kmodtrim.KmodTrim1.Error.PolicyViolation"
    assert "min_observation" in err.value.message
    assert _module(root, "unused_c").exists()


@pytest.mark.parametrize(("member", "signature", "body", "fragment"), [
    ("Trim", "a{sv}", [{"force": Variant("s", "yes")}], "'force' must be a boolean"),
    ("Trim", "a{sv}", [{"bogus": Variant("b", True)}], "unknown option 'bogus'"),
    ("Trim", "a{sv}", [{"initramfs": Variant("s", "mkinitcpio")}], "'mkinitcpio' is not one"),
    ("Plan", "a{sv}", [{"observed": Variant("as", ["relative.txt"])}], "not an absolute path"),
    ("Plan", "a{sv}", [{"kernel": Variant("s", "../../etc")}], "not a kernel version"),
    ("Restore", "asa{sv}", [["../evil"], {}], "not module names"),
    ("Restore", "asa{sv}", [[], {}], "at least one module"),
    ("Rollback", "ua{sv}", [0, {"kernel": Variant("s", KVER)}], "unknown option 'kernel'"),
    ("KernelEvent", "ssa{sv}", ["install", KVER, {}], "expected 'add' or 'remove'"),
    ("KernelEvent", "ssa{sv}", ["add", "../../etc", {}], "not a kernel version"),
    ("KernelEvent", "ssa{sv}", ["add", "", {}], "not a kernel version"),
    ("KernelEvent", "ssa{sv}", ["add", KVER, {"dry_run": Variant("b", True)}],
     "unknown option 'dry_run'"),
])
def test_bad_arguments_are_invalid_args(
    daemon_on: PrivateBus, member: str, signature: str, body: list[Any], fragment: str
) -> None:
    reply = _raw_call(daemon_on, member, signature, body)
    assert reply.message_type == MessageType.ERROR
    assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
    assert fragment in reply.body[0]


def test_typed_errors_for_unknown_generation_module_and_signature(
    daemon_on: PrivateBus,
) -> None:
    with pytest.raises(NoSuchGenerationError, match="no generation 7"):
        client.show_generation(7)
    reply = _raw_call(daemon_on, "Rollback", "ua{sv}", [7, {}])
    assert reply.error_name == "org.kmodtrim.KmodTrim1.Error.NoSuchGeneration"
    reply = _raw_call(daemon_on, "Explain", "sa{sv}", ["no_such_mod", {}])
    assert reply.error_name == "org.kmodtrim.KmodTrim1.Error.NoSuchModule"
    reply = _raw_call(daemon_on, "Trim", "s", ["x"])  # wrong signature: not our method
    assert reply.error_name == "org.freedesktop.DBus.Error.UnknownMethod"


def test_unprivileged_caller_reads_but_cannot_change_anything(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    for args in (["trim", "{}"], ["rollback", "0", "{}"], ["restore", '["core"]', "{}"],
                 ["kernel_event", '"add"', json.dumps(KVER), "{}"],
                 ["plan", json.dumps({"policy": "/etc/shadow"})]):
        proc = _as_nobody(daemon_on, *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "org.freedesktop.DBus.Error.AccessDenied" in proc.stdout, args
        assert "uid 65534" in proc.stdout
    assert _module(root, "unused_c").exists() and generation_numbers(root) == [0]
    proc = _as_nobody(daemon_on, "plan", "{}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["kernel"] == KVER
    proc = _as_nobody(daemon_on, "list_generations")
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["generation"] == 0
    proc = _as_nobody(daemon_on, "manager_properties")
    assert json.loads(proc.stdout)["State"] == "idle"


# polkit rules (JavaScript, as an administrator would write them): uid 65534 may restore.
NOBODY_MAY_RESTORE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.kmodtrim.restore" && subject.user == "nobody") {
        return polkit.Result.YES;
    }
});
"""


def test_polkit_grants_exactly_what_its_rules_allow(
    tmp_path: Path, root: Path, observed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a real polkitd: a rule granting org.kmodtrim.restore lets an unprivileged
    caller restore, and the other actions stay denied (their defaults say no)."""
    with start_private_bus(tmp_path / "bus", POLKIT_BUS_RULES) as bus, \
            running_polkitd(bus, tmp_path / "polkit", NOBODY_MAY_RESTORE), \
            running_daemon(bus, root):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        assert client.trim({"observed": [observed], "initramfs": "skip"})["generation"] == 1
        assert not _module(root, "unused_c").exists()
        proc = _as_nobody(bus, "restore", '["unused_c"]', json.dumps({"initramfs": "skip"}))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["generation"] == 2
        assert _module(root, "unused_c").exists()
        for args in (["trim", "{}"], ["rollback", "0", "{}"],
                     ["kernel_event", '"add"', json.dumps(KVER), "{}"]):
            proc = _as_nobody(bus, *args)
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            assert "org.freedesktop.DBus.Error.AccessDenied" in proc.stdout, args
    assert generation_numbers(root) == [0, 1, 2]


def _introspection_xml() -> str:
    daemon = Daemon(Path("/nonexistent"))
    node = intr.Node(OBJECT_PATH, interfaces=[
        ManagerInterface(daemon).introspect(),
        JobInterface(Job(1, "trim", "key")).introspect(),
    ])
    element = node.to_xml()
    ET.indent(element)
    return str(ET.tostring(element, encoding="unicode")) + "\n"


def test_interfaces_match_the_pinned_introspection(daemon_on: PrivateBus) -> None:
    """Changing the API is deliberate: regenerate with KMODTRIM_REGENERATE_INTROSPECTION=1."""
    xml = _introspection_xml()
    if os.environ.get(REGENERATE):
        PINNED.write_text(xml)
    assert xml == PINNED.read_text(), f"API changed; set {REGENERATE}=1 to re-pin"
    live = ET.fromstring(_raw_call(
        daemon_on, "Introspect", path=OBJECT_PATH,
        interface="org.freedesktop.DBus.Introspectable").body[0])
    pinned = ET.fromstring(PINNED.read_text())

    def manager(tree: ET.Element) -> str:
        element = next(i for i in tree.iter("interface")
                       if i.get("name") == MANAGER_INTERFACE)
        return ET.tostring(element, encoding="unicode").replace(" ", "").replace("\n", "")

    assert manager(live) == manager(pinned)


# ---------------------------------------------------------------------------------------
# One job at a time (a real Debian cloud kernel makes a trim take seconds)


@pytest.fixture
def cloud_root(cloud_kernel: KernelTree, tmp_path: Path) -> KernelTree:
    tree = copy_kernel_tree(cloud_kernel, tmp_path / "root")
    (tmp_path / "observed.txt").write_text("virtio_net\nvirtio_blk\next4\n")
    return tree


def _wait_for_state(state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.manager_properties()["State"] != state:
        assert time.monotonic() < deadline, f"daemon never became {state}"
        time.sleep(0.01)


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


@pytest.mark.kernel
def test_second_trim_is_busy_identical_one_joins_and_nobody_cannot_cancel(
    private_bus: PrivateBus, cloud_root: KernelTree, tmp_path: Path
) -> None:
    moddir = cloud_root.moddir
    before = sum(1 for _ in moddir.rglob("*.ko"))
    options = {"observed": [tmp_path / "observed.txt"], "initramfs": "skip"}
    with running_daemon(private_bus, cloud_root.root):
        first, first_box = _in_thread(client.trim, options)
        _wait_for_state("busy")
        with pytest.raises(BusyError, match=r"a trim job is running \(job 1\)"):
            client.trim({**options, "dry_run": True})
        joined, joined_box = _in_thread(client.trim, options)
        proc = _as_nobody(private_bus, "cancel", json.dumps(f"{OBJECT_PATH}/job/1"))
        assert "org.freedesktop.DBus.Error.AccessDenied" in proc.stdout, proc.stdout + proc.stderr
        first.join(60)  # and the job was not canceled: it completes
        joined.join(60)
        assert "error" not in first_box, first_box
        assert first_box["result"]["job"] == joined_box["result"]["job"] == 1
        assert first_box["result"]["generation"] == 1
    after = sum(1 for _ in moddir.rglob("*.ko"))
    assert after == before - len(first_box["result"]["stash"]) and after < before / 2
    assert (moddir / "kernel/drivers/net/virtio_net.ko").exists()


@pytest.mark.kernel
def test_canceled_trim_changes_nothing(
    private_bus: PrivateBus, cloud_root: KernelTree, tmp_path: Path
) -> None:
    before = sorted(p.name for p in cloud_root.moddir.rglob("*.ko"))
    options = {"observed": [tmp_path / "observed.txt"], "initramfs": "skip"}
    with running_daemon(private_bus, cloud_root.root):
        thread, box = _in_thread(client.trim, options)
        _wait_for_state("busy")
        client.cancel(f"{OBJECT_PATH}/job/1")
        thread.join(60)
        assert isinstance(box.get("error"), KmodtrimError), box
        assert box["error"].dbus_name == "org.kmodtrim.KmodTrim1.Error.Canceled"
        assert client.manager_properties()["State"] == "idle"
        reply = _raw_call(private_bus, "Cancel", path=f"{OBJECT_PATH}/job/1",
                          interface=JOB_INTERFACE)
        assert reply.error_name == "org.freedesktop.DBus.Error.UnknownObject"  # job gone
    assert sorted(p.name for p in cloud_root.moddir.rglob("*.ko")) == before
    assert generation_numbers(cloud_root.root) == [0]


def _kmodtrim_cli(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args],
                          env={**os.environ, **bus.env()}, capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)


def test_cli_goes_through_the_daemon_and_gets_the_same_answers(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    common = ["--root", str(root), "--kernel", KVER, "--observed", str(observed), "--json"]
    via_daemon = _kmodtrim_cli(daemon_on, "plan", *common)
    in_process = _kmodtrim_cli(daemon_on, "plan", *common, "--offline")
    assert via_daemon.returncode == 0 and in_process.returncode == 0, via_daemon.stderr
    assert json.loads(via_daemon.stdout) == json.loads(in_process.stdout)

    explained = [_kmodtrim_cli(daemon_on, "explain", "core", *common, *extra)
                 for extra in ((), ("--offline",))]
    assert explained[0].stdout == explained[1].stdout
    assert json.loads(explained[0].stdout)["status"] == "kept"

    applied = _kmodtrim_cli(daemon_on, "apply", "--yes", "--initramfs", "skip", *common)
    assert applied.returncode == 0, applied.stderr
    outcome = json.loads(applied.stdout)
    assert outcome["job"] >= 1 and outcome["generation"] == 1  # a kmodtrimd job did it
    assert not _module(root, "unused_c").exists()

    history = [_kmodtrim_cli(daemon_on, "history", "--root", str(root), "--json", *extra)
               for extra in ((), ("--offline",))]
    assert json.loads(history[0].stdout) == json.loads(history[1].stdout)
    assert [g["generation"] for g in json.loads(history[0].stdout)["generations"]] == [0, 1]

    # A usage error is the same error (and exit status) both ways.
    errors = [_kmodtrim_cli(daemon_on, "explain", "no_such", *common, *extra)
              for extra in ((), ("--offline",))]
    assert [e.returncode for e in errors] == [2, 2]
    assert "no_such" in errors[0].stderr and "no_such" in errors[1].stderr
