"""The package manager a plan asks about, named from the root's database files alone
(backends/detect.py), is the backend a change resolves (engine/exclusions.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtrim.backends.detect import BACKEND_NAMES, resolved_name
from kmodtrim.engine.exclusions import resolve_backend
from kmodtrim.errors import InputError

ROOTS = {
    "empty": (),
    "dpkg": ("var/lib/dpkg/status",),
    "rpm sysimage": ("usr/lib/sysimage/rpm/rpmdb.sqlite",),
    "rpm var": ("var/lib/rpm/Packages",),
    "both": ("var/lib/dpkg/status", "var/lib/rpm/Packages.db"),
    "rpm dir, no database": ("var/lib/rpm/README",),
}


@pytest.mark.parametrize("files", ROOTS.values(), ids=ROOTS.keys())
@pytest.mark.parametrize("option", ["auto", "stash", *BACKEND_NAMES])
def test_the_name_is_the_resolved_backends(tmp_path: Path, files: tuple[str, ...],
                                           option: str) -> None:
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert resolved_name(tmp_path, option) == resolve_backend(tmp_path, option).name


def test_an_unknown_backend_is_refused_alike(tmp_path: Path) -> None:
    with pytest.raises(InputError) as named:
        resolved_name(tmp_path, "pacman")
    with pytest.raises(InputError) as resolved:
        resolve_backend(tmp_path, "pacman")
    assert named.value.message == resolved.value.message
