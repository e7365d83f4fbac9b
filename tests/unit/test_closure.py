"""closure_of, Closure.why and verify_symbols on in-memory indexes."""

from __future__ import annotations

from kmodtrim.closure import Closure, Reason, UnresolvedSymbol, closure_of, verify_symbols
from kmodtrim.index import ModuleIndex

from .fakeindex import index_of, module

OBSERVED = Reason("observed", "/proc/modules")


def keep(index: ModuleIndex, *names: str, reason: Reason = OBSERVED) -> Closure:
    return closure_of({name: [reason] for name in names}, index)


# -- seeds -------------------------------------------------------------------------------


def test_seed_is_kept_with_its_root_reason() -> None:
    closure = keep(index_of(module("virtio_net"), module("e1000")), "virtio_net")
    assert closure.kept == {"virtio_net": (OBSERVED,)}
    assert closure.unresolved_names == ()


def test_seed_spelt_with_dashes_is_the_module_with_underscores() -> None:
    closure = keep(index_of(module("snd_hda_intel")), "snd-hda-intel")
    assert set(closure.kept) == {"snd_hda_intel"}


def test_seed_that_names_nothing_is_reported_not_dropped() -> None:
    closure = keep(index_of(module("virtio_net")), "no_such_module")
    assert closure.kept == {}
    assert closure.unresolved_names == (("no_such_module", OBSERVED),)


def test_seed_given_as_an_alias_keeps_every_module_matching_it() -> None:
    index = index_of(
        module("virtio_blk", aliases=["virtio:d00000002v*"]),
        module("virtio_net", aliases=["virtio:d00000001v*"]),
    )
    closure = keep(index, "virtio:d00000002v00001AF4")
    assert set(closure.kept) == {"virtio_blk"}


def test_modprobe_d_alias_is_looked_up_before_a_module_of_that_name() -> None:
    index = index_of(module("old_driver"), module("new_driver"),
                     modprobe_aliases=[("old_driver", "new_driver")])
    assert set(keep(index, "old_driver").kept) == {"new_driver"}


def test_symbol_prefixed_seed_keeps_the_module_exporting_it() -> None:
    index = index_of(module("crc32c_generic", exports=["crc32c"]), module("other"))
    assert set(keep(index, "symbol:crc32c").kept) == {"crc32c_generic"}


def test_seed_reached_for_several_reasons_keeps_each_reason() -> None:
    loaded = Reason("loaded", "/proc/modules")
    closure = closure_of({"virtio_net": [OBSERVED, loaded]}, index_of(module("virtio_net")))
    assert closure.kept["virtio_net"] == (OBSERVED, loaded)


# -- edges -------------------------------------------------------------------------------


def test_depends_are_kept_transitively_with_the_module_that_needs_them() -> None:
    index = index_of(
        module("virtio_net", depends=["net_failover"]),
        module("net_failover", depends=["failover"]),
        module("failover"),
        module("unrelated"),
    )
    closure = keep(index, "virtio_net")
    assert set(closure.kept) == {"virtio_net", "net_failover", "failover"}
    assert closure.kept["net_failover"] == (Reason("depends", via="virtio_net"),)
    assert closure.kept["failover"] == (Reason("depends", via="net_failover"),)


def test_module_needed_by_two_modules_keeps_both_edges() -> None:
    index = index_of(module("a", depends=["common"]), module("b", depends=["common"]),
                     module("common"))
    closure = keep(index, "a", "b")
    assert closure.kept["common"] == (Reason("depends", via="a"), Reason("depends", via="b"))


def test_dependency_cycle_terminates_with_every_member_kept() -> None:
    index = index_of(module("a", depends=["b"]), module("b", depends=["c"]),
                     module("c", depends=["a"]))
    assert set(keep(index, "a").kept) == {"a", "b", "c"}


def test_provider_of_an_undefined_symbol_is_kept_naming_the_symbol() -> None:
    index = index_of(module("ext4", undefined=["jbd2_journal_start"]),
                     module("jbd2", exports=["jbd2_journal_start"]))
    closure = keep(index, "ext4")
    assert closure.kept["jbd2"] == (Reason("symbol", "jbd2_journal_start", via="ext4"),)


def test_symbol_the_kernel_exports_pulls_in_no_module() -> None:
    index = index_of(module("ext4", undefined=["printk"]), module("shadow", exports=["printk"]),
                     kernel_exports=["printk"])
    assert set(keep(index, "ext4").kept) == {"ext4"}


def test_first_exporter_in_index_order_provides_a_symbol() -> None:
    index = index_of(module("user", undefined=["shared_sym"]),
                     module("first", exports=["shared_sym"]),
                     module("second", exports=["shared_sym"]))
    assert set(keep(index, "user").kept) == {"user", "first"}


def test_weak_undefined_symbol_pulls_in_no_provider() -> None:
    index = index_of(module("user", weak_undefined=["optional_hook"]),
                     module("hook_provider", exports=["optional_hook"]))
    assert set(keep(index, "user").kept) == {"user"}


def test_softdep_pre_is_kept_with_its_module() -> None:
    index = index_of(module("ext4", softdep_pre=["crc32c"]),
                     module("crc32c_generic", aliases=["crc32c"]))
    closure = keep(index, "ext4")
    assert closure.kept["crc32c_generic"] == (Reason("softdep-pre", via="ext4"),)


def test_softdep_post_is_kept_with_its_module() -> None:
    index = index_of(module("nvme", softdep_post=["nvme_hwmon"]), module("nvme_hwmon"))
    closure = keep(index, "nvme")
    assert closure.kept["nvme_hwmon"] == (Reason("softdep-post", via="nvme"),)


def test_weakdep_is_kept_with_its_module() -> None:
    index = index_of(module("i915", weakdeps=["intel_vsec"]), module("intel_vsec"))
    closure = keep(index, "i915")
    assert closure.kept["intel_vsec"] == (Reason("weakdep", via="i915"),)


def test_modprobe_d_softdep_replaces_the_module_own_softdeps() -> None:
    index = index_of(module("drm", softdep_pre=["own_choice"]), module("own_choice"),
                     module("admin_choice"),
                     modprobe_softdeps={"drm": (["admin_choice"], [])})
    assert set(keep(index, "drm").kept) == {"drm", "admin_choice"}


def test_modprobe_d_weakdep_adds_to_the_module_own_weakdeps() -> None:
    index = index_of(module("drm", weakdeps=["own"]), module("own"), module("added"),
                     modprobe_weakdeps={"drm": ["added"]})
    assert set(keep(index, "drm").kept) == {"drm", "own", "added"}


def test_dependency_that_names_nothing_is_reported_with_its_edge() -> None:
    index = index_of(module("a", softdep_pre=["gone_in_this_kernel"]))
    closure = keep(index, "a")
    assert closure.unresolved_names == (
        ("gone_in_this_kernel", Reason("softdep-pre", via="a")),
    )


# -- builtins ----------------------------------------------------------------------------


def test_builtin_is_reported_as_needed_and_keeps_nothing_on_disk() -> None:
    index = index_of(module("ext4", depends=["mbcache"]), builtins=["mbcache"])
    closure = keep(index, "ext4")
    assert set(closure.kept) == {"ext4"}
    assert closure.builtin_needed == {"mbcache"}
    assert closure.unresolved_names == ()


def test_builtin_reached_by_its_alias_is_needed() -> None:
    index = index_of(builtin_aliases={"fs-ext4": "ext4"}, builtins=["ext4"])
    closure = keep(index, "fs-ext4")
    assert closure.builtin_needed == {"ext4"}
    assert closure.kept == {}


def test_builtin_softdeps_still_keep_loadable_modules() -> None:
    index = index_of(module("crc32c_generic"), builtins=["libcrc32c"],
                     builtin_softdeps={"libcrc32c": (["crc32c_generic"], [])})
    closure = keep(index, "libcrc32c")
    assert set(closure.kept) == {"crc32c_generic"}
    assert closure.kept["crc32c_generic"] == (Reason("softdep-pre", via="libcrc32c"),)


def test_name_both_loadable_and_builtin_counts_as_loadable() -> None:
    index = index_of(module("virtio"), builtins=["virtio"])
    closure = keep(index, "virtio")
    assert set(closure.kept) == {"virtio"}
    assert closure.builtin_needed == frozenset()


# -- why ---------------------------------------------------------------------------------


def test_why_walks_back_from_a_dependency_to_its_root_cause() -> None:
    index = index_of(module("a", depends=["b"]), module("b", depends=["c"]), module("c"))
    chains = keep(index, "a").why("c")
    assert chains == [[
        ("c", Reason("depends", via="b")),
        ("b", Reason("depends", via="a")),
        ("a", OBSERVED),
    ]]


def test_why_gives_one_chain_per_reason() -> None:
    index = index_of(module("a", depends=["common"]), module("b", depends=["common"]),
                     module("common"))
    chains = keep(index, "a", "b").why("common")
    assert [chain[-1][0] for chain in chains] == ["a", "b"]


def test_why_of_a_module_not_kept_is_empty() -> None:
    assert keep(index_of(module("a"), module("b")), "a").why("b") == []


def test_why_stops_at_a_cycle() -> None:
    index = index_of(module("a", depends=["b"]), module("b", depends=["a"]))
    closure = keep(index, "a")
    for chain in closure.why("a") + closure.why("b"):
        names = [name for name, _ in chain]
        assert len(names) == len(set(names))


def test_reason_describes_an_edge_and_a_root_cause_in_one_line() -> None:
    assert Reason("depends", via="tcm_loop").describe() == "dependency of tcm_loop"
    assert Reason("symbol", "crc32c", via="ext4").describe() == \
        "provides symbols to ext4 (crc32c)"
    assert OBSERVED.describe() == "observed (/proc/modules)"
    assert Reason("loaded").describe() == "loaded"


# -- verify_symbols ----------------------------------------------------------------------


def test_kept_set_with_every_provider_verifies_clean() -> None:
    index = index_of(module("ext4", undefined=["jbd2_start", "printk"]),
                     module("jbd2", exports=["jbd2_start"]), kernel_exports=["printk"])
    assert verify_symbols(["ext4", "jbd2"], index) == []


def test_missing_provider_is_reported_naming_the_module_that_would_provide_it() -> None:
    index = index_of(module("ext4", undefined=["jbd2_start"]),
                     module("jbd2", exports=["jbd2_start"]))
    assert verify_symbols(["ext4"], index) == [
        UnresolvedSymbol("ext4", "kernel/drivers/misc/ext4.ko", "jbd2_start", "jbd2"),
    ]


def test_symbol_nobody_exports_is_reported_without_a_provider() -> None:
    index = index_of(module("out_of_tree", undefined=["vanished_api"]))
    assert verify_symbols(["out_of_tree"], index) == [
        UnresolvedSymbol("out_of_tree", "kernel/drivers/misc/out_of_tree.ko",
                         "vanished_api", None),
    ]


def test_weak_undefined_symbols_need_no_provider_to_verify() -> None:
    index = index_of(module("user", weak_undefined=["optional_hook"]))
    assert verify_symbols(["user"], index) == []


def test_verify_reports_problems_sorted_by_module_and_symbol() -> None:
    index = index_of(module("b", undefined=["z", "y"]), module("a", undefined=["x"]))
    found = [(p.module, p.symbol) for p in verify_symbols(["b", "a"], index)]
    assert found == [("a", "x"), ("b", "y"), ("b", "z")]


def test_closure_of_seeds_always_verifies() -> None:
    index = index_of(
        module("top", depends=["mid"], undefined=["mid_fn", "low_fn", "printk"]),
        module("mid", undefined=["low_fn"], exports=["mid_fn"]),
        module("low", exports=["low_fn"]),
        kernel_exports=["printk"],
    )
    closure = keep(index, "top")
    assert set(closure.kept) == {"top", "mid", "low"}
    assert verify_symbols(closure.kept, index) == []
