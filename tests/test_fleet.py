"""Fleets end to end with the real CLI: three host roots with different observations are
exported (``observe --export``), merged (``fleet merge``) with ``--min-hosts 1`` and ``2``
against hand-computed keep sets, exported for image builders (mkosi's INI, dracut's
shell, a kmodtrim policy drop-in loaded by kmodtrim's own loader), and an image root of
gcc-built modules is trimmed from the merge (``apply --root IMAGE --observed MERGE``)."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodtrim.documents import EXPORT_KIND, MERGE_KIND, problems
from kmodtrim.policy import load_policy
from kmodtrim.store import HowSeen, read_observations, record_observation
from modbuild import ModSpec, scratch_root
from need import need

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("virtio_net", imports=("core_fn",), depends=("core",)),
    ModSpec("virtio_blk"),
    ModSpec("nvme"),
    ModSpec("isofs"),
    ModSpec("dm-crypt"),  # a file name with "-": mkosi's pattern must match it
    ModSpec("unused_a"),
    ModSpec("unused_b"),
)
POLICY = "presets = []\nclouds = []\nrules = []\n"


def kmodtrim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)


def host_root(base: Path, name: str, machine_id: str, image_version: str) -> Path:
    """A host's root: os-release, machine-id and an installed kernel's directory."""
    root = base / name
    (root / "etc").mkdir(parents=True)
    (root / f"lib/modules/{KVER}").mkdir(parents=True)
    (root / "etc/os-release").write_text(
        f'ID=debian\nVERSION_ID="12"\nIMAGE_ID=debian-cloud\nIMAGE_VERSION={image_version}\n')
    (root / "etc/machine-id").write_text(machine_id + "\n")
    return root


@pytest.fixture
def hosts(tmp_path: Path) -> list[Path]:
    """Three hosts that saw different modules (host c's file is of the format before
    per-module sightings were recorded: it must still read and export)."""
    a = host_root(tmp_path, "a", "a" * 32, "20261201")
    record_observation(a, "boot-a1", ["core", "virtio_net", "virtio_blk"], now=1_796_000_000)
    record_observation(a, "boot-a2", ["core", "virtio_net", "virtio_blk"], now=1_796_100_000)
    record_observation(a, "boot-a2", ["isofs"], now=1_796_100_500, how=HowSeen.UEVENT)
    b = host_root(tmp_path, "b", "b" * 32, "20261201")
    record_observation(b, "boot-b1", ["core", "virtio_net", "nvme"], now=1_796_050_000)
    (b / "sys/class/dmi/id").mkdir(parents=True)
    (b / "sys/class/dmi/id/sys_vendor").write_text("Amazon EC2\n")
    c = host_root(tmp_path, "c", "c" * 32, "20261115")
    state = c / "var/lib/kmodtrim"
    state.mkdir(parents=True)
    (state / "observations.json").write_text(json.dumps({"boots": {"boot-c1": {
        "first_seen": 1_795_000_000, "last_seen": 1_795_000_100,
        "modules": ["core", "virtio_net", "virtio_blk", "dm_crypt"]}}}))
    return [a, b, c]


def export(root: Path, out: Path) -> dict[str, Any]:
    proc = kmodtrim("observe", "--export", "--root", str(root), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    assert problems(EXPORT_KIND, doc) == []
    return doc


def merge(files: list[Path], out: Path, *threshold: str) -> dict[str, Any]:
    proc = kmodtrim("fleet", "merge", *map(str, files), *threshold, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    assert problems(MERGE_KIND, doc) == []
    return doc


def test_three_hosts_export_and_merge_to_the_hand_computed_keep_sets(
        hosts: list[Path], tmp_path: Path) -> None:
    exports = [tmp_path / f"{root.name}.json" for root in hosts]
    docs = [export(root, out) for root, out in zip(hosts, exports, strict=True)]
    a = {m["name"]: m for m in docs[0]["modules"]}
    assert a["isofs"] == {"name": "isofs", "first_seen": "2026-12-01T04:48:20Z",
                          "last_seen": "2026-12-01T04:48:20Z", "boots": 1, "how": ["uevent"]}
    assert (a["virtio_net"]["boots"], a["virtio_net"]["how"]) == (2, ["proc-modules"])
    assert docs[2]["modules"][0]["how"] == ["recorded"]  # the older file reads
    assert "a" * 32 not in exports[0].read_text()  # the machine id is hashed, never written
    assert len({d["host"]["machine_id_sha256"] for d in docs}) == 3
    assert [d["platform"]["detected"] for d in docs] == [None, "aws", None]
    assert docs[1]["platform"]["vendor"] == "Amazon EC2"

    one = merge(exports, tmp_path / "m1.json", "--min-hosts", "1")
    assert one["keep"] == ["core", "dm_crypt", "isofs", "nvme", "virtio_blk", "virtio_net"]
    two = merge(exports, tmp_path / "m2.json", "--min-hosts", "2")
    assert two["keep"] == ["core", "virtio_blk", "virtio_net"]
    assert two["images"] == [{"image": "debian-cloud 20261115", "hosts": 1},
                             {"image": "debian-cloud 20261201", "hosts": 2}]
    assert merge(list(reversed(exports)), tmp_path / "again.json", "--min-hosts", "2") == two
    share = merge(exports, tmp_path / "share.json", "--min-share", "100%")
    assert share["keep"] == ["core", "virtio_net"]


def test_merge_takes_osquery_result_logs_beside_exports(hosts: list[Path],
                                                        tmp_path: Path) -> None:
    """osquery's lines are written in osqueryd's result-log format (tests/data; osquery is
    not installable here, so they are not captured from a running osqueryd)."""
    exported = tmp_path / "a.json"
    export(hosts[0], exported)
    log = Path(__file__).resolve().parent / "data/osquery-kernel-modules-results.log"
    doc = merge([exported, log], tmp_path / "m.json", "--min-hosts", "2")
    assert doc["hosts"] == 4
    assert doc["keep"] == ["isofs", "virtio_net"]


def test_observed_takes_an_export_and_a_merge(hosts: list[Path], tmp_path: Path) -> None:
    image = scratch_root(tmp_path / "image", KVER, SPECS, policy=POLICY)
    exported = tmp_path / "a.json"
    export(hosts[0], exported)
    proc = kmodtrim("plan", "--root", str(image), "--observed", str(exported), "--json")
    assert proc.returncode == 0, proc.stderr
    kept = {m["name"] for m in json.loads(proc.stdout)["keep"]}
    assert kept == {"core", "isofs", "virtio_blk", "virtio_net"}


def test_merge_refuses_another_family_and_other_files_in_one_line(
        hosts: list[Path], tmp_path: Path) -> None:
    good = tmp_path / "a.json"
    doc = export(hosts[0], good)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "kernel_family": "6.12",
                                 "host": {"machine_id_sha256": "d" * 64, "salted": False}}))
    proc = kmodtrim("fleet", "merge", str(good), str(other))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == (
        f"kmodtrim: error: {other}: kernel family 6.12, but {good} is of 6.1: module names "
        "differ between kernel families")
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**doc, "schema": 2}))
    proc = kmodtrim("fleet", "merge", str(newer))
    assert (proc.returncode, proc.stderr.splitlines()[0]) == (2, (
        f"kmodtrim: error: {newer}: an observation export of schema 2; this kmodtrim "
        "merges schema 1"))
    text = tmp_path / "names.txt"
    text.write_text("virtio_net\n")
    proc = kmodtrim("fleet", "merge", str(text))
    assert proc.returncode == 2 and "names.txt:1: not a JSON line" in proc.stderr
    proc = kmodtrim("fleet", "merge", str(good), "--min-hosts", "0")
    assert proc.returncode == 2 and "--min-hosts '0'" in proc.stderr
    proc = kmodtrim("fleet", "export", "--format", "mkosi", str(good))
    assert proc.returncode == 2 and "not a fleet merge" in proc.stderr


def test_image_builder_exports_parse_with_their_tools_and_the_merge_trims_an_image(
        hosts: list[Path], tmp_path: Path) -> None:
    need("bash", "depmod")
    exports = [tmp_path / f"{root.name}.json" for root in hosts]
    for root, out in zip(hosts, exports, strict=True):
        export(root, out)
    merged = tmp_path / "merged.json"
    merge(exports, merged, "--min-hosts", "1")
    image = scratch_root(tmp_path / "image", KVER, SPECS, policy=POLICY)

    def fleet_export(fmt: str) -> Path:
        out = tmp_path / f"fleet.{fmt}"
        proc = kmodtrim("fleet", "export", "--format", fmt, str(merged), "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        return out

    # mkosi: INI, [Content] KernelModules= globs matched against the module files' names.
    ini = configparser.ConfigParser(interpolation=None, strict=True)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read_string(fleet_export("mkosi").read_text())
    patterns = ini["Content"]["KernelModules"].split()
    files = sorted(p.name.removesuffix(".ko")
                   for p in (image / f"lib/modules/{KVER}").rglob("*.ko"))
    from fnmatch import fnmatchcase
    matched = sorted(f for f in files if any(fnmatchcase(f, p) for p in patterns))
    assert matched == ["core", "dm-crypt", "isofs", "nvme", "virtio_blk", "virtio_net"]

    # dracut: its conf is shell; sourced, add_drivers gains the names.
    dracut = fleet_export("dracut")
    assert subprocess.run(["bash", "-n", str(dracut)], check=False).returncode == 0
    sourced = subprocess.run(["bash", "-c", 'add_drivers=" earlier "; . "$1"; '
                              'printf %s "$add_drivers"', "bash", str(dracut)],
                             capture_output=True, text=True, check=True).stdout
    assert sourced.split() == ["earlier", "core", "dm_crypt", "isofs", "nvme", "virtio_blk",
                               "virtio_net"]

    # policy: a drop-in kmodtrim's own loader reads.
    dropin = image / "etc/kmodtrim/policy.d/50-fleet.toml"
    dropin.parent.mkdir(parents=True)
    shutil.copy(fleet_export("policy"), dropin)
    policy = load_policy(image)
    assert [r.pattern for r in policy.rules if r.source.endswith("50-fleet.toml")] == \
        ["core", "dm_crypt", "isofs", "nvme", "virtio_blk", "virtio_net"]
    dropin.unlink()

    # The merge trims the image: what the fleet used stays, the rest goes.
    two = tmp_path / "two.json"
    merge(exports, two, "--min-hosts", "2")
    proc = kmodtrim("apply", "--root", str(image), "--observed", str(two), "--yes",
                    "--initramfs", "skip", "--json")
    assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in (image / f"lib/modules/{KVER}").rglob("*.ko"))
    assert left == ["core.ko", "virtio_blk.ko", "virtio_net.ko"]
    assert read_observations(image) == {}  # supplied, not recorded as a boot
