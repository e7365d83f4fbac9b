"""A host's identity, read below a root: os-release's image fields, a hash of
/etc/machine-id (never the id itself), the DMI platform and the installed kernels."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from ..errors import KernelNotFoundError
from ..observe.inroot import _inroot_realpath, _read_text
from ..observe.osrelease import parse_os_release as parse_os_release  # re-exported
from ..observe.osrelease import read_os_release
from ..paths import default_kernel, installed_kernels

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
    image = read_os_release(root)
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
