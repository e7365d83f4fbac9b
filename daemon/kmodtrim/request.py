"""Every option and choice of a request, declared once.

The CLI's parser (cli/parser.py), the D-Bus option parsing and the D-Bus client derive
their flags, choices, types and help from ``OPTIONS``; the choices are StrEnums. Nothing
here imports more than the standard library: the CLI parses arguments before it loads
anything heavy.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Initramfs(StrEnum):
    """Which initramfs generator runs after a change."""

    AUTO = "auto"
    SKIP = "skip"
    DRACUT = "dracut"
    UPDATE_INITRAMFS = "update-initramfs"
    KERNEL_INSTALL = "kernel-install"


class Backend(StrEnum):
    """Which package manager is kept truthful (``stash``: none)."""

    AUTO = "auto"
    STASH = "stash"
    DPKG = "dpkg"
    RPM = "rpm"


class Cloud(StrEnum):
    """Whose boot-disk and NIC drivers a plan keeps (platforms.py declares each one's)."""

    AUTO = "auto"  # the detected platform; every one offline or when unrecognised
    ALL = "all"
    KVM = "kvm"
    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    HYPERV = "hyperv"
    OCI = "oci"
    ALIBABA = "alibaba"
    VMWARE = "vmware"
    XEN = "xen"


class KernelAction(StrEnum):
    ADD = "add"
    REMOVE = "remove"


class FleetAction(StrEnum):
    """``kmodtrim fleet ACTION``."""

    MERGE = "merge"
    EXPORT = "export"


class FleetFormat(StrEnum):
    """What ``kmodtrim fleet export`` writes a merge as."""

    MKOSI = "mkosi"  # a mkosi.conf.d drop-in: [Content] KernelModules=
    DRACUT = "dracut"  # a dracut.conf.d file: add_drivers+=
    POLICY = "policy"  # a kmodtrim policy.d drop-in: rules


class Option(NamedTuple):  # not a dataclass: making one costs a quick verb's start-up
    """One option: its key (the D-Bus ``a{sv}`` key and the argparse dest), D-Bus
    signature, CLI flag, help, choices and the verbs / D-Bus members that take it."""

    key: str
    signature: str  # "s", "as" or "b" ("u", "d" for CLI-only numbers)
    flag: str  # "" for a D-Bus-only option
    help: str
    verbs: frozenset[str]  # CLI verbs
    members: frozenset[str] = frozenset()  # D-Bus Manager methods
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    short: str | None = None


_CHANGE = frozenset({"apply", "rollback", "restore", "kernel-event"})
_PLANNING = frozenset({"plan", "explain", "apply", "kernel-event", "index", "observe",
                       "status", "restore"})

OPTIONS: tuple[Option, ...] = (
    Option("kernel", "s", "--kernel",
           "kernel version (default: the running kernel, else the newest installed)",
           _PLANNING, frozenset({"Plan", "Explain", "Trim", "Restore"}), metavar="KVER"),
    Option("observed", "as", "--observed",
           "modules seen loaded: names one per line, '#' comments, /proc/modules or lsmod "
           "lines (repeatable)", frozenset({"plan", "explain", "apply", "observe"}),
           frozenset({"Plan", "Explain", "Trim"}), metavar="FILE"),
    Option("policy", "s", "--policy",
           "policy file to use instead of ROOT/etc/kmodtrim/policy.toml",
           frozenset({"plan", "explain", "apply", "kernel-event", "status"}),
           frozenset({"Plan", "Explain", "Trim"}), metavar="FILE"),
    Option("cloud", "as", "--cloud",
           "keep the boot-disk and NIC drivers of this platform (repeatable; 'auto' detects "
           "the running one, 'all' every one; default: the policy's clouds, 'auto')",
           frozenset({"plan", "explain", "apply"}), frozenset({"Plan", "Explain", "Trim"}),
           choices=tuple(Cloud), metavar="NAME"),
    Option("force", "b", "--force", "trim even before the minimum observation is met",
           frozenset({"apply"}), frozenset({"Trim"})),
    Option("dry_run", "b", "--dry-run", "show what would happen, change nothing",
           _CHANGE - {"kernel-event"}, frozenset({"Trim", "Rollback", "Restore"})),
    Option("initramfs", "s", "--initramfs",
           "initramfs generator (default: the policy's, else detected)", _CHANGE,
           frozenset({"Trim", "Rollback", "Restore", "KernelEvent"}),
           choices=tuple(Initramfs)),
    Option("backend", "s", "--backend",
           "package-manager backend (default: the policy's)", _CHANGE,
           frozenset({"Trim", "Rollback", "Restore", "KernelEvent"}),
           choices=tuple(Backend)),
    Option("on_demand", "b", "--on-demand",
           "(for modprobe's install lines, see kmodtrim(8)) restore one module modprobe asked "
           "for and record it as requested by modprobe; the CLI (NAME, then the options "
           "modprobe gives) then loads it with those options, having waited at most a few "
           "seconds for a running operation", frozenset({"restore"}),
           frozenset({"Restore"})),
    Option("latest", "b", "", "roll back the latest generation (no GEN given)",
           frozenset(), frozenset({"Rollback"})),
    # The fleet's options (CLI only: fleets run them through their own tools).
    Option("export", "b", "--export",
           "print this host's observation export (a JSON document for 'fleet merge')",
           frozenset({"observe"})),
    Option("salt", "s", "--salt",
           "hash /etc/machine-id keyed with SALT (HMAC-SHA256) rather than plain sha256",
           frozenset({"observe"}), metavar="SALT"),
    Option("min_hosts", "u", "--min-hosts",
           "keep a module seen on at least N hosts (default 1)", frozenset({"fleet"}),
           metavar="N"),
    Option("min_share", "d", "--min-share",
           "keep a module seen on at least this share of the hosts: 0.5 or 50%%",
           frozenset({"fleet"}), metavar="P"),
    Option("format", "s", "--format", "what to write the merge as", frozenset({"fleet"}),
           choices=tuple(FleetFormat)),
    Option("output", "s", "--output", "write to FILE (atomically) instead of stdout",
           frozenset({"observe", "fleet"}), metavar="FILE", short="-o"),
)

OPTION_BY_KEY = {option.key: option for option in OPTIONS}


def options_of(member: str) -> tuple[Option, ...]:
    """The options the D-Bus method ``member`` takes."""
    return tuple(o for o in OPTIONS if member in o.members)
