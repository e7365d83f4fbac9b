"""The Ansible collection (contrib/ansible, ``kmodtrim.fleet``) run by a real
ansible-core: a playbook over an inventory of three local-connection hosts, each with its
own root and observations, gathers their exports, merges them on the controller, trims an
image root and pushes a policy drop-in; check mode changes nothing and a second run
changes nothing. The ``kmodtrim`` module's apply, rollback and restore are idempotent and
show a diff."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from modbuild import scratch_root
from need import need
from test_fleet import KVER, POLICY, SPECS, hosts

__all__ = ["hosts"]  # the fixture, re-exported for pytest

COLLECTION = Path(__file__).resolve().parent.parent / "contrib" / "ansible"
KMODTRIM = f"{sys.executable} -m kmodtrim.cli"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)


# What a dry run itself leaves: the index cache and the (empty) lock file kmodtrim takes.
NOT_CHANGES = ("var/cache/kmodtrim/", "var/lib/kmodtrim/lock")


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots → sha256 (symlinks → their target), but NOT_CHANGES."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if str(path.relative_to(root)).startswith(NOT_CHANGES):
                continue
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def playbook(tmp_path: Path, play: str, inventory: str, *args: str) -> dict[str, int]:
    """Run ``play`` with ``inventory``; returns changed tasks per host (fails on a failed
    or unreachable host)."""
    collections = tmp_path / "collections/ansible_collections/kmodtrim"
    if not collections.exists():
        collections.mkdir(parents=True)
        (collections / "fleet").symlink_to(COLLECTION)
    (tmp_path / "play.yml").write_text(play)
    (tmp_path / "inventory.yml").write_text(inventory)
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-tmp"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
    proc = subprocess.run(["ansible-playbook", "-i", str(tmp_path / "inventory.yml"),
                           str(tmp_path / "play.yml"), *args], capture_output=True,
                          text=True, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recap = {host: (int(changed), int(unreachable), int(failed))
             for host, _, changed, unreachable, failed in RECAP.findall(proc.stdout)}
    assert recap and all(u == f == 0 for _, u, f in recap.values()), proc.stdout
    playbook.last_output = proc.stdout  # type: ignore[attr-defined]
    return {host: changed for host, (changed, _, _) in recap.items()}


def fleet_inventory(roots: list[Path]) -> str:
    hosts_yaml = "".join(f"        host_{root.name}:\n          kmodtrim_root: {root}\n"
                         for root in roots)
    return ("all:\n  children:\n    fleet:\n      vars:\n"
            "        ansible_connection: local\n      hosts:\n" + hosts_yaml)


FLEET_PLAY = """
- hosts: fleet
  gather_facts: false
  roles:
    - role: kmodtrim.fleet.trim
      vars:
        kmodtrim_bin: "{kmodtrim}"
        kmodtrim_fleet_dir: "{fleet_dir}"
        kmodtrim_min_hosts: 2
        kmodtrim_image_root: "{image}"
        kmodtrim_image_kernel: "{kver}"
        kmodtrim_image_initramfs: skip
        kmodtrim_push_policy: true
"""


def test_role_merges_three_hosts_trims_the_image_and_pushes_the_policy(
        hosts: list[Path], tmp_path: Path) -> None:
    need("ansible-playbook", "depmod")
    image = scratch_root(tmp_path / "image", KVER, SPECS, policy=POLICY)
    fleet_dir = tmp_path / "fleet"
    play = FLEET_PLAY.format(kmodtrim=KMODTRIM, fleet_dir=fleet_dir, image=image, kver=KVER)
    inventory = fleet_inventory(hosts)

    before = snapshot(image, *hosts)
    checked = playbook(tmp_path, play, inventory, "--check", "--diff")
    assert snapshot(image, *hosts) == before  # check mode changed nothing
    assert sum(checked.values()) >= 1  # …but says what would change
    assert "/lib/modules/6.1.0-test/kernel/drivers/test/nvme.ko" in \
        playbook.last_output  # type: ignore[attr-defined]

    changed = playbook(tmp_path, play, inventory)
    assert set(changed) == {"host_a", "host_b", "host_c"} and all(changed.values())
    merged = json.loads((fleet_dir / "merged.json").read_text())
    assert merged["hosts"] == 3 and merged["keep"] == ["core", "virtio_blk", "virtio_net"]
    left = sorted(p.name for p in (image / f"lib/modules/{KVER}").rglob("*.ko"))
    assert left == ["core.ko", "virtio_blk.ko", "virtio_net.ko"]
    for root in hosts:
        dropin = root / "etc/kmodtrim/policy.d/50-fleet.toml"
        assert '"virtio_net"' in dropin.read_text()

    after = snapshot(image, *hosts)
    assert playbook(tmp_path, play, inventory) == {"host_a": 0, "host_b": 0, "host_c": 0}
    assert snapshot(image, *hosts) == after


MODULE_PLAY = """
- hosts: localhost
  gather_facts: false
  tasks:
    - kmodtrim.fleet.kmodtrim:
        action: {action}
        root: "{root}"
        kernel: "{kver}"
        initramfs: skip
        kmodtrim_bin: "{kmodtrim}"
        {extra}
"""


def test_module_apply_rollback_restore_are_idempotent_with_check_mode_and_diff(
        tmp_path: Path) -> None:
    need("ansible-playbook", "depmod")
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)
    observed = tmp_path / "observed.txt"
    observed.write_text("virtio_net\n")
    inventory = "all:\n  hosts:\n    localhost:\n      ansible_connection: local\n"

    def run(action: str, extra: str, *args: str) -> int:
        play = MODULE_PLAY.format(action=action, root=root, kver=KVER, kmodtrim=KMODTRIM,
                                  extra=extra)
        return playbook(tmp_path, play, inventory, *args)["localhost"]

    apply = f"observed: ['{observed}']"
    before = snapshot(root)
    assert run("apply", apply, "--check", "--diff") == 1
    assert "-/lib/modules/6.1.0-test/kernel/drivers/test/unused_a.ko" in \
        playbook.last_output  # type: ignore[attr-defined]
    assert snapshot(root) == before
    assert run("plan", f"observed: ['{observed}']") == 0
    assert run("apply", apply) == 1
    assert sorted(p.name for p in root.rglob("*.ko")) == ["core.ko", "virtio_net.ko"]
    assert run("apply", apply) == 0

    assert run("restore", "names: [nvme]", "--check") == 1
    assert not (root / f"lib/modules/{KVER}/kernel/drivers/test/nvme.ko").exists()
    assert run("restore", "names: [nvme]") == 1
    assert (root / f"lib/modules/{KVER}/kernel/drivers/test/nvme.ko").exists()
    assert run("restore", "names: [nvme]") == 0

    assert run("rollback", "generation: 0", "--check") == 1
    assert run("rollback", "generation: 0") == 1
    assert sorted(p.name for p in root.rglob("*.ko")) == sorted(
        s.name + ".ko" for s in SPECS)
    assert run("rollback", "generation: 0") == 0
