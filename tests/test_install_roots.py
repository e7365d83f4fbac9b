"""The built .deb installs with apt into clean Debian 12 (bookworm) and Debian 13 (trixie)
roots from each release's own archive, and works there with that release's Python and
pydantic (1.10 on Debian 12, 2 on Debian 13): both programs start, ``plan`` and
``explain`` run on a module tree inside the root, the shipped policy loads, and malformed
policies get the same one-line errors as under this test run's pydantic 2.

The roots are ``debootstrap --variant=minbase`` trees cached under .cache/roots
(tests/debroots.py); every test installs into a fresh copy. Needs root, debootstrap and
the network to deb.debian.org on the first run (later runs reuse the downloaded debs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from debbuild import build_kmodtrim_deb, project_version
from debroots import SUITES, apt_install, chroot, need_root_tools, scratch_copy
from modbuild import ModSpec, build_tree
from need import need
from pkgbuild import sh

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "policy_cases.py"
KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("virtio-thing", imports=("core_fn",), depends=("core",),
            aliases=("pci:v00001AF4d00001000sv*sd*bc*sc*i*",)),
    ModSpec("unused", exports=("unused_fn",)),
    ModSpec("unused_user", imports=("unused_fn",), depends=("unused",)),
)
IMAGE = "/srv/image"  # an image root inside the installed system: kmodtrim --root
OBSERVED = "/srv/observed"


@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_root_tools()
    return build_kmodtrim_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def pydantic2_cases() -> dict[str, Any]:
    """The policy cases under this run's pydantic 2 (the reference)."""
    proc = subprocess.run([sys.executable, str(CASES)], capture_output=True, text=True,
                          timeout=120, check=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon")})
    result: dict[str, Any] = json.loads(proc.stdout)
    assert result["pydantic"].startswith("2.")
    return result


@pytest.fixture(params=sorted(SUITES), scope="module")
def installed(request: pytest.FixtureRequest, built_deb: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A fresh copy of the SUITE root with the .deb installed by apt."""
    suite: str = request.param
    with scratch_copy(suite, tmp_path_factory.mktemp(suite) / "root") as root:
        shutil.copy2(built_deb, root / "tmp" / built_deb.name)
        proc = apt_install(root, f"/tmp/{built_deb.name}")
        # Only that release's archive served the dependencies.
        assert "kmodtrim" in proc.stdout
        yield suite, root


def run(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return chroot(root, *argv, check=False, timeout=300)


def test_the_deb_installs_with_its_releases_packages(installed: tuple[str, Path]) -> None:
    suite, root = installed
    status = chroot(root, "dpkg-query", "-W", "-f", "${Status} ${Version}\n",
                    "kmodtrim").stdout
    assert status.strip() == f"install ok installed {project_version()}"
    os_release = (root / "etc/os-release").read_text()
    assert f'VERSION_ID="{SUITES[suite]}"' in os_release
    pydantic = chroot(root, "dpkg-query", "-W", "-f", "${Version}",
                      "python3-pydantic").stdout
    assert pydantic.startswith("1.10." if suite == "bookworm" else "2."), pydantic
    # Nothing came from outside the release: its archive is the only source, and every
    # dependency is satisfied.
    sources = (root / "etc/apt/sources.list").read_text().split()
    assert sources == ["deb", "http://deb.debian.org/debian", suite, "main"], sources
    assert not list((root / "etc/apt/sources.list.d").iterdir())
    broken = run(root, "apt-get", "check")
    assert broken.returncode == 0, broken.stdout + broken.stderr
    for path in ("usr/share/man/man8/kmodtrim.8.gz", "usr/share/man/man5/kmodtrim-policy.5.gz",
                 "usr/share/bash-completion/completions/kmodtrim",
                 "usr/share/zsh/vendor-completions/_kmodtrim", "etc/kmodtrim/policy.toml"):
        assert (root / path).is_file(), path


def test_both_programs_start(installed: tuple[str, Path]) -> None:
    _, root = installed
    for program in ("kmodtrim", "kmodtrimd"):
        proc = run(root, program, "--version")
        assert proc.returncode == 0, proc.stderr
        assert project_version() in proc.stdout + proc.stderr


def test_plan_and_explain_on_a_module_tree_in_the_root(installed: tuple[str, Path]) -> None:
    need("gcc", "ld")  # to build modules
    _, root = installed
    image = root / IMAGE.lstrip("/")
    build_tree(image, KVER, SPECS)
    sh("depmod", "-b", image, KVER)
    (root / OBSERVED.lstrip("/")).write_text("virtio-thing 16384 0 - Live 0x0\n")
    policy = image / "etc/kmodtrim/policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text("presets = []\nclouds = []\n")

    proc = run(root, "kmodtrim", "plan", "--root", IMAGE, "--observed", OBSERVED, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kernel"] == KVER
    assert {m["name"] for m in doc["keep"]} == {"core", "virtio_thing"}
    assert {m["name"] for m in doc["remove"]} == {"unused", "unused_user"}

    proc = run(root, "kmodtrim", "explain", "core", "--root", IMAGE, "--observed", OBSERVED)
    assert proc.returncode == 0, proc.stderr
    assert "core: KEPT" in proc.stdout and "virtio_thing" in proc.stdout


def test_a_malformed_policy_is_one_line_naming_file_line_and_key(
        installed: tuple[str, Path]) -> None:
    _, root = installed
    image = root / "srv/bad"
    (image / "lib/modules").mkdir(parents=True)
    (image / "etc/kmodtrim").mkdir(parents=True)
    (image / "etc/kmodtrim/policy.toml").write_text('mode = "manual"\nmdoe = "auto"\n')
    proc = run(root, "kmodtrim", "plan", "--root", "/srv/bad")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.endswith(
        "/srv/bad/etc/kmodtrim/policy.toml:2: unknown key 'mdoe' (did you mean 'mode'?); "
        "valid keys at the top level: backend, clouds, firmware, initramfs, min_observation, "
        "mode, presets, remove_packages, rules, stash, stash_compression"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_policies_validate_as_under_pydantic_2(installed: tuple[str, Path],
                                               pydantic2_cases: dict[str, Any]) -> None:
    """The release's own pydantic gives the same settings and the same messages for the
    shipped policy and every case of tests/policy_cases.py."""
    suite, root = installed
    shutil.copy2(CASES, root / "tmp/policy_cases.py")
    proc = run(root, "python3", "/tmp/policy_cases.py", "--shipped", "/etc/kmodtrim/policy.toml")
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout)
    assert theirs["pydantic"].startswith("1.10." if suite == "bookworm" else "2.")
    assert theirs["frozen"]
    shipped = theirs["results"].pop("shipped")
    assert shipped["settings"] == theirs["results"]["empty"]["settings"]
    assert theirs["results"] == pydantic2_cases["results"]


def test_nothing_is_mounted_in_the_root(installed: tuple[str, Path]) -> None:
    _, root = installed
    with open("/proc/self/mounts") as mounts:
        assert not [m for m in mounts.read().splitlines()
                    if m.split()[1].startswith(os.fspath(root))]
