"""The observation export and the image builders' formats, in memory: sightings from boot
records old and new, os-release parsing, the machine-id hash, and each rendering read back
with the syntax its tool reads (INI for mkosi, the shell for dracut, TOML for a policy)."""

from __future__ import annotations

import configparser
import hashlib
import tomllib
from fnmatch import fnmatchcase

import pytest

from kmodtrim.documents import EXPORT_KIND, problems
from kmodtrim.errors import InputError
from kmodtrim.fleet.export import export_document, kernel_family, module_sightings
from kmodtrim.fleet.formats import keep_of, mkosi_pattern, render
from kmodtrim.fleet.host import HostFacts, hash_machine_id, parse_os_release
from kmodtrim.fleet.merge import Threshold, merge_observations
from kmodtrim.fleet.sources import host_of_export
from kmodtrim.request import FleetFormat

FACTS = HostFacts(machine_id_sha256="f" * 64, salted=False,
                  image={"id": "debian", "version_id": "12", "image_id": None,
                         "image_version": None},
                  platform={"vendor": "QEMU", "product": None, "hypervisor": None},
                  kernels=("6.1.0-27-cloud-amd64", "6.1.0-28-cloud-amd64"),
                  kernel="6.1.0-28-cloud-amd64")
BOOTS = {
    # Recorded before sightings were kept: the boot's own times stand.
    "old": {"first_seen": 1_000_000, "last_seen": 1_000_100, "modules": ["ext4", "virtio_net"]},
    "new": {"first_seen": 2_000_000, "last_seen": 2_000_500, "modules": ["virtio_net", "vfat"],
            "seen": {"virtio_net": {"first": 2_000_000, "last": 2_000_000,
                                    "how": ["proc-modules"]},
                     "vfat": {"first": 2_000_300, "last": 2_000_400, "how": ["uevent"]}}},
}


def test_export_gives_each_module_first_last_boots_and_how() -> None:
    doc = export_document(FACTS, BOOTS, {"xfs": "by hand on 2026-11-02"}, now=3_000_000)
    assert problems(EXPORT_KIND, doc) == []
    assert doc["modules"] == [
        {"name": "ext4", "first_seen": "1970-01-12T13:46:40Z",
         "last_seen": "1970-01-12T13:48:20Z", "boots": 1, "how": ["recorded"]},
        {"name": "vfat", "first_seen": "1970-01-24T03:38:20Z",
         "last_seen": "1970-01-24T03:40:00Z", "boots": 1, "how": ["uevent"]},
        {"name": "virtio_net", "first_seen": "1970-01-12T13:46:40Z",
         "last_seen": "1970-01-24T03:33:20Z", "boots": 2,
         "how": ["proc-modules", "recorded"]},
        {"name": "xfs", "first_seen": None, "last_seen": None, "boots": 0,
         "how": ["restored"]},
    ]
    assert (doc["boots"], doc["kernel_family"], doc["host"]["machine_id_sha256"]) == \
        (2, "6.1", "f" * 64)
    assert host_of_export(doc, "e.json").modules["xfs"].boots == 0  # it reads back


def test_sightings_of_no_boot_are_none() -> None:
    assert module_sightings({}) == {}


@pytest.mark.parametrize(("kernel", "family"), [
    ("6.1.0-28-cloud-amd64", "6.1"), ("6.12.57+deb13-amd64", "6.12"),
    ("6.8.5-301.fc40.x86_64", "6.8"), ("custom", None), (None, None)])
def test_kernel_family_is_major_and_minor(kernel: str | None, family: str | None) -> None:
    assert kernel_family(kernel) == family


def test_os_release_image_fields_quoted_or_not() -> None:
    text = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
            "IMAGE_ID='debian-cloud'\n# IMAGE_VERSION=commented\nIMAGE_VERSION=20261201\n")
    assert parse_os_release(text) == {"id": "debian", "version_id": "12",
                                      "image_id": "debian-cloud", "image_version": "20261201"}
    assert parse_os_release("") == dict.fromkeys(("id", "version_id", "image_id",
                                                   "image_version"))


def test_machine_id_is_hashed_plain_or_keyed_never_kept() -> None:
    machine = "0123456789abcdef0123456789abcdef"
    plain = hash_machine_id(machine, None)
    assert plain == hashlib.sha256(machine.encode()).hexdigest()
    salted = hash_machine_id(machine, "fleet-secret")
    assert salted not in (plain, machine) and len(salted) == 64
    assert salted == hash_machine_id(machine, "fleet-secret")


MERGE = merge_observations([host_of_export(export_document(FACTS, BOOTS, {}, 0), "e")],
                           Threshold(min_hosts=1))


def test_mkosi_drop_in_is_ini_whose_kernel_modules_match_the_module_files() -> None:
    text = render(MERGE, FleetFormat.MKOSI)
    ini = configparser.ConfigParser(interpolation=None, strict=True)
    ini.optionxform = str  # type: ignore[assignment,method-assign]  # mkosi's keys are case-sensitive
    ini.read_string(text)
    assert ini.sections() == ["Content"]
    patterns = ini["Content"]["KernelModules"].split()
    assert patterns == ["ext4", "vfat", "virtio[_-]net"]
    # mkosi matches a pattern against the module file's basename without .ko(.xz…).
    assert fnmatchcase("virtio-net", patterns[2]) and fnmatchcase("virtio_net", patterns[2])
    assert not any(p.startswith("-") for p in patterns)  # "-" would mean exclude


def test_dracut_conf_appends_the_names_to_add_drivers() -> None:
    text = render(MERGE, FleetFormat.DRACUT)
    assert text.splitlines()[-1] == 'add_drivers+=" ext4 vfat virtio_net "'
    assert all(line.startswith("#") for line in text.splitlines()[:-1])


def test_policy_drop_in_is_toml_with_one_rule_per_module() -> None:
    assert tomllib.loads(render(MERGE, FleetFormat.POLICY)) == {
        "rules": ["ext4", "vfat", "virtio_net"]}


def test_a_merge_keeping_nothing_or_of_another_kind_is_refused() -> None:
    with pytest.raises(InputError, match=r"^m.json: the merge keeps no module"):
        keep_of({**MERGE, "keep": []}, "m.json")
    with pytest.raises(InputError, match="not a fleet merge"):
        keep_of({"kind": EXPORT_KIND}, "m.json")
    with pytest.raises(InputError, match="schema 7"):
        keep_of({**MERGE, "schema": 7}, "m.json")
    assert mkosi_pattern("dm_crypt") == "dm[_-]crypt"
