"""Restore on demand through modprobe itself, with real kmod on a scratch root: a trim
writes kmodtrim's modprobe.d file, ``modprobe -n -v`` (by name and by alias) resolves a
trimmed module to kmodtrim's restore command, that command restores the module and its
closure (depmod knows it again) and records it, and rollback 0 removes the file."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.message import Message

from dbusfixture import PrivateBus, private_bus, running_daemon
from kmodtrim.dbus import BUS_NAME, MANAGER_INTERFACE
from kmodtrim.ondemand import CONF_PATH
from kmodtrim.store import load_generation, operation_lock, read_restored
from modbuild import ModSpec, scratch_root

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

KVER = "6.1.0-ondemand"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("fs_x", aliases=("fs-xtest",), imports=("core_fn",), depends=("core",),
            extra_modinfo=(("parmtype", "level:int"), ("parm", "level:how much (int)"))),
    ModSpec("dev_y", aliases=("pci:v00001234d00005678sv*sd*bc*sc*i*", "net-pf-99")),
    ModSpec("unused_d", exports=("d_fn",)),
    ModSpec("unused_e", imports=("d_fn",), depends=("unused_d",), aliases=("crypto-etest",)),
    ModSpec("excluded_z", aliases=("fs-ztest",)),
)
POLICY = ('presets = []\nclouds = []\nrules = ["-excluded_z"]\n'
          '[min_observation]\nboots = 1\ndays = 0\n')
MODDIR = f"lib/modules/{KVER}/kernel/drivers/test"


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmodtrim.cli", *args, "--root", str(root), "--kernel", KVER,
         "--offline"], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


def _modprobe(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The root's own kmod view: its tree and only its modprobe.d (-C)."""
    return subprocess.run(["modprobe", "-d", str(root), "-S", KVER, "-C",
                           str(root / "etc/modprobe.d"), "-n", "-v", *args],
                          capture_output=True, text=True, check=False)


def _install_command(root: Path, request: str, *options: str) -> list[str]:
    """What modprobe would run for ``request``: the install line's command, with
    $CMDLINE_OPTS replaced as kmod does (``modprobe -n -v`` prints the command as written,
    then the options), run here as this test's kmodtrim on the scratch root."""
    proc = _modprobe(root, request, *options)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("install /usr/bin/kmodtrim restore --on-demand "), line
    assert " $CMDLINE_OPTS" in line, line
    words = shlex.split(line.replace(" $CMDLINE_OPTS", "", 1))[2:]  # 'install', the program
    return [sys.executable, "-m", "kmodtrim.cli", *words, "--root", str(root), "--kernel",
            KVER, "--offline"]


@pytest.fixture
def trimmed(tmp_path: Path) -> Path:
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)
    (root / "etc/modprobe.d").mkdir(parents=True)  # as on every real root
    observed = tmp_path / "observed.txt"
    observed.write_text("core\n")
    proc = _cli(root, "apply", "--yes", "--initramfs", "skip", "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    assert not (root / MODDIR / "fs_x.ko").exists()
    return root


def test_a_trim_writes_install_and_by_name_alias_lines(trimmed: Path) -> None:
    text = (trimmed / CONF_PATH.lstrip("/")).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "install dev_y /usr/bin/kmodtrim restore --on-demand dev_y $CMDLINE_OPTS",
        "alias net-pf-99 dev_y",  # the pci: modalias stays with self-healing
        "install fs_x /usr/bin/kmodtrim restore --on-demand fs_x $CMDLINE_OPTS",
        "alias fs-xtest fs_x",
        "install unused_d /usr/bin/kmodtrim restore --on-demand unused_d $CMDLINE_OPTS",
        "install unused_e /usr/bin/kmodtrim restore --on-demand unused_e $CMDLINE_OPTS",
        "alias crypto-etest unused_e",
    ]
    assert "# excluded: excluded_z" in text
    # kmod resolves names and aliases to the restore command; the excluded one is gone.
    for request, name in (("fs-xtest", "fs_x"), ("fs_x", "fs_x"), ("unused-e", "unused_e"),
                          ("net-pf-99", "dev_y"), ("crypto-etest", "unused_e")):
        proc = _modprobe(trimmed, request)
        assert proc.returncode == 0, (request, proc.stderr)
        assert proc.stdout.strip().endswith(
            f"install /usr/bin/kmodtrim restore --on-demand {name} $CMDLINE_OPTS"), proc.stdout
    assert _modprobe(trimmed, "fs-ztest").returncode != 0
    assert _modprobe(trimmed, "core").stdout.strip().startswith("insmod ")


def test_the_install_command_restores_the_closure_and_modprobe_finds_it(
        trimmed: Path) -> None:
    command = _install_command(trimmed, "crypto-etest")
    assert command[-6:-5] == ["unused_e"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert (trimmed / MODDIR / "unused_e.ko").exists()
    assert (trimmed / MODDIR / "unused_d.ko").exists()  # its closure
    assert not (trimmed / MODDIR / "fs_x.ko").exists()
    assert "image root: not loaded; modprobe -n: insmod " in proc.stdout, proc.stdout
    # depmod knows it again: the dry load goes to the files, no install line is left.
    shown = _modprobe(trimmed, "crypto-etest").stdout
    assert "insmod" in shown and "unused_d.ko" in shown and "unused_e.ko" in shown, shown
    text = (trimmed / CONF_PATH.lstrip("/")).read_text()
    assert "unused_e" not in text.replace("# excluded: excluded_z", "")
    assert "install fs_x " in text
    assert read_restored(trimmed)["unused_e"].startswith("requested by modprobe on ")
    # Later plans keep it for that reason.
    explained = _cli(trimmed, "explain", "unused_e")
    assert "requested by modprobe" in explained.stdout, explained.stdout


def test_explain_says_whether_modprobe_brings_a_module_back(trimmed: Path) -> None:
    shown = _cli(trimmed, "explain", "fs-xtest")
    assert shown.returncode == 0, shown.stderr
    assert "  now: trimmed in generation 1; restored on demand when requested (modprobe " \
           "fs-xtest)" in shown.stdout, shown.stdout
    # A module with only a device modalias besides its by-name one shows that one.
    assert "(modprobe net-pf-99)" in _cli(trimmed, "explain", "dev_y").stdout
    excluded = _cli(trimmed, "explain", "excluded_z").stdout
    assert "  now: trimmed in generation 1; NOT restored on demand: the policy excludes it" \
           in excluded, excluded
    doc = json.loads(_cli(trimmed, "explain", "fs_x", "--json").stdout)
    assert doc["on_demand"] == {
        "state": "on-demand", "requests": ["fs-xtest"],
        "text": "restored on demand when requested (modprobe fs-xtest)"}
    assert json.loads(_cli(trimmed, "explain", "core", "--json").stdout)["on_demand"] is None
    # Once modprobe has asked for it: kept for that reason, and explain says so.
    proc = subprocess.run(_install_command(trimmed, "crypto-etest"), capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(_cli(trimmed, "explain", "unused_e", "--json").stdout)
    assert doc["status"] == "kept" and doc["on_demand"]["state"] == "requested", doc
    assert doc["now"].startswith("in the tree (restored in generation 2); kept: requested "
                                 "by modprobe on "), doc["now"]


def test_module_options_reach_the_module_once_after_the_restore(
        trimmed: Path, tmp_path: Path) -> None:
    """Real modprobe runs the install line (no -n) in a mount namespace whose
    /proc/cmdline says ``fs_x.level=7``: the options of modprobe.d (the module's and its
    alias's), of the kernel command line and of modprobe's own command line come to
    kmodtrim through $CMDLINE_OPTS, and its final (dry) ``modprobe --ignore-install``
    load gives the module each of them once, as modprobe would without kmodtrim."""
    conf = trimmed / "etc/modprobe.d"
    (conf / "local.conf").write_text('options fs_x debug=1 name="a b"\n'
                                     "options fs-xtest via_alias=1\n")
    program = tmp_path / "kmodtrim"  # the install line's program: this test's kmodtrim
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -m kmodtrim.cli "$@" --root '
                       f"{trimmed} --kernel {KVER} --offline\n")
    program.chmod(0o755)
    seen = tmp_path / "modprobe.d"  # what modprobe reads: the root's, with that program
    seen.mkdir()
    for path in conf.iterdir():
        seen.joinpath(path.name).write_text(
            path.read_text().replace("/usr/bin/kmodtrim ", f"{program} "))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda1 fs_x.level=7 quiet\n")
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /proc/cmdline && exec "$@"',
         str(cmdline), "modprobe", "-d", str(trimmed), "-S", KVER, "-C", str(seen),
         "fs-xtest", "level=2"], capture_output=True, text=True, check=False,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert (trimmed / MODDIR / "fs_x.ko").exists()
    loaded = proc.stdout.strip().splitlines()[-1]
    assert loaded.startswith("restored fs_x for modprobe (1 file back, generation 2); "
                             "image root: not loaded; modprobe -n: insmod "), loaded
    assert loaded.split(f"{MODDIR}/fs_x.ko ", 1)[1].split(" in ")[0].strip() == \
        'debug=1 name="a b" level=7 via_alias=1 level=2', loaded


def test_a_module_still_in_the_tree_is_only_loaded(trimmed: Path) -> None:
    proc = _cli(trimmed, "restore", "--on-demand", "core")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to restore" in proc.stdout and "insmod" in proc.stdout


def test_a_running_operation_is_waited_for_briefly_then_a_clear_error(
        trimmed: Path) -> None:
    with operation_lock(trimmed, "a long trim"):
        started = time.monotonic()
        proc = _cli(trimmed, "restore", "--on-demand", "fs_x")
        took = time.monotonic() - started
    assert proc.returncode == 1
    assert "fs_x not restored for modprobe: another kmodtrim operation is running: a long " \
           "trim" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # one line and its hint
    assert took < 30
    assert not (trimmed / MODDIR / "fs_x.ko").exists()


def test_without_a_stash_copy_it_fails_with_a_clear_error(trimmed: Path) -> None:
    for pack in (trimmed / "var/lib/kmodtrim/stash").rglob("*.pack"):
        pack.unlink()
    proc = _cli(trimmed, "restore", "--on-demand", "fs_x")
    assert proc.returncode == 1
    assert proc.stderr.startswith("kmodtrim: error: fs_x not restored for modprobe: stash "
                                  f"copy of /{MODDIR}/fs_x.ko is missing"), proc.stderr
    assert not (trimmed / MODDIR / "fs_x.ko").exists()


def test_bad_input_is_one_line(trimmed: Path) -> None:
    proc = _cli(trimmed, "restore", "--on-demand", "a/b")
    assert proc.returncode == 2 and "takes one module name" in proc.stderr
    proc = _cli(trimmed, "restore", "--on-demand", "fs_x", "level=1", "two words")
    assert proc.returncode == 2, proc.stderr
    assert "restore --on-demand fs_x: 'two words' is not a module option" in proc.stderr
    assert not (trimmed / MODDIR / "fs_x.ko").exists()
    proc = _cli(trimmed, "restore", "--on-demand", "no_such_module")
    assert proc.returncode == 2 and "has no module 'no_such_module'" in proc.stderr


def test_rollback_0_removes_the_file(trimmed: Path) -> None:
    proc = _cli(trimmed, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert not (trimmed / CONF_PATH.lstrip("/")).exists()
    assert os.listdir(trimmed / "etc/modprobe.d") == []
    assert _modprobe(trimmed, "fs-xtest").stdout.strip().startswith("insmod ")


def test_a_modprobe_d_that_cannot_be_written_does_not_fail_the_change(
        tmp_path: Path) -> None:
    # /etc/modprobe.d is a file here, so the on-demand file cannot be written: the trim is
    # committed all the same, says so, and nothing is left pending for recovery.
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)
    (root / "etc/modprobe.d").write_text("not a directory\n")
    observed = tmp_path / "observed.txt"
    observed.write_text("core\n")
    proc = _cli(root, "apply", "--yes", "--initramfs", "skip", "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    assert "on-demand restore configuration not written" in proc.stderr
    assert not (root / MODDIR / "fs_x.ko").exists()
    assert load_generation(root, 1).action == "apply"
    status = _cli(root, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"] is None
    assert (root / "etc/modprobe.d").read_text() == "not a directory\n"


def _metrics(path: Path) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in path.read_text().splitlines()
                if line and not line.startswith("#"))


def test_through_kmodtrimd_when_it_serves_the_root(trimmed: Path, tmp_path: Path,
                                                  private_bus: PrivateBus) -> None:
    """The same install command, with kmodtrimd serving the root: one Restore job with the
    option on_demand, which records that modprobe asked, is counted as on demand and
    signalled (ModuleRequested); a restore by hand is neither."""
    command = [word for word in _install_command(trimmed, "fs-xtest") if word != "--offline"]
    by_hand = [sys.executable, "-m", "kmodtrim.cli", "restore", "unused_e", "--yes",
               "--initramfs", "skip", "--root", str(trimmed), "--kernel", KVER]
    metrics = tmp_path / "metrics"

    async def scenario() -> tuple[list[subprocess.CompletedProcess[str]], list[list[Any]]]:
        listener: Any = await MessageBus(bus_address=private_bus.address).connect()
        signals: list[list[Any]] = []
        listener.add_message_handler(
            lambda m: signals.append([m.member, *m.body])
            if m.member in ("ModuleRequested", "ModuleRestored") else None)
        await listener.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}'"]))
        done = []
        for argv in ([*command, "--json"], by_hand):
            done.append(await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, check=False,
                stdin=subprocess.DEVNULL, env=private_bus.env()))
        await asyncio.sleep(0.3)  # a signal sent before JobRemoved is read by now
        listener.disconnect()
        return done, signals

    with running_daemon(private_bus, trimmed, "--metrics-dir", str(metrics)):
        (proc, hand), signals = asyncio.run(scenario())
    assert proc.returncode == 0, proc.stderr
    assert hand.returncode == 0, hand.stderr
    doc = json.loads(proc.stdout)
    assert doc.get("job") and doc["on_demand"]["module"] == "fs_x", doc
    assert doc["on_demand"]["load"].startswith("image root: not loaded; modprobe -n: insmod ")
    assert (trimmed / MODDIR / "fs_x.ko").exists()
    assert (trimmed / MODDIR / "unused_e.ko").exists()
    assert load_generation(trimmed, doc["generation"]).action == "restore"
    # The job itself recorded who asked: the CLI took no second step (the generation the
    # record was written in is the job's).
    restored = read_restored(trimmed)
    assert restored["fs_x"].startswith("requested by modprobe on "), restored
    assert restored["unused_e"].startswith("restored by hand on "), restored
    assert signals == [["ModuleRequested", "fs_x", doc["generation"]]], signals
    counters = _metrics(metrics / "kmodtrim.prom")
    assert (counters["kmodtrim_on_demand_restores_total"],
            counters["kmodtrim_restores_by_hand_total"],
            counters["kmodtrim_self_heal_restores_total"]) == ("1", "1", "0"), counters
    assert "install fs_x " not in (trimmed / CONF_PATH.lstrip("/")).read_text()
