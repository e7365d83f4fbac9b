"""The fleet merge and its inputs, in memory: exports and osquery result lines parsed into
host observations, merged with thresholds, refused when they do not fit."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from kmodtrim.documents import EXPORT_KIND, MERGE_KIND, problems
from kmodtrim.errors import InputError
from kmodtrim.fleet.merge import Threshold, merge_observations, parse_min_hosts, parse_min_share
from kmodtrim.fleet.osquery import parse_osquery_log
from kmodtrim.fleet.read import parse_merge_input
from kmodtrim.fleet.sources import FleetInputError, HostObservation, host_of_export

DATA = Path(__file__).resolve().parent.parent / "data"


def export(machine: str | None, modules: dict[str, int], *, family: str | None = "6.1",
           image: str = "debian-cloud", version: str = "20261201",
           schema: int = 1) -> dict[str, Any]:
    """An export document as ``observe --export`` writes it (module → boots seen)."""
    return {
        "schema": schema, "kind": EXPORT_KIND,
        "host": {"machine_id_sha256": machine, "salted": False},
        "image": {"id": "debian", "version_id": "12", "image_id": image,
                  "image_version": version},
        "platform": {"vendor": "QEMU", "product": "Standard PC", "hypervisor": None},
        "kernels": ["6.1.0-28-cloud-amd64"], "kernel": "6.1.0-28-cloud-amd64",
        "kernel_family": family, "boots": max(modules.values(), default=0),
        "modules": [{"name": name, "first_seen": "2026-11-01T08:00:00Z",
                     "last_seen": f"2026-11-{10 + boots:02d}T08:00:00Z", "boots": boots,
                     "how": ["proc-modules"]} for name, boots in sorted(modules.items())],
        "exported": "2026-12-01T00:00:00Z",
    }


def hosts(*docs: dict[str, Any]) -> list[HostObservation]:
    return [host_of_export(doc, f"host{i}.json") for i, doc in enumerate(docs)]


THREE = (
    export("a" * 64, {"virtio_net": 3, "virtio_blk": 3, "ext4": 3, "isofs": 1}),
    export("b" * 64, {"virtio_net": 2, "nvme": 2, "ext4": 2}),
    export("c" * 64, {"virtio_net": 5, "virtio_blk": 5, "dm_crypt": 1},
           version="20261115"),
)


def test_min_hosts_one_keeps_what_any_host_saw() -> None:
    doc = merge_observations(hosts(*THREE), Threshold(min_hosts=1))
    assert doc["keep"] == ["dm_crypt", "ext4", "isofs", "nvme", "virtio_blk", "virtio_net"]
    assert doc["hosts"] == 3 and doc["threshold"]["needed_hosts"] == 1
    assert problems(MERGE_KIND, doc) == []


def test_min_hosts_two_keeps_what_two_hosts_saw() -> None:
    doc = merge_observations(hosts(*THREE), Threshold(min_hosts=2))
    assert doc["keep"] == ["ext4", "virtio_blk", "virtio_net"]
    by_name = {m["name"]: m for m in doc["modules"]}
    assert (by_name["virtio_net"]["hosts"], by_name["virtio_net"]["boots"]) == (3, 10)
    assert by_name["virtio_net"]["images"] == ["debian-cloud 20261115",
                                               "debian-cloud 20261201"]
    assert by_name["isofs"] == {"name": "isofs", "hosts": 1,
                                "images": ["debian-cloud 20261201"], "boots": 1,
                                "how": ["proc-modules"], "first_seen": "2026-11-01T08:00:00Z",
                                "last_seen": "2026-11-11T08:00:00Z", "kept": False}
    assert doc["images"] == [{"image": "debian-cloud 20261115", "hosts": 1},
                             {"image": "debian-cloud 20261201", "hosts": 2}]


@pytest.mark.parametrize(("share", "needed", "keep"), [
    ("1", 3, ["virtio_net"]), ("0.5", 2, ["ext4", "virtio_blk", "virtio_net"]),
    ("34%", 2, ["ext4", "virtio_blk", "virtio_net"]), ("33%", 1, None),
])
def test_min_share_rounds_the_hosts_needed_up(share: str, needed: int,
                                              keep: list[str] | None) -> None:
    doc = merge_observations(hosts(*THREE), Threshold(min_share=parse_min_share(share)))
    assert doc["threshold"]["needed_hosts"] == needed
    if keep is not None:
        assert doc["keep"] == keep


def test_the_merge_is_the_same_whatever_the_order_of_its_inputs() -> None:
    first = merge_observations(hosts(*THREE), Threshold(min_hosts=2))
    for seed in range(5):
        docs = list(THREE)
        random.Random(seed).shuffle(docs)
        again = merge_observations(hosts(*docs), Threshold(min_hosts=2))
        assert json.dumps(again) == json.dumps(first)


def test_a_host_exported_twice_counts_once() -> None:
    earlier = export("a" * 64, {"virtio_net": 1})
    later = export("a" * 64, {"virtio_net": 4, "xfs": 1})
    doc = merge_observations(hosts(earlier, later, THREE[1]), Threshold(min_hosts=2))
    assert doc["hosts"] == 2
    assert doc["keep"] == ["virtio_net"]
    assert {m["name"]: m["boots"] for m in doc["modules"]} == \
        {"ext4": 2, "nvme": 2, "virtio_net": 6, "xfs": 1}


def test_another_kernel_family_is_refused_naming_both_inputs() -> None:
    with pytest.raises(InputError) as exc:
        merge_observations(hosts(THREE[0], export("d" * 64, {"x": 1}, family="6.12")),
                           Threshold())
    assert exc.value.message == ("host1.json: kernel family 6.12, but host0.json is of 6.1: "
                                 "module names differ between kernel families")


def test_another_schema_or_kind_is_refused_in_one_line() -> None:
    with pytest.raises(FleetInputError, match=r"^h.json: an observation export of schema 2; "
                                              r"this kmodtrim merges schema 1$"):
        host_of_export(export("a" * 64, {"x": 1}, schema=2), "h.json")
    merge = merge_observations(hosts(*THREE), Threshold())
    with pytest.raises(FleetInputError, match=r"not an observation export \(merge the exports"):
        parse_merge_input(json.dumps(merge), "m.json")
    with pytest.raises(FleetInputError, match=r"^x.json: 'not a module' is not a module name$"):
        host_of_export(export("a" * 64, {"not a module": 1}), "x.json")


def test_an_export_without_a_machine_id_is_one_host_by_its_content() -> None:
    image = export(None, {"virtio_net": 1})
    one = host_of_export(image, "a.json")
    assert one.host.startswith("anonymous-") and one.host == host_of_export(image, "b.json").host


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", ""])
def test_min_hosts_must_be_a_whole_number_of_hosts(text: str) -> None:
    with pytest.raises(InputError, match="--min-hosts"):
        parse_min_hosts(text)


@pytest.mark.parametrize("text", ["0", "1.5", "101%", "half", "%", "-0.5"])
def test_min_share_must_be_above_zero_and_at_most_one(text: str) -> None:
    with pytest.raises(InputError, match="--min-share"):
        parse_min_share(text)
    assert parse_min_share("50%") == Fraction(1, 2) == parse_min_share("0.5")


# osquery: the lines in tests/data are written in osqueryd's filesystem-logger format
# (differential "added"/"removed" lines, a batched diffResults line, a snapshot line, and
# another query's line). They are not captured from a running osqueryd: osquery is not
# packaged for Debian and cannot be installed here.


def test_osquery_result_lines_give_one_host_each() -> None:
    text = (DATA / "osquery-kernel-modules-results.log").read_text()
    found = parse_osquery_log(text, "osquery.log")
    assert [sorted(h.modules) for h in found] == [
        ["isofs", "net_failover", "virtio_net"], ["nvme", "virtio_net"],
        ["dm_crypt", "virtio_net"]]
    a = found[0]
    assert (a.kind, a.image, a.kernel_family) == ("osquery", "debian-cloud 20261201", "6.1")
    assert (a.modules["virtio_net"].first, a.modules["isofs"].last) == \
        ("2026-12-01T09:00:00Z", "2026-12-01T10:00:00Z")
    assert "vm-a" not in a.host  # only a hash of the identifier goes into a merge
    doc = merge_observations(found + hosts(THREE[0]), Threshold(min_hosts=2))
    assert doc["keep"] == ["isofs", "virtio_net"]
    assert {i["kind"] for i in doc["inputs"]} == {"export", "osquery"}


@pytest.mark.parametrize(("text", "message"), [
    ('{"name": "q", "columns": {}}\n', r"^o.log:1: not an osquery result line"),
    ('{"hostIdentifier": "h", "columns": {"x": "1"}}\n', r"^o.log: no kernel_modules rows"),
    ('{"hostIdentifier": "h"}\nnot json\n', r"^o.log:2: not a JSON line"),
    ('{"hostIdentifier": "h", "columns": {"name": "../x", "size": "1", "used_by": "-", '
     '"status": "Live", "address": "0"}}\n', r"^o.log:1: '../x' is not a module name"),
])
def test_osquery_input_that_does_not_fit_is_refused_naming_the_line(text: str,
                                                                     message: str) -> None:
    with pytest.raises(FleetInputError, match=message):
        parse_merge_input(text, "o.log")


def test_nothing_to_merge_is_an_input_error() -> None:
    with pytest.raises(InputError, match="nothing to merge"):
        merge_observations([], Threshold())
