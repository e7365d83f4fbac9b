"""The platform set: detection from DMI, /sys/hypervisor and bus devices (as
systemd-detect-virt and cloud-init's ds-identify read them), the choice between detected,
asked-for and every platform, and the planner's platform reasons — on plain data."""

from __future__ import annotations

import pytest

from kmodtrim.closure import Reason
from kmodtrim.planner import Evidence, make_plan
from kmodtrim.platforms import (
    COMMON,
    PLATFORMS,
    PlatformChoice,
    PlatformFacts,
    choose,
    detect,
    every_platform_drivers,
)
from kmodtrim.presets import DEFAULT_PRESETS, PRESETS

from .fakeindex import index_of, module
from .fakepolicy import policy_of

QEMU = PlatformFacts(sys_vendor="QEMU", product_name="Standard PC (i440FX + PIIX, 1996)",
                     bios_vendor="SeaBIOS")
NOTHING = PlatformFacts()


@pytest.mark.parametrize(("facts", "platform"), [
    (QEMU, "kvm"),
    (PlatformFacts(sys_vendor="Amazon EC2", product_name="m6i.large"), "aws"),
    (PlatformFacts(bios_vendor="Amazon EC2"), "aws"),
    (PlatformFacts(hypervisor_type="xen", hypervisor_uuid="ec2e1916-9099-7caf-fd21"), "aws"),
    (PlatformFacts(sys_vendor="Google", product_name="Google Compute Engine"), "gcp"),
    (PlatformFacts(sys_vendor="Microsoft Corporation", product_name="Virtual Machine",
                   chassis_asset_tag="7783-7084-3265-9085-8269-3286-77"), "azure"),
    (PlatformFacts(sys_vendor="Microsoft Corporation", product_name="Virtual Machine"),
     "hyperv"),
    (PlatformFacts(sys_vendor="QEMU", chassis_asset_tag="OracleCloud.com"), "oci"),
    (PlatformFacts(sys_vendor="Alibaba Cloud", product_name="Alibaba Cloud ECS"), "alibaba"),
    (PlatformFacts(sys_vendor="VMware, Inc.", product_name="VMware7,1"), "vmware"),
    (PlatformFacts(hypervisor_type="xen"), "xen"),
    (PlatformFacts(sys_vendor="OpenStack Foundation", product_name="OpenStack Nova"), "kvm"),
    (PlatformFacts(sys_vendor="DigitalOcean", product_name="Droplet"), "kvm"),
    (PlatformFacts(sys_vendor="Hetzner", product_name="vServer"), "kvm"),
    # No DMI (Firecracker, some microVMs): the bus devices tell.
    (PlatformFacts(modaliases=("virtio:d00000001v00001AF4",
                               "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00")),
     "kvm"),
    (PlatformFacts(modaliases=("vmbus:0200000001000000",)), "hyperv"),
    (PlatformFacts(modaliases=("pci:v00001D0Fd0000EC20sv00001D0Fsd0000EC20bc02sc00i00",)),
     "aws"),
])
def test_platform_is_detected_as_ds_identify_would(facts: PlatformFacts,
                                                   platform: str) -> None:
    detected = detect(facts)
    assert detected is not None and detected.platform == platform, detected


@pytest.mark.parametrize("facts", [
    NOTHING,
    PlatformFacts(sys_vendor="Dell Inc.", product_name="PowerEdge R650"),
    PlatformFacts(modaliases=("pci:v00008086d00001572sv00008086sd00000000bc02sc00i00",)),
])
def test_bare_metal_or_nothing_is_not_recognised(facts: PlatformFacts) -> None:
    assert detect(facts) is None


def test_auto_keeps_the_detected_platform_only() -> None:
    choice = choose(["auto"], QEMU)
    assert choice.names == ("kvm",)
    assert choice.source == "detected: DMI sys_vendor 'QEMU'"


def test_auto_offline_keeps_every_platform_and_says_how_to_narrow_it() -> None:
    choice = choose(["auto"], NOTHING)
    assert choice.names == tuple(PLATFORMS) and choice.every
    assert choice.source == "offline: the image's platform is unknown; name it with --cloud"


def test_auto_on_an_unknown_machine_keeps_every_platform() -> None:
    choice = choose(["auto"], PlatformFacts(sys_vendor="Dell Inc."))
    assert choice.every and choice.source.startswith("no platform recognised")


def test_named_platforms_win_over_detection() -> None:
    assert choose(["aws", "gcp"], QEMU) == PlatformChoice(("aws", "gcp"),
                                                          "asked for: aws, gcp")


def test_auto_with_names_adds_the_detected_one() -> None:
    choice = choose(["auto", "aws"], QEMU)
    assert choice.names == ("kvm", "aws")
    assert choice.source == "detected: DMI sys_vendor 'QEMU'; also asked for: aws"


def test_auto_with_names_offline_is_still_every_platform() -> None:
    assert choose(["aws", "auto"], NOTHING).every


def test_all_and_none() -> None:
    assert choose(["all"], QEMU).every
    assert choose([], QEMU) == PlatformChoice((), "none asked for")
    assert PlatformChoice((), "none asked for").drivers() == {}


def test_drivers_name_their_platforms_and_the_common_set() -> None:
    drivers = choose(["kvm", "gcp"], NOTHING).drivers()
    assert drivers["virtio_scsi"] == "kvm, gcp"
    assert drivers["gve"] == "gcp"
    assert drivers["sd_mod"] == "every platform"
    assert "hv_storvsc" not in drivers and "ena" not in drivers


def test_an_instance_family_move_stays_bootable() -> None:
    # Xen -> Nitro on AWS; Hyper-V synthetic -> MANA/Mellanox VFs and NVMe on Azure.
    aws = set(PLATFORMS["aws"].drivers)
    assert {"xen_blkfront", "xen_netfront", "nvme", "ena"} <= aws
    azure = set(PLATFORMS["azure"].drivers)
    assert {"hv_storvsc", "hv_netvsc", "mana", "mlx5_core", "nvme"} <= azure


def test_the_cloud_choices_are_the_platforms_with_auto_and_all() -> None:
    from kmodtrim.platforms import CHOICES

    assert ("auto", "all", *PLATFORMS) == CHOICES


def test_cloud_boot_preset_is_every_platform_and_no_preset_is_a_default() -> None:
    assert set(PRESETS["cloud-boot"]) == {d for p in PLATFORMS.values() for d in p.drivers} \
        | set(COMMON)
    assert PRESETS["cloud-boot"] == every_platform_drivers()
    assert DEFAULT_PRESETS == ()


def test_planner_keeps_this_platforms_drivers_with_the_reason() -> None:
    index = index_of(module("virtio_scsi"), module("hv_storvsc"), module("sd_mod"),
                     module("ena"), module("xfs"))
    plan = make_plan(index, Evidence(platform=choose(["auto"], QEMU)), policy_of())
    assert {m.name for m in plan.keep} == {"virtio_scsi", "sd_mod"}
    (scsi,) = (m for m in plan.keep if m.name == "virtio_scsi")
    assert scsi.reasons == (Reason("platform", "boot disk or NIC of kvm"),)
    assert plan.to_json()["platform"] == {
        "names": ["kvm"], "source": "detected: DMI sys_vendor 'QEMU'"}


def test_planner_keeps_every_platforms_drivers_offline() -> None:
    index = index_of(module("virtio_scsi"), module("hv_storvsc"), module("ena"),
                     module("xfs"))
    plan = make_plan(index, Evidence(platform=choose(["auto"], NOTHING)), policy_of())
    assert {m.name for m in plan.keep} == {"virtio_scsi", "hv_storvsc", "ena"}


def test_a_policy_exclusion_lets_a_platform_driver_go() -> None:
    index = index_of(module("virtio_scsi"), module("virtio_blk"))
    plan = make_plan(index, Evidence(platform=choose(["kvm"], NOTHING)),
                     policy_of("-virtio_scsi"))
    assert {m.name for m in plan.keep} == {"virtio_blk"}


def test_no_platform_choice_keeps_no_platform_driver() -> None:
    index = index_of(module("virtio_scsi"))
    plan = make_plan(index, Evidence(), policy_of())
    assert plan.keep == () and plan.to_json()["platform"] is None
