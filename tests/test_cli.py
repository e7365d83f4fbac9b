"""The CLI contract: verbs, --json documents, explanations, exit codes, the index cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import KernelTree
from modbuild import ModSpec, build_tree

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("virtio-thing", imports=("core_fn",), depends=("core",),
            aliases=("pci:v00001AF4d00001000sv*sd*bc*sc*i*",)),
    ModSpec("helper", softdeps=("pre: core",)),
    ModSpec("unused", exports=("unused_fn",)),
    ModSpec("unused_user", imports=("unused_fn",), depends=("unused",)),
)
POLICY = 'presets = []\nclouds = []\nrules = ["helper", "-nothing_here", "no_such_module"]\n'


def kmodtrim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args], capture_output=True,
                          text=True, check=False, cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    build_tree(root, KVER, SPECS, builtin=("ext4",))
    policy = root / "etc/kmodtrim/policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text(POLICY)
    return root


@pytest.fixture
def observed(tmp_path: Path) -> Path:
    path = tmp_path / "observed"
    path.write_text(
        "# recorded on a test VM\n"
        "virtio-thing 16384 0 - Live 0x0000000000000000\n"
        "ext4\n"
        "vanished_module\n"
    )
    return path


def test_plan_json_has_the_documented_keys_and_reasons(root: Path, observed: Path) -> None:
    proc = kmodtrim("plan", "--root", str(root), "--observed", str(observed), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kernel"] == KVER
    kept = {m["name"]: m for m in doc["keep"]}
    removed = {m["name"]: m for m in doc["remove"]}
    assert set(kept) == {"core", "virtio_thing", "helper"}
    assert set(removed) == {"unused", "unused_user"}
    for m in doc["keep"] + doc["remove"]:
        assert m["path"].startswith(f"/lib/modules/{KVER}/") and m["size"] > 0
    assert kept["virtio_thing"]["reasons"][0]["kind"] == "observed"
    assert {r["kind"] for r in kept["core"]["reasons"]} >= {"depends", "softdep-pre"}
    assert doc["keep_bytes"] + doc["remove_bytes"] == doc["total_bytes"]
    assert doc["remove_bytes"] == sum(m["size"] for m in doc["remove"])
    # Requested-but-missing is never silent (FIELD-LESSONS #3).
    assert any("vanished_module" in w and f"{observed}:4" in w for w in doc["warnings"])
    assert any("no_such_module" in w and "policy.toml:3" in w for w in doc["warnings"])


def test_plan_human_output_puts_totals_first(root: Path, observed: Path) -> None:
    proc = kmodtrim("plan", "--root", str(root), "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"kernel {KVER}")
    assert "keep" in lines[1] and "3 modules" in lines[1]
    assert "remove" in lines[2] and "2 modules" in lines[2]
    assert "biggest savings" in proc.stdout


def test_explain_shows_the_chain_back_to_the_observation(root: Path, observed: Path) -> None:
    proc = kmodtrim("explain", "core", "--root", str(root), "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    assert "core: KEPT" in proc.stdout
    assert "dependency of virtio_thing ← observed" in proc.stdout


def test_explain_a_removed_module_and_a_builtin(root: Path, observed: Path) -> None:
    proc = kmodtrim("explain", "unused-user", "--root", str(root), "--observed", str(observed))
    assert proc.returncode == 0 and "unused_user: REMOVED" in proc.stdout
    proc = kmodtrim("explain", "ext4", "--root", str(root), "--observed", str(observed))
    assert proc.returncode == 0 and "built into the kernel" in proc.stdout


def test_explain_by_alias_resolves_to_the_module(root: Path, observed: Path) -> None:
    proc = kmodtrim("explain", "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
                    "--root", str(root), "--observed", str(observed), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "virtio_thing"


def test_unknown_module_is_a_usage_error_with_a_suggestion(root: Path) -> None:
    proc = kmodtrim("explain", "unsued", "--root", str(root))
    assert proc.returncode == 2
    assert "has no module 'unsued'" in proc.stderr and "unused" in proc.stderr


def test_bad_observed_file_names_file_and_line(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("virtio_thing\nnot a/module\n")
    proc = kmodtrim("plan", "--root", str(root), "--observed", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_policy_is_a_usage_error_naming_file_and_key(root: Path) -> None:
    (root / "etc/kmodtrim/policy.toml").write_text("firmware = 'sometimes'\n")
    proc = kmodtrim("plan", "--root", str(root))
    assert proc.returncode == 2
    assert "policy.toml" in proc.stderr and "firmware" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_kernel_lists_the_installed_ones(root: Path) -> None:
    proc = kmodtrim("plan", "--root", str(root), "--kernel", "9.9.9")
    assert proc.returncode == 2
    assert "9.9.9" in proc.stderr and KVER in proc.stderr


def test_bad_usage_exits_2(root: Path) -> None:
    assert kmodtrim("frobnicate").returncode == 2
    assert kmodtrim("plan", "--root", str(root / "nonexistent")).returncode == 2
    assert kmodtrim().returncode == 2


def test_malformed_module_is_reported_not_a_traceback(root: Path) -> None:
    broken = root / f"lib/modules/{KVER}/kernel/drivers/test/broken.ko"
    broken.write_bytes(b"\x7fELF" + b"\0" * 20)
    proc = kmodtrim("index", "--root", str(root))
    assert proc.returncode == 1
    assert "kmodtrim: warning:" in proc.stderr  # warnings go to stderr, prefixed
    assert "broken.ko: not a readable kernel module" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_index_cache_rereads_only_changed_files(root: Path) -> None:
    first = json.loads(kmodtrim("index", "--root", str(root), "--json").stdout)
    assert first["parsed"] == len(SPECS) and first["cached"] == 0
    second = json.loads(kmodtrim("index", "--root", str(root), "--json").stdout)
    assert second["parsed"] == 0 and second["cached"] == len(SPECS)
    target = root / f"lib/modules/{KVER}/kernel/drivers/test/unused.ko"
    data = target.read_bytes()
    target.write_bytes(data)  # same size, new mtime
    os.utime(target, ns=(1, 1))
    third = json.loads(kmodtrim("index", "--root", str(root), "--json").stdout)
    assert third["parsed"] == 1
    rebuilt = json.loads(kmodtrim("index", "--root", str(root), "--json", "--rebuild").stdout)
    assert rebuilt["parsed"] == len(SPECS)


def test_observe_reads_a_recorded_root(root: Path) -> None:
    (root / "proc").mkdir()
    (root / "proc/modules").write_text("core 16384 1 virtio_thing, Live 0x0\n")
    proc = kmodtrim("observe", "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded"] == ["core"]


@pytest.mark.kernel
def test_plan_for_the_recorded_vm_on_the_generic_kernel(
    generic_kernel: KernelTree, tmp_path: Path
) -> None:
    observed = Path(__file__).parent.parent / "examples/observed-bookworm-qemu-virtio.txt"
    proc = kmodtrim("plan", "--root", str(generic_kernel.root), "--kernel", generic_kernel.kver,
                    "--observed", str(observed), "--symvers", str(generic_kernel.symvers),
                    "--cache-dir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    names = {line.strip() for line in observed.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    kept = {m["name"] for m in doc["keep"]}
    builtin = set(doc["builtin_needed"])
    assert names <= kept | builtin, names - kept - builtin
    assert doc["unresolved_symbols"] == []
    assert doc["remove_bytes"] > 0.8 * doc["total_bytes"]
    assert len(doc["keep"]) + len(doc["remove"]) > 4000


def test_status_counts_the_kept_previous_initramfs_against_the_bytes_freed(
        root: Path, observed: Path) -> None:
    proc = kmodtrim("apply", "--yes", "--initramfs", "skip", "--root", str(root),
                    "--observed", str(observed))
    assert proc.returncode == 0, proc.stderr
    before = json.loads(kmodtrim("status", "--json", "--root", str(root)).stdout)
    assert before["boot_kept_bytes"] == 0
    kept = root / f"boot/initrd.img-{KVER}.kmodtrim-prev"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"\0" * 1000)
    after = json.loads(kmodtrim("status", "--json", "--root", str(root)).stdout)
    assert after["boot_kept_bytes"] == 1000
    assert after["net_freed_bytes"] == before["net_freed_bytes"] - 1000 == (
        after["removed_bytes"] - after["stash_bytes_on_disk"] - 1000)
    human = kmodtrim("status", "--root", str(root)).stdout
    assert "/boot keeps 1000 B of previous initramfs images" in human, human
