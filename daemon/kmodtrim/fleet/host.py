"""A host's identity, read below a root: os-release's image fields, a hash of
/etc/machine-id (never the id itself), the DMI platform and the installed kernels."""

from __future__ import annotations

import hashlib
import hmac
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelNotFoundError
from ..observe.inroot import _inroot_realpath, _read_text
from ..paths import default_kernel, installed_kernels

OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")
OS_RELEASE_KEYS = {"ID": "id", "VERSION_ID": "version_id", "IMAGE_ID": "image_id",
                   "IMAGE_VERSION": "image_version"}
MACHINE_ID = "/etc/machine-id"


@dataclass(frozen=True)
class HostFacts:
    """What identifies a host and its image; None where the root does not say."""

    machine_id_sha256: str | None
    salted: bool
    image: dict[str, str | None]
    platform: dict[str, str | None]
    kernels: tuple[str, ...]
    kernel: str | None


def _platform(root: Path) -> dict[str, str | None]:
    """DMI vendor and product, the hypervisor type (observe/platform.py reads them once)
    and the platform platforms.detect recognises from them (None where absent)."""
    from ..observe.platform import read_platform_facts
    from ..platforms import detect

    facts = read_platform_facts(root)
    found = detect(facts)
    return {"vendor": facts.sys_vendor or None, "product": facts.product_name or None,
            "hypervisor": facts.hypervisor_type or None,
            "detected": found.platform if found is not None else None}


def parse_os_release(text: str) -> dict[str, str | None]:
    """The image fields of an os-release file (shell-style ``KEY=value`` lines, quoted or
    not; os-release(5)); None for a field the file lacks."""
    found: dict[str, str | None] = dict.fromkeys(OS_RELEASE_KEYS.values())
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key not in OS_RELEASE_KEYS:
            continue
        try:
            words = shlex.split(value)
        except ValueError:  # an unbalanced quote: take the line as written
            words = [value.strip("\"'")]
        found[OS_RELEASE_KEYS[key]] = " ".join(words) or None
    return found


def hash_machine_id(machine_id: str, salt: str | None) -> str:
    """sha256 of the machine id, or with a salt HMAC-SHA256 keyed with it (hosts are told
    apart in a merge without the id being recoverable from a document)."""
    data = machine_id.encode()
    if salt:
        return hmac.new(salt.encode(), data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _valid_machine_id(text: str | None) -> str | None:
    value = (text or "").strip().lower()
    ok = len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    return value if ok and value != "0" * 32 else None  # "uninitialized", empty: none


def read_host_facts(root: Path, salt: str | None = None) -> HostFacts:
    """The facts of the host (or image) at ``root``. Raises ObservationError for a file
    that is not a regular file or is too large."""
    image: dict[str, str | None] = dict.fromkeys(OS_RELEASE_KEYS.values())
    for name in OS_RELEASE_FILES:
        text = _read_text(root, _inroot_realpath(root, name))
        if text is not None:
            image = parse_os_release(text)
            break
    machine_id = _valid_machine_id(_read_text(root, _inroot_realpath(root, MACHINE_ID)))
    try:
        kernel: str | None = default_kernel(root)
    except KernelNotFoundError:
        kernel = None
    return HostFacts(
        machine_id_sha256=hash_machine_id(machine_id, salt) if machine_id else None,
        salted=bool(salt) and machine_id is not None,
        image=image,
        platform=_platform(root),
        kernels=tuple(installed_kernels(root)),
        kernel=kernel,
    )
