"""Kernel installs: the real hooks, run with their documented arguments, keep a second
kernel trimmed on a scratch root; kernel removal forgets its stash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtrim.store import current_generation
from modbuild import ModSpec, build_tree

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
        'presets = []\ninitramfs = "skip"\n[min_observation]\nboots = 1\ndays = 0\n')
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
