"""Observation readers: what a root shows about loaded modules, devices and filesystems.

Every reader takes ``root`` (``Path("/")`` for the running system, or an image directory)
and reads only below it; nothing here writes. Sources that do not exist — an image root
usually has no ``/proc`` and no ``/sys`` — give empty results, not errors. All module names
are normalised (``-`` → ``_``) as kmod does.

The package's files: loaded.py reads loaded modules, devices.py device modaliases,
filesystems.py mounts and fstab, platform.py the DMI and hypervisor facts of the
platform, osrelease.py the image's os-release, rootdev.py the root device's driver
chain, inroot.py the root-relative file access they share, exported.py the names in an
``--observed`` file that is an observation export or a fleet merge (JSON).
"""

from __future__ import annotations

from .devices import DeviceModalias, read_modaliases
from .filesystems import (
    FSTAB_FILE,
    MOUNTINFO_FILE,
    MOUNTS_FILES,
    PSEUDO_FILESYSTEMS,
    MountedFilesystem,
    filesystem_module_aliases,
    read_filesystems,
)
from .loaded import (
    PROC_MODULES,
    ObservedName,
    merge_observed,
    parse_observed_text,
    read_observed_file,
    read_proc_modules,
    read_sys_modules,
)
from .platform import read_platform_facts
from .rootdev import ROOT_MOUNTPOINTS, RootDriver, root_device_drivers

__all__ = [
    "FSTAB_FILE",
    "MOUNTINFO_FILE",
    "MOUNTS_FILES",
    "PROC_MODULES",
    "PSEUDO_FILESYSTEMS",
    "ROOT_MOUNTPOINTS",
    "DeviceModalias",
    "MountedFilesystem",
    "ObservedName",
    "RootDriver",
    "filesystem_module_aliases",
    "merge_observed",
    "parse_observed_text",
    "read_filesystems",
    "read_modaliases",
    "read_observed_file",
    "read_platform_facts",
    "read_proc_modules",
    "read_sys_modules",
    "root_device_drivers",
]
