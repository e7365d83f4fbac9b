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
from kmodtrim.dbus import (
    BUS_NAME,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    api,
    client,
    typed,
)
from kmodtrim.dbus.interfaces import JobInterface
from kmodtrim.errors import BusyError, KmodtrimError, NoSuchGenerationError
from kmodtrim.resident.jobs import Job
from kmodtrim.store import generation_numbers, load_generation
from modbuild import ModSpec, scratch_root

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("net_a", imports=("core_fn",), depends=("core",), aliases=("pci:v00001234d*",)),
    ModSpec("unused_c", imports=("core_fn",), depends=("core",)),
    ModSpec("unused_d"),
)
POLICY = "presets = []\nclouds = []\nrules = []\n[min_observation]\nboots = 2\ndays = 0\n"
CONTRACT = Path(__file__).resolve().parent.parent / "units" / "org.kmodtrim.KmodTrim1.xml"


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
    assert outcome["generation"] == 2 and len(outcome["put_back"]) == 2
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


# ---------------------------------------------------------------------------------------
# The contract: units/org.kmodtrim.KmodTrim1.xml


def contract(xml: str | ET.Element, interface: str) -> dict[str, Any]:
    """What an introspection document says of ``interface``, without the docs: each
    method's in-arguments (name and type) and out-types, each property's type and access,
    each signal's types. (dbus-next names no out-arguments nor signal arguments.)"""
    tree = ET.fromstring(xml) if isinstance(xml, str) else xml
    element = next(i for i in tree.iter("interface") if i.get("name") == interface)

    def args(member: ET.Element, direction: str) -> list[Any]:
        found = [a for a in member.iter("arg") if a.get("direction", "out") == direction]
        return [(a.get("name"), a.get("type")) if direction == "in" else a.get("type")
                for a in found]

    return {
        "methods": {m.get("name"): (args(m, "in"), args(m, "out"))
                    for m in element.iter("method")},
        "properties": {p.get("name"): (p.get("type"), p.get("access"))
                       for p in element.iter("property")},
        "signals": {s.get("name"): args(s, "out") for s in element.iter("signal")},
    }


def _live_introspection(bus: PrivateBus, path: str) -> str:
    reply = _raw_call(bus, "Introspect", path=path,
                      interface="org.freedesktop.DBus.Introspectable")
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    text: str = reply.body[0]
    return text


def test_contract_file_is_written_from_the_api_table() -> None:
    assert CONTRACT.read_text() == api.introspection_xml(), (
        "units/org.kmodtrim.KmodTrim1.xml is not what kmodtrim.dbus.api declares; rewrite "
        "it with: python -m kmodtrim.dbus.api > units/org.kmodtrim.KmodTrim1.xml")
    tree = ET.fromstring(CONTRACT.read_text())
    for member in [*tree.iter("method"), *tree.iter("property"), *tree.iter("signal")]:
        docs = [a.get("value") for a in member.findall("annotation")
                if a.get("name") == "org.freedesktop.DBus.DocString"]
        assert len(docs) == 1 and docs[0], member.get("name")


def test_running_daemon_introspects_as_the_contract_says(daemon_on: PrivateBus) -> None:
    live = _live_introspection(daemon_on, OBJECT_PATH)
    text = CONTRACT.read_text()
    assert contract(live, MANAGER_INTERFACE) == contract(text, MANAGER_INTERFACE)
    # The Job interface is exported only while a job runs (checked live in the kernel
    # test below); here, as the daemon's code introspects it.
    job = JobInterface(Job(1, "trim", "key")).introspect().to_xml()
    assert contract(job, JOB_INTERFACE) == contract(text, JOB_INTERFACE)


def test_contract_declares_each_method_with_its_polkit_action() -> None:
    manager = {m.name: m.action for m in api.MANAGER.methods}
    assert manager == {
        "Plan": None, "Explain": None, "ListGenerations": None, "ShowGeneration": None,
        "Trim": "org.kmodtrim.trim", "Rollback": "org.kmodtrim.rollback",
        "Restore": "org.kmodtrim.restore", "KernelEvent": "org.kmodtrim.trim"}
    assert api.JOB.method("Cancel").action == api.JOB_ACTION
    text = CONTRACT.read_text()
    for method in api.MANAGER.methods:
        if method.action is not None:
            assert f"polkit {method.action}" in api.method_doc(method)
            assert f"polkit {method.action}" in text


def test_typed_results_and_versioned_documents_over_the_bus(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    reply = _raw_call(daemon_on, "ListGenerations")
    assert reply.signature == "aa{sv}"
    (summary,) = reply.body[0]
    assert {k: (v.signature, v.value) for k, v in summary.items()} == {
        "generation": ("x", 0), "created": ("s", ""), "action": ("s", "untrimmed"),
        "description": ("s", "the tree as installed"), "removed_files": ("x", 0),
        "removed_bytes": ("x", 0), "current": ("b", True)}
    reply = _raw_call(daemon_on, "Plan", "a{sv}", [{}])
    assert reply.signature == "s" and json.loads(reply.body[0])["schema"] == 1
    reply = _raw_call(daemon_on, "Explain", "sa{sv}", ["core", {}])
    assert json.loads(reply.body[0])["schema"] == 1
    assert "schema" not in client.plan({})  # the client gives the CLI today's document

    dry = client.trim({"observed": [observed], "initramfs": "skip", "dry_run": True})
    assert dry["generation"] is None and dry["dry_run"] is True  # null, put back
    outcome = client.trim({"observed": [observed], "initramfs": "skip"})
    assert outcome["generation"] == 1 and len(outcome["taken_out"]) == 2
    reply = _raw_call(daemon_on, "ShowGeneration", "u", [1])
    assert reply.signature == "a{sv}"
    manifest = reply.body[0]
    assert manifest["number"].signature == "x" and "rollback_to" not in manifest
    assert manifest["removed"].signature == "aa{sv}"
    assert client.show_generation(1) == load_generation(root, 1).to_json()


STASHED = {"path": "/lib/modules/6.1/kernel/a.ko", "size": 10, "sha256": "0" * 64,
           "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 1_700_000_000_000_000_000,
           "kind": "module", "module": "a", "kernel": "6.1", "package": None, "link": None}
REGEN = {"6.1": {"depmod_seconds": 0.04, "initramfs": {
    "method": "dracut", "image": "/boot/initrd", "previous": None, "skipped": None,
    "seconds": 1.5}}}


def test_typed_documents_come_back_as_the_same_json() -> None:
    """Every null a generation manifest or a job outcome can hold is left out on D-Bus and
    put back by the client; a package's free-form metadata travels as JSON text."""
    generation = {
        "number": 3, "created": "2026-12-01T11:06:00+00:00", "action": "rollback",
        "description": "back to 1", "removed": [STASHED, {**STASHED, "module": None}],
        "stashed": [], "restored": ["/lib/modules/6.1/kernel/b.ko"], "kernels": ["6.1"],
        "rollback_to": None, "keep_reasons": {"a": "observed"}, "regen": REGEN,
        "packages": [{"name": "linux-modules-extra", "version": "1", "arch": "x86_64",
                      "backend": "rpm", "metadata": {"epoch": None, "files": [{"mode": 1}]},
                      "files": [STASHED], "control": [], "dirs": [["/lib", 0o755]],
                      "absent": []}],
        "packages_removed": [], "packages_reinstalled": [], "exclusion_backends": ["rpm"],
        "removed_bytes": 20,
    }
    encoded = typed.to_dbus(generation, typed.GENERATION)
    assert "rollback_to" not in encoded and encoded["number"] == Variant("x", 3)
    assert encoded["removed"].signature == "aa{sv}"
    assert encoded["packages"].value[0]["metadata"].signature == "s"
    assert typed.from_dbus(encoded, typed.GENERATION) == generation

    outcome = {"schema": 1, "damaged": [], "generation": None, "description": None,
               "removed_files": None, "removed_bytes": None, "dry_run": True,
               "taken_out": ["/a.ko"], "put_back": [], "notes": [], "regen": REGEN,
               "packages_removed": [], "packages_reinstalled": [],
               "stash_bytes_on_disk": 0, "tree_bytes_out": 1, "tree_bytes_in": 0,
               "stash_growth_bytes": 0, "net_freed_bytes": 1,
               "kernel_event": {"action": "add", "kernel": "6.1", "initramfs": "auto",
                                "backend": None}}
    assert typed.from_dbus(typed.to_dbus(outcome, typed.OUTCOME), typed.OUTCOME) == outcome


def test_a_null_no_shape_declares_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kmodtrim.dbus.typed"):
        assert typed.to_dbus({"new_key": None, "kept": 1}, typed.OUTCOME) == \
            {"kept": Variant("x", 1)}
    assert "new_key: null left out" in caplog.text


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
        live_job = _live_introspection(private_bus, f"{OBJECT_PATH}/job/1")
        assert contract(live_job, JOB_INTERFACE) == \
            contract(CONTRACT.read_text(), JOB_INTERFACE)
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
    assert after == before - len(first_box["result"]["taken_out"]) and after < before / 2
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


def _workers_of(daemon_pid: int) -> list[int]:
    """The pids of the daemon's worker processes (resident/worker.py) running now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{daemon_pid}\n" in status and b"kmodtrim.resident.worker" in cmdline \
                and "\nState:\tZ" not in status:
            found.append(int(entry.name))
    return found


def _worker_of(daemon_pid: int, timeout: float = 30.0) -> int:
    """The pid of the daemon's one worker process, once it runs."""
    deadline = time.monotonic() + timeout
    while not (found := _workers_of(daemon_pid)):
        assert time.monotonic() < deadline, "kmodtrimd started no worker"
        time.sleep(0.01)
    (pid,) = found
    return pid


def _wait_for_no_worker(daemon_pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _workers_of(daemon_pid):
        assert time.monotonic() < deadline, "a kmodtrimd worker keeps running"
        time.sleep(0.05)


@pytest.mark.kernel
def test_a_worker_that_dies_fails_its_job_and_the_daemon_serves_on(
    private_bus: PrivateBus, cloud_root: KernelTree, tmp_path: Path
) -> None:
    """Jobs run in worker processes: one killed mid-trim is a failed job, never a dead
    daemon, and the next job recovers what it left (the engine's journal)."""
    before = sorted(p.name for p in cloud_root.moddir.rglob("*.ko"))
    options = {"observed": [tmp_path / "observed.txt"], "initramfs": "skip"}
    with running_daemon(private_bus, cloud_root.root) as daemon:
        _wait_for_no_worker(daemon.pid)  # start-up's automatic-trim check has answered
        thread, box = _in_thread(client.trim, options)
        _wait_for_state("busy")
        os.kill(_worker_of(daemon.pid), 9)
        thread.join(60)
        error = box.get("error")
        assert isinstance(error, KmodtrimError), box
        assert "worker for trim was killed by signal SIGKILL" in error.message
        assert daemon.poll() is None and client.manager_properties()["State"] == "idle"
        assert client.rollback(None, {"initramfs": "skip", "dry_run": True})["dry_run"]
        outcome = client.trim(options)  # recovers first, then trims
        assert outcome["generation"] == 1
        client.rollback(None, {"initramfs": "skip"})
    assert sorted(p.name for p in cloud_root.moddir.rglob("*.ko")) == before


def test_the_daemon_leaves_planning_and_the_engine_to_its_workers(
    daemon_on: PrivateBus, root: Path, observed: Path
) -> None:
    """Start-up, Plan, Explain and jobs run in worker processes: the daemon itself never
    loads the policy's pydantic models nor the stash's zstandard."""
    assert client.plan({"observed": [observed]})["kernel"] == KVER
    assert client.explain("core", {"observed": [observed]})["status"] == "kept"
    assert client.trim({"observed": [observed], "initramfs": "skip"})["generation"] == 1
    pid = int(subprocess.run(["pgrep", "-f", f"kmodtrim.daemon --root {root}"],
                             capture_output=True, text=True, check=True).stdout.split()[0])
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "pydantic_core" not in maps and "zstandard" not in maps


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
