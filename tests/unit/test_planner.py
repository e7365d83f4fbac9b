"""seeds_from and make_plan: every kind of evidence, policy rules, restores, warnings,
firmware — on in-memory indexes and policies."""

from __future__ import annotations

from typing import Literal

from kmodtrim.closure import Reason
from kmodtrim.observe import DeviceModalias, MountedFilesystem, ObservedName, RootDriver
from kmodtrim.planner import Evidence, Plan, make_plan, seeds_from

from .fakeindex import INROOT_MODDIR, KERNEL, index_of, module
from .fakepolicy import SOURCE, policy_of

NO_POLICY = policy_of()


def observed(*names: str, source: str = "observed.txt") -> tuple[ObservedName, ...]:
    return tuple(ObservedName(name, source, line) for line, name in enumerate(names, start=1))


def kept(plan: Plan) -> set[str]:
    return {m.name for m in plan.keep}


def removed(plan: Plan) -> set[str]:
    return {m.name for m in plan.remove}


def reasons(plan: Plan, name: str) -> list[Reason]:
    return [r for m in plan.keep if m.name == name for r in m.reasons]


# -- evidence ----------------------------------------------------------------------------


def test_observed_module_is_kept_naming_its_file_and_line() -> None:
    index = index_of(module("virtio_net"), module("e1000"))
    plan = make_plan(index, Evidence(observed=observed("virtio_net")), NO_POLICY)
    assert kept(plan) == {"virtio_net"}
    assert removed(plan) == {"e1000"}
    assert reasons(plan, "virtio_net") == [Reason("observed", "observed.txt:1")]


def test_unknown_observed_name_is_warned_about_and_seeds_nothing() -> None:
    index = index_of(module("virtio_net"))
    plan = make_plan(index, Evidence(observed=observed("virtio_net", "typo_net")), NO_POLICY)
    assert kept(plan) == {"virtio_net"}
    assert plan.warnings == (
        f"observed module 'typo_net' (observed.txt:2) is not in kernel {KERNEL}: "
        "neither a module, a builtin nor an alias",
    )


def test_observed_builtin_is_listed_as_needed_without_a_warning() -> None:
    index = index_of(module("virtio_net"), builtins=["ext4"])
    plan = make_plan(index, Evidence(observed=observed("ext4")), NO_POLICY)
    assert plan.builtin_needed == ("ext4",)
    assert plan.warnings == ()
    assert kept(plan) == set()


def test_loaded_module_is_kept_as_loaded_from_proc_modules() -> None:
    index = index_of(module("virtio_net"), module("e1000"))
    loaded = (ObservedName("virtio_net", "/proc/modules", None),)
    plan = make_plan(index, Evidence(loaded=loaded), NO_POLICY)
    assert reasons(plan, "virtio_net") == [Reason("loaded", "/proc/modules")]


def test_present_device_keeps_the_driver_its_modalias_matches() -> None:
    index = index_of(module("virtio_net", aliases=["virtio:d00000001v*"]),
                     module("virtio_blk", aliases=["virtio:d00000002v*"]))
    device = DeviceModalias("/devices/pci0000:00/0000:00:03.0/virtio0", "virtio:d00000001v00001AF4")
    plan = make_plan(index, Evidence(devices=[device]), NO_POLICY)
    assert kept(plan) == {"virtio_net"}
    assert reasons(plan, "virtio_net") == [
        Reason("hardware", f"{device.modalias} at {device.devpath}")]


def test_driver_of_the_root_filesystem_type_is_boot_critical() -> None:
    index = index_of(module("ext4", aliases=["fs-ext4"]), module("xfs", aliases=["fs-xfs"]))
    root_fs = MountedFilesystem("ext4", "/", "/proc/self/mounts", "/dev/vda1")
    plan = make_plan(index, Evidence(filesystems=[root_fs]), NO_POLICY)
    assert kept(plan) == {"ext4"}
    assert reasons(plan, "ext4") == [
        Reason("boot-critical", "ext4 filesystem on / (/proc/self/mounts)")]


def test_filesystem_on_a_data_mount_is_kept_as_observed_not_boot_critical() -> None:
    index = index_of(module("xfs", aliases=["fs-xfs"]))
    data = MountedFilesystem("xfs", "/srv/data", "/etc/fstab", "UUID=1234")
    plan = make_plan(index, Evidence(filesystems=[data]), NO_POLICY)
    assert [r.kind for r in reasons(plan, "xfs")] == ["observed"]


def test_pseudo_filesystems_keep_no_module() -> None:
    index = index_of(module("tmpfs_helper", aliases=["fs-tmpfs"]))
    mounts = [MountedFilesystem("tmpfs", "/run", "/proc/self/mounts"),
              MountedFilesystem("proc", "/proc", "/proc/self/mounts")]
    plan = make_plan(index, Evidence(filesystems=mounts), NO_POLICY)
    assert kept(plan) == set()


def test_fuse_subtype_keeps_the_fuse_module() -> None:
    index = index_of(module("fuse", aliases=["fs-fuse"]))
    sshfs = MountedFilesystem("fuse.sshfs", "/mnt/remote", "/proc/self/mounts")
    assert kept(make_plan(index, Evidence(filesystems=[sshfs]), NO_POLICY)) == {"fuse"}


def test_root_storage_driver_is_boot_critical_with_its_dependencies() -> None:
    index = index_of(module("virtio_blk", depends=["virtio_ring"]), module("virtio_ring"),
                     module("nvme"))
    driver = RootDriver("virtio_blk", "/", "/devices/pci0000:00/0000:00:04.0/virtio1")
    plan = make_plan(index, Evidence(root_drivers=[driver]), NO_POLICY)
    assert kept(plan) == {"virtio_blk", "virtio_ring"}
    assert reasons(plan, "virtio_blk") == [
        Reason("boot-critical", f"storage driver of / ({driver.devpath})")]


def test_seeds_list_every_root_reason_per_name() -> None:
    index = index_of(module("virtio_net", aliases=["virtio:d00000001v*"]))
    evidence = Evidence(
        observed=observed("virtio_net"),
        loaded=(ObservedName("virtio_net", "/proc/modules", None),),
        devices=[DeviceModalias("/devices/virtio0", "virtio:d00000001v00001AF4")],
    )
    seeds, warnings = seeds_from(index, evidence, NO_POLICY)
    assert [r.kind for r in seeds["virtio_net"]] == ["loaded", "observed", "hardware"]
    assert warnings == []


# -- policy ------------------------------------------------------------------------------


def test_policy_keep_rule_keeps_every_matching_module_with_its_rule() -> None:
    index = index_of(module("virtio_net"), module("virtio_blk"), module("e1000"))
    plan = make_plan(index, Evidence(), policy_of("virtio_*"))
    assert kept(plan) == {"virtio_net", "virtio_blk"}
    assert reasons(plan, "virtio_blk") == [Reason("policy", f"policy rule 'virtio_*' ({SOURCE})")]


def test_later_exclude_rule_cancels_an_earlier_keep_glob() -> None:
    index = index_of(module("virtio_net"), module("virtio_balloon"))
    plan = make_plan(index, Evidence(), policy_of("virtio_*", "-virtio_balloon"))
    assert kept(plan) == {"virtio_net"}


def test_later_keep_rule_wins_over_an_earlier_exclude() -> None:
    index = index_of(module("virtio_net"), module("virtio_balloon"))
    plan = make_plan(index, Evidence(), policy_of("-virtio_*", "virtio_balloon"))
    assert kept(plan) == {"virtio_balloon"}


def test_policy_exclude_does_not_override_observation() -> None:
    index = index_of(module("virtio_balloon"))
    plan = make_plan(index, Evidence(observed=observed("virtio_balloon")),
                     policy_of("-virtio_balloon"))
    assert kept(plan) == {"virtio_balloon"}


def test_policy_exclude_does_not_drop_a_dependency_of_a_kept_module() -> None:
    index = index_of(module("virtio_net", depends=["failover"]), module("failover"))
    plan = make_plan(index, Evidence(observed=observed("virtio_net")), policy_of("-failover"))
    assert kept(plan) == {"virtio_net", "failover"}


def test_policy_path_rule_keeps_a_directory_of_modules() -> None:
    index = index_of(module("e1000", relpath="kernel/drivers/net/ethernet/intel/e1000.ko"),
                     module("ext4", relpath="kernel/fs/ext4/ext4.ko"))
    plan = make_plan(index, Evidence(), policy_of("kernel/drivers/net/*"))
    assert kept(plan) == {"e1000"}


def test_policy_alias_rule_keeps_the_module_with_that_alias() -> None:
    index = index_of(module("crc32c_generic", aliases=["crypto-crc32c"]), module("other"))
    plan = make_plan(index, Evidence(), policy_of("alias:crypto-crc32c"))
    assert kept(plan) == {"crc32c_generic"}


def test_policy_literal_rule_naming_no_module_is_warned_about() -> None:
    index = index_of(module("virtio_net"))
    plan = make_plan(index, Evidence(), policy_of("virtio_nett"))
    assert plan.warnings == (
        f"policy rule 'virtio_nett' ({SOURCE}) names no module of kernel {KERNEL}",)


def test_policy_rule_naming_a_builtin_is_not_warned_about() -> None:
    index = index_of(module("virtio_net"), builtins=["ext4"])
    assert make_plan(index, Evidence(), policy_of("ext4")).warnings == ()


def test_policy_glob_matching_nothing_is_not_warned_about() -> None:
    index = index_of(module("virtio_net"))
    assert make_plan(index, Evidence(), policy_of("hv_*")).warnings == ()


def test_preset_rules_naming_modules_this_kernel_lacks_are_not_warned_about() -> None:
    index = index_of(module("virtio_net"))
    plan = make_plan(index, Evidence(), policy_of(presets=["cloud-boot"]))
    assert plan.warnings == ()
    assert "virtio_net" in kept(plan)


# -- restored modules --------------------------------------------------------------------


def test_restored_module_is_kept_until_forgotten() -> None:
    index = index_of(module("virtio_gpu"), module("other"))
    restored = (ObservedName("virtio_gpu", "restored on 2026-01-02", None),)
    plan = make_plan(index, Evidence(restored=restored), NO_POLICY)
    assert kept(plan) == {"virtio_gpu"}
    assert reasons(plan, "virtio_gpu") == [Reason("restored", "restored on 2026-01-02")]


def test_policy_exclude_lets_a_restored_module_go() -> None:
    index = index_of(module("virtio_gpu"))
    restored = (ObservedName("virtio_gpu", "restored on 2026-01-02", None),)
    plan = make_plan(index, Evidence(restored=restored), policy_of("-virtio_*"))
    assert kept(plan) == set()
    assert removed(plan) == {"virtio_gpu"}


def test_policy_keep_rule_does_not_stop_a_restore_from_counting() -> None:
    index = index_of(module("virtio_gpu"))
    restored = (ObservedName("virtio_gpu", "restored", None),)
    plan = make_plan(index, Evidence(restored=restored), policy_of("virtio_gpu"))
    assert [r.kind for r in reasons(plan, "virtio_gpu")] == ["restored", "policy"]


def test_restored_name_this_kernel_lacks_is_silently_skipped() -> None:
    index = index_of(module("virtio_net"))
    restored = (ObservedName("only_in_older_kernels", "restored", None),)
    plan = make_plan(index, Evidence(restored=restored), NO_POLICY)
    assert kept(plan) == set()
    assert plan.warnings == ()


# -- the plan ----------------------------------------------------------------------------


def test_every_module_is_either_kept_or_removed_in_name_order() -> None:
    index = index_of(module("c"), module("a", depends=["b"]), module("b"), module("d"))
    plan = make_plan(index, Evidence(observed=observed("a")), NO_POLICY)
    assert [m.name for m in plan.keep] == ["a", "b"]
    assert [m.name for m in plan.remove] == ["c", "d"]


def test_removed_module_takes_its_shadowed_copies_with_it() -> None:
    index = index_of(module("e1000", relpath="updates/e1000.ko",
                            shadowed=["kernel/drivers/net/e1000.ko"]))
    (gone,) = make_plan(index, Evidence(), NO_POLICY).remove
    assert gone.path == f"{INROOT_MODDIR}/updates/e1000.ko"
    assert gone.files == (f"{INROOT_MODDIR}/updates/e1000.ko",
                          f"{INROOT_MODDIR}/kernel/drivers/net/e1000.ko")


def test_plan_paths_are_paths_inside_the_root() -> None:
    index = index_of(module("virtio_net", relpath="kernel/drivers/net/virtio_net.ko.xz"))
    plan = make_plan(index, Evidence(observed=observed("virtio_net")), NO_POLICY)
    assert plan.keep[0].path == f"{INROOT_MODDIR}/kernel/drivers/net/virtio_net.ko.xz"


def test_stashed_module_needed_again_is_kept_marked_stashed() -> None:
    index = index_of(module("virtio_gpu", stashed=True), module("old", stashed=True))
    plan = make_plan(index, Evidence(observed=observed("virtio_gpu")), NO_POLICY)
    assert [(m.name, m.stashed) for m in plan.keep] == [("virtio_gpu", True)]
    assert [(m.name, m.stashed) for m in plan.remove] == [("old", True)]


def test_sizes_add_up_to_the_tree() -> None:
    index = index_of(module("a", size=100), module("b", size=20), module("c", size=3))
    plan = make_plan(index, Evidence(observed=observed("a")), NO_POLICY)
    assert (plan.keep_bytes, plan.remove_bytes, plan.total_bytes) == (100, 23, 123)
    assert plan.total_bytes == index.total_bytes()


def test_dependency_that_names_nothing_is_warned_about_with_its_edge() -> None:
    index = index_of(module("a", depends=["gone"]))
    plan = make_plan(index, Evidence(observed=observed("a")), NO_POLICY)
    assert plan.warnings == ("'gone', wanted as dependency of a, matches no module",)


def test_kept_module_with_a_symbol_nothing_kept_exports_is_warned_about() -> None:
    index = index_of(module("a", undefined=["vanished"]))
    plan = make_plan(index, Evidence(observed=observed("a")), NO_POLICY)
    assert [(u.module, u.symbol, u.provider) for u in plan.unresolved_symbols] == [
        ("a", "vanished", None)]
    assert plan.warnings == ("kept module a needs unknown symbol vanished",)


def test_same_warning_is_given_once() -> None:
    typo = ObservedName("typo", "observed.txt", 1)
    plan = make_plan(index_of(module("a")), Evidence(observed=(typo, typo)), NO_POLICY)
    assert len(plan.warnings) == 1


def test_builtins_needed_are_listed_sorted() -> None:
    index = index_of(module("a", depends=["zz_builtin", "aa_builtin"]),
                     builtins=["zz_builtin", "aa_builtin"])
    plan = make_plan(index, Evidence(observed=observed("a")), NO_POLICY)
    assert plan.builtin_needed == ("aa_builtin", "zz_builtin")


def test_plan_json_names_every_decision_with_its_reasons() -> None:
    index = index_of(module("a", depends=["b"], size=10), module("b", size=5),
                     module("c", size=1))
    doc = make_plan(index, Evidence(observed=observed("a")), NO_POLICY).to_json()
    assert doc["kernel"] == KERNEL
    assert doc["totals"]["keep_modules"] == 2
    assert doc["totals"]["remove_bytes"] == 1
    assert [m["name"] for m in doc["remove"]] == ["c"]
    (b,) = (m for m in doc["keep"] if m["name"] == "b")
    assert b["reasons"] == [{"kind": "depends", "detail": "", "via": "a",
                             "text": "dependency of a"}]


# -- firmware ----------------------------------------------------------------------------


FW = "/lib/firmware"


def firmware_plan(firmware: dict[str, int], *,
                  setting: Literal["trim", "keep"] = "trim") -> Plan:
    index = index_of(module("kept_drv", firmware=["vendor/kept.bin"]),
                     module("gone_drv", firmware=["vendor/gone.bin", "vendor/shared.bin"]),
                     module("also_kept", firmware=["vendor/shared.bin"]))
    return make_plan(index, Evidence(observed=observed("kept_drv", "also_kept")),
                     policy_of(firmware=setting), firmware)


def test_firmware_named_only_by_removed_modules_is_removed() -> None:
    files = {f"{FW}/vendor/kept.bin": 10, f"{FW}/vendor/gone.bin": 20,
             f"{FW}/vendor/shared.bin": 30, f"{FW}/unrelated.bin": 40}
    plan = firmware_plan(files)
    assert [(f.path, f.size, f.wanted_by) for f in plan.firmware_remove] == [
        (f"{FW}/vendor/gone.bin", 20, ("gone_drv",))]
    assert plan.firmware_bytes == 20


def test_compressed_firmware_is_matched_by_its_plain_name() -> None:
    plan = firmware_plan({f"{FW}/vendor/gone.bin.xz": 7, f"{FW}/vendor/gone.bin.zst": 8})
    assert [f.path for f in plan.firmware_remove] == [
        f"{FW}/vendor/gone.bin.xz", f"{FW}/vendor/gone.bin.zst"]


def test_firmware_in_every_search_directory_is_matched() -> None:
    files = {f"{FW}/updates/{KERNEL}/vendor/gone.bin": 1, f"{FW}/{KERNEL}/vendor/gone.bin": 1,
             f"/usr{FW}/vendor/gone.bin": 1}
    assert {f.path for f in firmware_plan(files).firmware_remove} == set(files)


def test_firmware_glob_in_modinfo_matches_every_file_it_names() -> None:
    index = index_of(module("gone_drv", firmware=["iwlwifi-*.ucode"]))
    files = {f"{FW}/iwlwifi-7260-17.ucode": 1, f"{FW}/iwlwifi-8000C-36.ucode.xz": 1,
             f"{FW}/other.ucode": 1}
    plan = make_plan(index, Evidence(), NO_POLICY, files)
    assert [f.path for f in plan.firmware_remove] == [
        f"{FW}/iwlwifi-7260-17.ucode", f"{FW}/iwlwifi-8000C-36.ucode.xz"]


def test_policy_firmware_keep_removes_no_firmware() -> None:
    plan = firmware_plan({f"{FW}/vendor/gone.bin": 20}, setting="keep")
    assert plan.firmware_remove == ()


def test_firmware_is_not_considered_without_a_listing() -> None:
    index = index_of(module("gone_drv", firmware=["vendor/gone.bin"]))
    assert make_plan(index, Evidence(), NO_POLICY).firmware_remove == ()


def test_firmware_link_target_a_kept_module_reaches_stays() -> None:
    # A link maps to its in-root target (scan_firmware reads it): decided in memory.
    index = index_of(module("kept_drv", firmware=["vendor/kept.bin"]),
                     module("gone_drv", firmware=["vendor/gone.bin"]))
    files: dict[str, int | str] = {
        f"{FW}/vendor/kept.bin": f"{FW}/vendor/real-v2.bin", f"{FW}/vendor/real-v2.bin": 1,
        f"{FW}/vendor/gone.bin": f"{FW}/vendor/gone-v1.bin", f"{FW}/vendor/gone-v1.bin": 1}
    plan = make_plan(index, Evidence(observed=observed("kept_drv")), NO_POLICY, files)
    assert {f.path for f in plan.firmware_remove} == {
        f"{FW}/vendor/gone.bin", f"{FW}/vendor/gone-v1.bin"}
