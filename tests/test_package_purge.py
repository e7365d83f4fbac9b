"""Removing kmodtrim for good removes its on-demand modprobe.d file (its install lines
would run a kmodtrim that is gone); an upgrade or a plain remove keeps it. The built .deb
is installed with apt into a copy of the cached Debian 12 root (tests/debroots.py), then
upgraded, removed and purged with dpkg there; the RPM spec's %postun is run in the same
root as rpm runs it, with $1 = 1 (upgrade) and 0 (erase)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from debbuild import build_kmodtrim_deb
from debroots import apt_install, chroot, need_root_tools, scratch_copy
from kmodtrim.ondemand import CONF_PATH, KernelModules, conf_text
from pkgbuild import need

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parent.parent / "packaging" / "rpm" / "kmodtrim.spec"
OTHER = "etc/modprobe.d/local.conf"  # the administrator's: never touched


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A copy of the bookworm root with the .deb installed by apt; and the .deb's path
    inside it."""
    need_root_tools()
    deb = build_kmodtrim_deb(tmp_path_factory.mktemp("deb"))
    with scratch_copy("bookworm", tmp_path_factory.mktemp("bookworm") / "root") as root:
        shutil.copy2(deb, root / "tmp" / deb.name)
        apt_install(root, f"/tmp/{deb.name}")
        yield root, f"/tmp/{deb.name}"


def _write_conf(root: Path) -> Path:
    """kmodtrim's on-demand file as a trim writes it, and the administrator's own."""
    text = conf_text([KernelModules("6.1.0-28-amd64", {"xfs": ("fs-xfs",)}, {})])
    assert text is not None
    conf = root / CONF_PATH.lstrip("/")
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)
    (root / OTHER).write_text("options loop max_loop=8\n")
    return conf


def test_purging_the_deb_removes_the_on_demand_file(installed: tuple[Path, str]) -> None:
    root, deb = installed
    conf = _write_conf(root)
    chroot(root, "dpkg", "--install", deb)  # an upgrade (the same version again)
    assert conf.is_file()
    chroot(root, "dpkg", "--remove", "kmodtrim")  # removed, its configuration kept
    assert conf.is_file()
    chroot(root, "dpkg", "--purge", "kmodtrim")
    assert not conf.exists()
    assert (root / OTHER).read_text() == "options loop max_loop=8\n"
    assert not (root / "usr/bin/kmodtrim").exists()


def test_erasing_the_rpm_removes_the_on_demand_file(installed: tuple[Path, str]) -> None:
    need("rpmspec")
    parsed = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True,
                            check=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    section = parsed.stdout.split("\n%postun\n", 1)[1].split("\n%files", 1)[0]
    # The scriptlet as rpm runs it, less the systemd macro (not expanded on Debian).
    body = "\n".join(line for line in section.splitlines() if not line.startswith("%"))
    assert "/etc/modprobe.d/kmodtrim-on-demand.conf" in body
    root, _ = installed
    conf = _write_conf(root)
    (root / "tmp/postun").write_text(body + "\n")
    chroot(root, "sh", "-e", "/tmp/postun", "1")  # an upgrade
    assert conf.is_file()
    chroot(root, "sh", "-e", "/tmp/postun", "0")  # erased
    assert not conf.exists()
    assert (root / OTHER).read_text() == "options loop max_loop=8\n"
