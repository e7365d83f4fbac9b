"""Built-in policy presets: named lists of rules that keep whole families of modules.

Each preset is a tuple of rule strings with the same syntax as ``rules`` in the policy
file (see ``policy/``): a module name glob (``virtio_*``), an alias glob
(``alias:crypto-crc32c``), or a path glob relative to the module directory (anything with a
``/``); a leading ``-`` would exclude. Presets deliberately contain no exclusions: presets
are expanded one after another and, with last-match-wins, an exclusion in one preset would
silently cancel another preset listed before it.

Names that do not exist in a given kernel are harmless (a rule that matches nothing keeps
nothing); some entries exist only in older or newer kernels than others (``nvme_common``
appeared in 6.x, ``nf_log_ipv4`` was merged into ``nf_log_syslog`` in 5.12, ``hyperv_fb``
was replaced by ``hyperv_drm``). Dependencies need not be listed: the planner keeps the
dependency closure of every module a preset keeps.

This module has no third-party imports so the CLI can list presets cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .platforms import every_platform_drivers

# Boot disk, NIC and console drivers of every platform (platforms.py declares them per
# platform; the planner keeps those of the platform it runs on without this preset). A
# policy lists this preset to keep every cloud's drivers wherever it runs.
_CLOUD_BOOT: tuple[str, ...] = every_platform_drivers()

# Filesystems a VM mounts or may mount: root filesystems, EFI and config drives, the ones
# systemd mounts itself, and the codepages vfat asks for by name.
_FILESYSTEMS: tuple[str, ...] = (
    "ext4",
    "jbd2",
    "mbcache",
    "xfs",
    "btrfs",
    "vfat",
    "fat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
    "isofs",  # cloud-init NoCloud / ConfigDrive seed on a CD-ROM
    "udf",  # Azure's provisioning media (ovf-env.xml)
    "squashfs",
    "overlay",
    "fuse",
    "autofs4",
    "efivarfs",
    "configfs",
    "binfmt_misc",
)

# iptables (legacy and nft back-ends), nftables, conntrack and NAT: what ufw, firewalld,
# nftables.service and iptables-persistent load when a rule set is (re)loaded, possibly
# long after boot. Only the common matches/targets: exotic ones are left to observation.
_NETFILTER_CORE: tuple[str, ...] = (
    "x_tables",
    "ip_tables",
    "ip6_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_filter",
    "ip6table_nat",
    "ip6table_mangle",
    "ip6table_raw",
    "nfnetlink",
    "nfnetlink_log",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_ct",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_limit",
    "nft_log",
    "nft_counter",
    "nft_hash",
    "nft_numgen",
    "nft_quota",
    "nft_objref",
    "nft_connlimit",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "nf_log_syslog",
    "nf_log_common",
    "nf_log_ipv4",
    "nf_log_ipv6",
    "xt_conntrack",
    "xt_state",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "xt_nat",
    "xt_comment",
    "xt_multiport",
    "xt_tcpudp",
    "xt_addrtype",
    "xt_mark",
    "xt_connmark",
    "xt_LOG",
    "xt_NFLOG",
    "xt_limit",
    "xt_recent",
    "xt_hl",
    "xt_owner",
    "xt_pkttype",
    "xt_tcpmss",
    "xt_TCPMSS",
    "xt_CHECKSUM",
    "xt_CT",
    "ipt_REJECT",
    "ip6t_REJECT",
    "ip6t_rt",
)

# Helpers the kernel loads by name (request_module) that neither a device nor a
# ``depends=`` line reveals: checksum algorithms filesystems and the block layer ask the
# crypto API for, the address families DHCP and systemd need, and the device nodes kmod
# pre-creates so that opening them loads the driver. Kept tight on purpose: alias globs
# here must never pull in whole categories (e.g. no "alias:crypto-*").
_KERNEL_REQUESTED: tuple[str, ...] = (
    # Checksums: ext4/jbd2/xfs/btrfs/libcrc32c (crc32c), f2fs and NICs (crc32), the
    # T10-PI of sd_mod (crct10dif) and of NVMe (crc64-rocksoft), btrfs's other hashes.
    # Matching by alias keeps both the CPU-accelerated and the generic implementation.
    "alias:crypto-crc32c",
    "alias:crypto-crc32",
    "alias:crypto-crct10dif",
    "alias:crypto-crc64-rocksoft",
    "alias:crypto-xxhash64",
    "alias:crypto-blake2b-256",
    "alias:crypto-sha256",
    # Address families: Unix, IPv6, packet sockets (DHCP clients). Built in almost
    # everywhere; modules in some custom kernels.
    "alias:net-pf-1",
    "alias:net-pf-10",
    "alias:net-pf-17",
    # Static device nodes whose first open loads the module.
    "alias:devname:loop-control",
    "alias:devname:fuse",
    "alias:devname:autofs",
    "alias:devname:mapper/control",
)

# Not a default. What Docker, Kubernetes (kube-proxy, CNI plugins), LXD/Incus and libvirt
# load on demand when containers or VMs start: bridges, overlay, veth and tunnels, IPVS,
# ipset, every iptables match and nft expression, vhost, tun/tap, 9p, traffic control.
_CONTAINER_HOST: tuple[str, ...] = (
    "bridge",
    "stp",
    "llc",
    "br_netfilter",
    "overlay",
    "veth",
    "vxlan",
    "geneve",
    "ipip",
    "ip_gre",
    "wireguard",
    "macvlan",
    "macvtap",
    "ipvlan",
    "dummy",
    "tun",
    "tap",
    "ip_vs",
    "ip_vs_*",
    "ip_set",
    "ip_set_*",
    "nf_conntrack*",
    "nf_nat*",
    "nf_tables",
    "nft_*",
    "x_tables",
    "xt_*",
    "ipt_*",
    "ip6t_*",
    "vhost",
    "vhost_iotlb",
    "vhost_net",
    "vhost_vsock",
    "9p",
    "9pnet",
    "9pnet_virtio",
    "virtiofs",
    "sch_netem",
    "sch_htb",
    "sch_tbf",
    "sch_prio",
    "sch_sfq",
    "sch_ingress",
    "cls_bpf",
    "cls_u32",
    "cls_fw",
    "cls_matchall",
    "cls_flower",
    "act_bpf",
    "act_gact",
    "act_mirred",
)

PRESETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cloud-boot": _CLOUD_BOOT,
        "filesystems": _FILESYSTEMS,
        "netfilter-core": _NETFILTER_CORE,
        "kernel-requested": _KERNEL_REQUESTED,
        "container-host": _CONTAINER_HOST,
    }
)

PRESET_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "cloud-boot": "boot disk, NIC and console drivers of every major cloud and hypervisor",
        "filesystems": "root, EFI and config-drive filesystems, systemd's own mounts, codepages",
        "netfilter-core": "iptables, nftables, conntrack and NAT basics used by host firewalls",
        "kernel-requested": "checksums, address families and device nodes the kernel "
        "loads on request",
        "container-host": "bridges, overlay, veth/vxlan, IPVS, ipset, vhost, tun/tap, 9p "
        "and tc for container and VM hosts",
    }
)

# None by default: the platform set (platforms.py) keeps this platform's boot-disk and NIC
# drivers, and filesystems, netfilter and what the kernel requests by name are restored on
# demand (ondemand.py: modprobe's install lines) when something asks for them. A policy
# lists presets to keep such families on disk anyway (e.g. for machines that must work
# with the package archive unreachable).
DEFAULT_PRESETS: tuple[str, ...] = ()
