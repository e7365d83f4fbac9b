"""The JSON documents ``kmodtrim --json`` prints, described in one place.

Every document carries ``"schema": SCHEMA`` (bumped when a key changes meaning or goes;
keys may be added). One concept has one key in every verb: ``generation`` is a
generation's number, ``removed_files`` / ``removed_bytes`` what is out of the tree,
``taken_out`` / ``put_back`` the paths an operation moved. A test runs every verb with
``--json`` and validates its document against this description.
"""

from __future__ import annotations

from typing import Any

SCHEMA = 1

Field = tuple[tuple[type, ...], str]  # accepted JSON types, meaning

_N = type(None)
_OUTCOME: dict[str, Field] = {
    "schema": ((int,), "document schema"),
    "generation": ((int, _N), "the generation made (none for a dry run or a no-op)"),
    "dry_run": ((bool,), "nothing was changed"),
    "taken_out": ((list,), "in-root paths taken out of the tree"),
    "put_back": ((list,), "in-root paths put back"),
    "notes": ((list,), "what else to know (packages, busy package manager, …)"),
    "damaged": ((list,), "files not put back: their stash copy is damaged"),
    "regen": ((dict,), "per kernel: depmod and initramfs results"),
    "packages_removed": ((list,), "packages removed whole"),
    "packages_reinstalled": ((list,), "packages reinstalled from the stash"),
    "description": ((str, _N), "the new generation's description"),
    "removed_files": ((int, _N), "files out of the tree afterwards"),
    "removed_bytes": ((int, _N), "their bytes"),
    "stash_bytes_on_disk": ((int,), "what the stash takes on disk afterwards"),
    "tree_bytes_out": ((int,), "bytes of the files it took out of the tree"),
    "tree_bytes_in": ((int,), "bytes of the files it put back"),
    "stash_growth_bytes": ((int,), "how much the stash grew (negative: shrank); a dry run: "
                                   "at most this"),
    "boot_growth_bytes": ((int,), "how much the initramfs images under /boot grew (the "
                                  "previous image is kept until the new one has booted)"),
    "net_freed_bytes": ((int,), "tree bytes out − tree bytes in − stash growth − /boot "
                                "growth"),
    "job": ((int,), "the kmodtrimd job that ran it (only through the daemon)"),
}

DOCUMENTS: dict[str, dict[str, Field]] = {
    "status": {
        "schema": ((int,), "document schema"),
        "root": ((str,), "the root"),
        "kernel": ((str, _N), "the kernel meant by default (none installed: null)"),
        "mode": ((str,), "the policy's mode (manual or auto)"),
        "daemon_running": ((bool, _N), "whether kmodtrimd runs (null: an image root)"),
        "generation": ((int,), "the current generation"),
        "description": ((str,), "what it did"),
        "removed_files": ((int,), "files out of the tree"),
        "removed_bytes": ((int,), "their bytes"),
        "stash_bytes_on_disk": ((int,), "what the stash takes on disk"),
        "net_freed_bytes": ((int,), "bytes out of the tree less the stash on disk and the "
                                    "previous initramfs images kept under /boot"),
        "boot_kept_bytes": ((int,), "previous initramfs images kept under /boot until the "
                                    "new ones have booted"),
        "from_archive_files": ((int,), "files out of the tree the package archive restores "
                                       "(no local copy)"),
        "observation": ((dict,), "boots and days observed, what the policy asks, met"),
        "restored_modules": ((list,), "modules kept for having been restored"),
        "interrupted_operation": ((bool,), "an operation is to be finished or undone"),
        "pending": ((str, _N), "what the next change command does first"),
        "problems": ((list,), "damaged or lost records (the state was rebuilt)"),
        "damaged": ((list,), "files that cannot be restored: stash copies missing or "
                             "damaged; with --verify also archive versions no longer served"),
        "verified": ((bool,), "every copy was read and hashed (--verify)"),
    },
    "history": {
        "schema": ((int,), "document schema"),
        "generations": ((list,), "generation, created, action, description, "
                                 "removed_files, removed_bytes, current — oldest first"),
    },
    "show": {
        "schema": ((int,), "document schema"),
        "generation": ((int,), "the generation"),
        "created": ((str,), "when"),
        "action": ((str,), "apply, rollback, restore, forget, salvage"),
        "description": ((str,), "what it did"),
        "rollback_to": ((int, _N), "the generation a rollback returned to"),
        "removed_files": ((int,), "files out of the tree in this state"),
        "removed_bytes": ((int,), "their bytes"),
        "taken_out": ((list,), "path, kind, module, size of each file it took out"),
        "put_back": ((list,), "the same for each file it put back"),
        "packages_out": ((list,), "packages out of the system in this state"),
        "packages_removed": ((list,), "packages it removed whole"),
        "packages_reinstalled": ((list,), "packages it reinstalled"),
        "kernels": ((list,), "kernels whose trees changed"),
        "regen": ((dict,), "per kernel: depmod and initramfs results"),
    },
    "plan": {
        "schema": ((int,), "document schema"),
        "root": ((str,), "the root"), "kernel": ((str,), "the kernel"),
        "totals": ((dict,), "counts and bytes kept, removed, firmware"),
        "keep_bytes": ((int,), "bytes kept"), "remove_bytes": ((int,), "bytes removed"),
        "total_bytes": ((int,), "all module bytes"),
        "keep": ((list,), "kept modules with their reasons"),
        "remove": ((list,), "removed modules"),
        "builtin_needed": ((list,), "builtins the closure reached"),
        "firmware_remove": ((list,), "firmware files removed"),
        "unresolved_symbols": ((list,), "symbols no kept module or the kernel provides"),
        "warnings": ((list,), "what to look at"),
        "kernel_exports_source": ((str,), "where the kernel's exports came from"),
        "platform": ((dict, _N), "platforms whose boot-disk and NIC drivers are kept "
                                         "(names) and why those (source); null: none"),
        "sources": ((dict,), "[stash] keep and budget_mib; local_files/_bytes kept in the "
                             "stash, archive_files/_bytes left to the archive, tree_bytes_out, "
                             "net_freed_bytes (at least: the stash compresses)"),
    },
    "explain": {
        "schema": ((int,), "document schema"),
        "name": ((str,), "the module"), "status": ((str,), "kept, removed or builtin"),
        "path": ((str, _N), "its in-root path"), "size": ((int,), "its bytes"),
        "chains": ((list,), "each chain of reasons that keeps it"),
        "policy_rule": ((str, _N), "the last policy rule matching it"),
        "now": ((str,), "what is true of it now"),
        "on_demand": ((dict, _N), "whether modprobe brings it back: state (on-demand, "
                                  "excluded, no-line, after-apply or requested), requests "
                                  "(what modprobe may be asked for it), text; null: it "
                                  "stays in the tree and was not asked for"),
    },
    "observe": {
        "schema": ((int,), "document schema"), "root": ((str,), "the root"),
        "kernel": ((str, _N), "the kernel"),
        "loaded": ((list,), "modules loaded now"),
        "observed": ((list,), "observations on record and from --observed files"),
        "restored": ((list,), "modules restored by hand or on demand"),
        "devices": ((list,), "devices with a modalias and their drivers"),
        "filesystems": ((list,), "mounted filesystems"),
        "root_drivers": ((list,), "the boot storage chain"),
    },
    "index": {
        "schema": ((int,), "document schema"), "kernel": ((str,), "the kernel"),
        "module_dir": ((str,), "its module tree"), "modules": ((int,), "loadable modules"),
        "builtins": ((int,), "builtin modules"), "aliases": ((int,), "aliases"),
        "total_bytes": ((int,), "module bytes"), "kernel_exports": ((int,), "exports"),
        "kernel_exports_source": ((str,), "where they came from"),
        "files": ((int,), "module files"), "parsed": ((int,), "read from their files"),
        "cached": ((int,), "taken from the cache"), "seconds": ((float, int), "time"),
        "parse_errors": ((list,), "unreadable modules"),
    },
    "apply": _OUTCOME, "rollback": _OUTCOME, "restore": _OUTCOME, "kernel-event": _OUTCOME,
}
OPTIONAL = frozenset({"job"})  # keys a document may lack

# The fleet's documents are files passed between hosts and tools (an export is read back
# by `fleet merge` and `--observed`, a merge by `fleet export`, `apply --observed` and
# Ansible): each carries "kind" and its own "schema", bumped on its own.
FLEET_SCHEMA = 1
EXPORT_KIND = "kmodtrim-observation-export"
MERGE_KIND = "kmodtrim-fleet-merge"
FLEET_DOCUMENTS: dict[str, dict[str, Field]] = {
    EXPORT_KIND: {
        "schema": ((int,), "document schema (FLEET_SCHEMA)"),
        "kind": ((str,), EXPORT_KIND),
        "host": ((dict,), "machine_id_sha256 (sha256 of /etc/machine-id, or HMAC-SHA256 "
                          "keyed with --salt; never the id itself), salted"),
        "image": ((dict,), "os-release id, version_id, image_id, image_version (null when "
                           "absent)"),
        "platform": ((dict,), "DMI sys_vendor, product_name and /sys/hypervisor type "
                              "(null when absent), and the platform detected from them "
                              "(kvm, aws, ...; null when none is recognised)"),
        "kernels": ((list,), "kernels installed under the root"),
        "kernel": ((str, _N), "the kernel meant by default"),
        "kernel_family": ((str, _N), "its MAJOR.MINOR: merges take one family"),
        "boots": ((int,), "boots recorded"),
        "modules": ((list,), "name, first_seen, last_seen (ISO 8601), boots, how "
                             "(proc-modules, uevent, modalias, restored, recorded) — by name"),
        "exported": ((str,), "when the export was made (ISO 8601)"),
    },
    MERGE_KIND: {
        "schema": ((int,), "document schema (FLEET_SCHEMA)"),
        "kind": ((str,), MERGE_KIND),
        "kernel_family": ((str, _N), "the inputs' kernel family"),
        "hosts": ((int,), "distinct hosts merged (a host exported twice counts once)"),
        "threshold": ((dict,), "min_hosts, min_share (null unless given) and the hosts "
                               "a module needs"),
        "images": ((list,), "image (ID VERSION), hosts — by image"),
        "inputs": ((list,), "host (hashed id), kind (export or osquery) — by host"),
        "keep": ((list,), "the modules seen on at least the threshold's hosts, by name"),
        "modules": ((list,), "every module seen: name, hosts, images, boots, how, "
                             "first_seen, last_seen, kept — by name"),
    },
}


def problems(verb: str, doc: Any) -> list[str]:
    """What in ``doc`` does not match the description of ``verb``'s document (a verb, or
    a fleet document's kind)."""
    fleet = verb in FLEET_DOCUMENTS
    described = FLEET_DOCUMENTS[verb] if fleet else DOCUMENTS[verb]
    schema = FLEET_SCHEMA if fleet else SCHEMA
    if not isinstance(doc, dict):
        return [f"{verb}: not an object"]
    found = []
    if doc.get("schema") != schema:
        found.append(f"{verb}: schema is {doc.get('schema')!r}, not {schema}")
    for key, value in doc.items():
        if key not in described:
            found.append(f"{verb}: undescribed key {key!r}")
        elif not isinstance(value, described[key][0]) or (
                isinstance(value, bool) and bool not in described[key][0]):
            found.append(f"{verb}: {key!r} is {type(value).__name__}")
    found += [f"{verb}: missing key {key!r}" for key in described
              if key not in doc and key not in OPTIONAL]
    return found
