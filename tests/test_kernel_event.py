"""Kernel installs: the real hooks, run with their documented arguments, keep a second
kernel trimmed on a scratch root; kernel removal forgets its stash. Without a daemon the
hooks run kmodtrim in-process; with kmodtrimd serving the root they hand the kernel to it
over a real private system bus, and it trims once the package manager's lock is free."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dbusfixture import PrivateBus, private_bus, running_daemon
from kmodtrim.dbus import client
from kmodtrim.store import current_generation, state_dir
from modbuild import ModSpec, build_tree

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

REPO = Path(__file__).resolve().parent.parent
OLD, NEW, NEWER = "6.1.0-1-test", "6.1.0-2-test", "6.1.0-3-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("nic", imports=("core_fn",), depends=("core",)),
    ModSpec("unused", exports=("unused_fn",)),
    ModSpec("unused_user", imports=("unused_fn",), depends=("unused",)),
)
# The newer kernel renamed "nic" to "nic2" and kept the old name as an alias.
RENAMED = (SPECS[0], ModSpec("nic2", imports=("core_fn",), depends=("core",), aliases=("nic",)),
           *SPECS[2:])


def _env(root: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "KMODTRIM_ROOT": str(root), "PATH": f"{bindir}:{os.environ['PATH']}"}


def _present(root: Path, kver: str, name: str) -> bool:
    return (root / f"lib/modules/{kver}/kernel/drivers/test/{name}.ko").exists()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    build_tree(root, OLD, SPECS)
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 1\ndays = 0\n')
    observed = tmp_path / "observed"
    observed.write_text("nic\n")
    subprocess.run(["depmod", "-b", str(root), OLD], check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--root", str(root),
         "--kernel", OLD, "--observed", str(observed)],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert not _present(root, OLD, "unused")
    return root


def test_debian_postinst_hook_trims_the_new_kernel(root: Path) -> None:
    build_tree(root, NEW, SPECS)
    proc = subprocess.run([str(REPO / "units/kernel-postinst.d-kmodtrim"), NEW,
                           f"/boot/vmlinuz-{NEW}"], env=_env(root), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    assert _present(root, NEW, "nic") and _present(root, NEW, "core")
    assert not _present(root, NEW, "unused") and not _present(root, NEW, "unused_user")
    assert "nic.ko" in (root / f"lib/modules/{NEW}/modules.dep").read_text()
    # Idempotent: the kernel-install plugin may hand over the same kernel again.
    again = subprocess.run([str(REPO / "units/kernel-postinst.d-kmodtrim"), NEW],
                           env=_env(root), capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "warning" not in again.stderr
    assert current_generation(root).number == 2


def test_kernel_install_plugin_trims_a_kernel_with_a_renamed_module(root: Path) -> None:
    build_tree(root, NEWER, RENAMED)
    proc = subprocess.run([str(REPO / "units/45-kmodtrim.install"), "add", NEWER,
                           str(root / "boot/entry"), str(root / f"boot/vmlinuz-{NEWER}")],
                          env=_env(root), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    assert _present(root, NEWER, "nic2"), "observed 'nic' must map to its new name"
    assert not _present(root, NEWER, "unused")


def test_postrm_hook_forgets_a_removed_kernels_stash(root: Path) -> None:
    build_tree(root, NEW, SPECS)
    env = _env(root)
    subprocess.run([str(REPO / "units/kernel-postinst.d-kmodtrim"), NEW], env=env, check=True)
    assert any(f.kernel == NEW for f in current_generation(root).removed)
    shutil.rmtree(root / f"lib/modules/{NEW}")
    proc = subprocess.run([str(REPO / "units/kernel-postrm.d-kmodtrim"), NEW], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    generation = current_generation(root)
    assert generation.action == "forget"
    assert not any(f.kernel == NEW for f in generation.removed)
    assert any(f.kernel == OLD for f in generation.removed)


def test_manual_mode_leaves_a_new_kernel_alone_on_a_never_trimmed_machine(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    build_tree(root, NEW, SPECS)
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text('mode = "manual"\n')
    proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli", "kernel-event", "add", NEW,
                           "--root", str(root)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "left as installed" in proc.stdout
    assert _present(root, NEW, "unused")


# ---------------------------------------------------------------------------------------
# With kmodtrimd running: the hooks hand over, the daemon waits for the package manager


@contextmanager
def _dpkg_lock(root: Path) -> Iterator[None]:
    """Hold dpkg's database lock of ``root`` the way dpkg does while it runs a kernel
    package's maintainer scripts (and so our hook)."""
    admin = root / "var/lib/dpkg"
    admin.mkdir(parents=True, exist_ok=True)
    (admin / "status").touch()
    with open(admin / "lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        yield


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _hook(root: Path, bus: PrivateBus, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "units" / argv[0]), *argv[1:]],
                          env={**_env(root), "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
                          capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False, timeout=60)


def test_hook_hands_the_kernel_to_kmodtrimd_which_trims_after_dpkg_finishes(
    root: Path, private_bus: PrivateBus
) -> None:
    build_tree(root, NEW, SPECS)
    with running_daemon(private_bus, root):
        with _dpkg_lock(root):
            started = time.monotonic()
            proc = _hook(root, private_bus, "kernel-postinst.d-kmodtrim", NEW)
            # The hook returns at once: waiting for the daemon would deadlock on dpkg.
            assert time.monotonic() - started < 15
            assert proc.returncode == 0 and proc.stdout == "", proc.stderr
            assert f"kmodtrimd trims kernel {NEW} once the package manager" in proc.stderr
            assert "warning" not in proc.stderr, proc.stderr
            props = client.manager_properties()
            assert props["PendingKernelEvents"] == [f"add {NEW}"]
            time.sleep(1.5)  # several lock probes: nothing may happen while dpkg runs
            assert _present(root, NEW, "unused")
            assert current_generation(root).number == 1
            assert client.manager_properties()["PendingKernelEvents"] == [f"add {NEW}"]
        _wait(lambda: client.manager_properties()["PendingKernelEvents"] == []
              and client.manager_properties()["State"] == "idle", "the kernel event")
        generation = current_generation(root)
        assert generation.number == 2 and generation.kernels == (NEW,)
        assert _present(root, NEW, "nic") and not _present(root, NEW, "unused")
        assert not (state_dir(root) / "kernel-events.json").exists()
        # The postrm hook's removal goes the same way and forgets the stash.
        shutil.rmtree(root / f"lib/modules/{NEW}")
        proc = _hook(root, private_bus, "kernel-postrm.d-kmodtrim", NEW)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
        _wait(lambda: current_generation(root).action == "forget", "the removal")
    assert not any(f.kernel == NEW for f in current_generation(root).removed)


def test_queued_kernel_event_survives_a_daemon_restart(
    root: Path, private_bus: PrivateBus
) -> None:
    build_tree(root, NEW, SPECS)
    queue = state_dir(root) / "kernel-events.json"
    with _dpkg_lock(root):
        with running_daemon(private_bus, root):
            proc = _hook(root, private_bus, "45-kmodtrim.install", "add", NEW,
                         str(root / "boot/entry"), str(root / f"boot/vmlinuz-{NEW}"))
            assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
            assert queue.exists()
        # Stopped (SIGTERM) before dpkg finished: still queued on disk, nothing changed.
        assert queue.exists() and _present(root, NEW, "unused")
    with running_daemon(private_bus, root):
        _wait(lambda: current_generation(root).number == 2, "the resumed kernel event")
        _wait(lambda: not queue.exists(), "the queue to empty")
    assert _present(root, NEW, "nic") and not _present(root, NEW, "unused")


def test_corrupt_kernel_event_queue_is_set_aside_not_fatal(
    root: Path, private_bus: PrivateBus
) -> None:
    queue = state_dir(root) / "kernel-events.json"
    queue.write_text('[{"action": "add", "kernel": "../../etc"}]\n')
    with running_daemon(private_bus, root):
        assert client.manager_properties()["PendingKernelEvents"] == []
    assert not queue.exists()
    assert "../../etc" in queue.with_name("kernel-events.json.corrupt").read_text()
