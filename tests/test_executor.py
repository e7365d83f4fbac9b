"""Apply, restore and roll back for real on scratch roots; crash and disk-full safety."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtrim.errors import BusyError, PolicyViolation
from kmodtrim.executor import FAULT_STEPS, Options, apply_plan, recover
from kmodtrim.operations import Target, make_plan_for
from kmodtrim.store import current_generation, generation_numbers, operation_lock
from modbuild import ModSpec, scratch_root

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("net_a", imports=("core_fn",), depends=("core",), aliases=("pci:v00001234d*",)),
    ModSpec("fs_b", aliases=("fs-testfs",)),
    ModSpec("unused_c", imports=("core_fn",), depends=("core",),
            firmware=("test/fw.bin", "test/link.bin", "test/shared.bin")),
    ModSpec("fw_keeper", firmware=("test/shared.bin",)),
    ModSpec("unused_d", exports=("d_fn",)),
    ModSpec("unused_e", imports=("d_fn",), depends=("unused_d",)),
)
POLICY = """
presets = []
clouds = []
rules = []
[min_observation]
boots = 2
days = 0
"""


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every regular file under lib/ → (sha256, mode)."""
    found = {}
    for path in sorted((root / "lib").rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("modules."):
            found[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o7777)
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def make_root(tmp_path: Path) -> Path:
    """The scratch root most executor tests start from: built modules and firmware."""
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)
    (root / f"lib/modules/{KVER}/kernel/drivers/test/unused_d.ko").chmod(0o600)
    fw = root / "lib/firmware/test"
    fw.mkdir(parents=True)
    (fw / "fw.bin").write_bytes(b"firmware blob" * 100)
    (fw / "only.bin").write_bytes(b"only for unused_c")
    (fw / "link.bin").symlink_to("only.bin")
    (fw / "shared.bin").write_bytes(b"also wanted by a kept module")
    (fw / "unrequested-link.bin").symlink_to("fw.bin")
    return root


@pytest.fixture
def observed(tmp_path: Path) -> Path:
    return make_observed(tmp_path)


def make_observed(tmp_path: Path) -> Path:
    """An observation of the VM the scratch root is trimmed for."""
    path = tmp_path / "observed.txt"
    path.write_text("# seen on the VM\nnet-a\nfs_b\nfw_keeper\n")
    return path


def _cli(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmodtrim.cli", *args, "--root", str(root), "--kernel", KVER],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False,
    )


def _apply(root: Path, observed: Path, force: bool = False) -> None:
    target = Target(root=root, kernel=KVER, observed_files=(observed,))
    result = make_plan_for(target)
    apply_plan(root, result.plan, result.index, result.evidence, result.policy,
               Options(initramfs="skip", force=force))


def _present(root: Path, name: str) -> bool:
    return (root / f"lib/modules/{KVER}/kernel/drivers/test/{name}.ko").exists()


def test_apply_removes_unneeded_modules_and_firmware_then_rollback_restores_all(
    root: Path, observed: Path
) -> None:
    before = _snapshot(root)
    _apply(root, observed)
    assert _present(root, "net_a") and _present(root, "core") and _present(root, "fs_b")
    assert not _present(root, "unused_c") and not _present(root, "unused_e")
    fw = root / "lib/firmware/test"
    assert not (fw / "only.bin").exists() and not (fw / "link.bin").is_symlink()
    assert (fw / "shared.bin").exists()  # a kept module names it too
    # fw.bin is named only by a trimmed module, but a link nobody names points at it:
    # trimming it would leave the link dangling (FIELD-LESSONS #11).
    assert (fw / "unrequested-link.bin").resolve().exists()
    assert "unused_c" not in (root / f"lib/modules/{KVER}/modules.dep").read_text()
    assert current_generation(root).number == 1

    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before
    assert (root / "lib/firmware/test/link.bin").resolve() == (root / "lib/firmware/test/only.bin")
    assert "unused_c" in (root / f"lib/modules/{KVER}/modules.dep").read_text()
    assert generation_numbers(root) == [0, 1, 2]


def test_restore_brings_back_a_module_with_its_dependencies(root: Path, observed: Path) -> None:
    _apply(root, observed)
    proc = _cli(root, "restore", "unused-e", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert _present(root, "unused_e") and _present(root, "unused_d")
    assert not _present(root, "unused_c")
    assert "unused_e.ko: kernel/drivers/test/unused_d.ko" in (
        root / f"lib/modules/{KVER}/modules.dep").read_text()


def test_restore_brings_back_firmware_with_its_module(root: Path, observed: Path) -> None:
    _apply(root, observed)
    proc = _cli(root, "restore", "unused_c", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert (root / "lib/firmware/test/only.bin").read_bytes() == b"only for unused_c"
    assert (root / "lib/firmware/test/link.bin").is_symlink()


def test_dry_run_changes_nothing(root: Path, observed: Path) -> None:
    before = _snapshot(root)
    proc = _cli(root, "apply", "--dry-run", "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    assert "would take out" in proc.stdout and "unused_c.ko" in proc.stdout
    assert _snapshot(root) == before
    assert generation_numbers(root) == [0]


def test_apply_refuses_before_minimum_observation_unless_forced(root: Path) -> None:
    proc = _cli(root, "apply", "--yes", "--initramfs", "skip")
    assert proc.returncode == 1
    assert "min_observation" in proc.stderr and "--force" in proc.stderr
    assert _present(root, "unused_c")
    proc = _cli(root, "apply", "--yes", "--force", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert not _present(root, "unused_c")


def test_apply_without_yes_off_a_terminal_is_refused(root: Path, observed: Path) -> None:
    proc = _cli(root, "apply", "--observed", str(observed))
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert _present(root, "unused_c")


def test_executor_refuses_a_plan_that_removes_a_policy_kept_module(
    root: Path, observed: Path
) -> None:
    target = Target(root=root, kernel=KVER, observed_files=(observed,))
    result = make_plan_for(target)
    stricter_text = POLICY.replace("rules = []", 'rules = ["unused_c"]')
    (root / "etc/kmodtrim/policy.toml").write_text(stricter_text)
    stricter = make_plan_for(target).policy
    with pytest.raises(PolicyViolation, match="unused_c"):
        apply_plan(root, result.plan, result.index, result.evidence, stricter,
                   Options(initramfs="skip"))
    assert _present(root, "unused_c")


def test_second_operation_is_busy_and_names_the_running_one(root: Path, observed: Path) -> None:
    with operation_lock(root, "apply (kernel 9.9)"), pytest.raises(
        BusyError, match=r"apply \(kernel 9.9\)"
    ):
        _apply(root, observed)
    proc = _cli(root, "rollback", "--yes")
    assert proc.returncode == 0  # the lock is free again: nothing to roll back is fine


# Package steps never run without a package manager: tests/test_package_removal.py
# crashes at each of them with the real dpkg.
@pytest.mark.parametrize("step", [s for s in FAULT_STEPS
                                  if s not in ("after-depmod", "after-initramfs")
                                  and "package" not in s]
                         + ["stash:2", "unlink:2"])
def test_crash_at_any_step_of_apply_loses_nothing(root: Path, observed: Path, step: str) -> None:
    before = _snapshot(root)
    proc = _cli(root, "apply", "--yes", "--initramfs", "skip", "--observed", str(observed),
                env={"KMODTRIM_FAULT": step})
    if step.split(":")[0] in ("restore", "after-restore") and proc.returncode == 0:
        return  # apply restores nothing here: that step never runs
    assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
    recover(root)
    after = _snapshot(root)
    generation = current_generation(root)
    if generation.number == 0:
        assert after == before
    else:
        # Finished: what is missing is exactly what the generation holds, hash-verified.
        missing = {p: v for p, v in before.items() if p not in after}
        recorded = {f.path.lstrip("/"): (f.sha256, f.mode) for f in generation.removed
                    if f.link is None}
        assert missing == recorded
        assert all(after[p] == before[p] for p in after)
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before


@pytest.mark.parametrize("step", ["after-journal", "restore:1", "after-restore", "after-commit"])
def test_crash_during_rollback_loses_nothing(root: Path, observed: Path, step: str) -> None:
    before = _snapshot(root)
    _apply(root, observed)
    trimmed = _snapshot(root)
    proc = _cli(root, "rollback", "--yes", "--initramfs", "skip", env={"KMODTRIM_FAULT": step})
    assert proc.returncode == -9, proc.stderr
    recover(root)
    assert _snapshot(root) in (before, trimmed)
    assert _cli(root, "rollback", "0", "--yes", "--initramfs", "skip").returncode == 0
    assert _snapshot(root) == before


@pytest.mark.parametrize("step", ["after-journal", "restore:1", "restore:2", "after-restore",
                                  "after-depmod", "after-commit", "after-final-exclude"])
def test_crash_during_restore_loses_nothing(root: Path, observed: Path, step: str) -> None:
    before = _snapshot(root)
    _apply(root, observed)
    trimmed = _snapshot(root)
    proc = _cli(root, "restore", "unused_e", "--yes", "--initramfs", "skip",
                env={"KMODTRIM_FAULT": step})
    assert proc.returncode == -9, proc.stderr
    recover(root)
    after = _snapshot(root)
    restored = {p: v for p, v in before.items() if p.endswith(("unused_e.ko", "unused_d.ko"))}
    assert after in (trimmed, {**trimmed, **restored})
    assert _cli(root, "rollback", "0", "--yes", "--initramfs", "skip").returncode == 0
    assert _snapshot(root) == before
