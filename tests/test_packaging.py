"""Debian and RPM packaging: the metadata parses with the distributions' own tools, every
file in units/ is packaged, and the Debian package builds and lays its files out where
systemd, D-Bus, polkit, kernel-install and run-parts look for them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from debbuild import BUILD_INPUTS, SYSTEM_ENV, build_kmodtrim_deb, project_version
from need import need

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "packaging" / "debian"
SPEC = REPO / "packaging" / "rpm" / "kmodtrim.spec"
UNITS = REPO / "units"

RUNTIME_DEPENDS = {
    "kmod": None,
    "python3": ">= 3.11",
    "python3-pyelftools": None,
    # 1.10 on Debian 12 and Ubuntu 24.04, 2 on Debian 13 (kmodtrim/policy/compat.py).
    "python3-pydantic": ">= 1.10",
    "python3-dbus-next": None,
    "python3-systemd": None,
    "python3-zstandard": None,
}

def deb822(path: Path) -> list[dict[str, str]]:
    """Paragraphs of a deb822 file (debian/control): field -> value, continuation lines
    joined with newlines. Raises ValueError on a line that is neither."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    field = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, field = {}, ""
        elif line[0] in " \t":
            if not field:
                raise ValueError(f"{path}:{number}: continuation line without a field")
            current[field] += "\n" + line.strip()
        else:
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9-]*):(.*)$", line)
            if not match:
                raise ValueError(f"{path}:{number}: not a field: {line!r}")
            field = match.group(1)
            if field in current:
                raise ValueError(f"{path}:{number}: duplicate field {field}")
            current[field] = match.group(2).strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def relations(value: str) -> dict[str, str | None]:
    """Package -> version constraint of a Depends-style field (first alternative)."""
    out: dict[str, str | None] = {}
    for item in value.replace("\n", " ").split(","):
        item = item.split("|")[0].strip()
        if not item:
            continue
        match = re.match(r"^(\S+)\s*(?:\(([^)]*)\))?$", item)
        assert match, f"cannot read relation {item!r}"
        out[match.group(1)] = match.group(2).strip() if match.group(2) else None
    return out


def deb822_text(text: str) -> dict[str, str]:
    """Top-level fields of one deb822 paragraph given as text (continuations dropped)."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()
                                         if line and not line.startswith(" "))}


# --- Debian metadata -----------------------------------------------------------------


def test_debian_changelog_parses_and_matches_project_version() -> None:
    need("dpkg-parsechangelog")
    proc = subprocess.run(["dpkg-parsechangelog", "-l", str(DEBIAN / "changelog")],
                          capture_output=True, text=True, env=SYSTEM_ENV, check=True)
    fields = deb822_text(proc.stdout)
    assert fields["Source"] == "kmodtrim"
    # Native package: no Debian revision, so the version is the project's.
    assert fields["Version"] == project_version()


def test_debian_control_declares_the_runtime_dependencies() -> None:
    source, binary = deb822(DEBIAN / "control")
    assert source["Source"] == "kmodtrim"
    assert "debhelper-compat (= 13)" in source["Build-Depends"]
    # The man pages and completion are generated at build time (kmodtrim.cli.docs).
    build_depends = relations(source["Build-Depends"])
    assert {"python3-argparse-manpage", "python3-shtab"} <= set(build_depends)
    assert binary["Package"] == "kmodtrim"
    assert binary["Architecture"] == "all"
    depends = relations(binary["Depends"])
    for package, constraint in RUNTIME_DEPENDS.items():
        assert package in depends, f"Depends lacks {package}"
        assert depends[package] == constraint, f"{package}: {depends[package]!r}"
    assert binary["Description"].split("\n")[0]


def test_debian_source_format_and_rules_are_in_order() -> None:
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"
    rules = DEBIAN / "rules"
    assert rules.stat().st_mode & stat.S_IXUSR, "debian/rules must be executable"
    assert rules.read_text().startswith("#!/usr/bin/make -f\n")
    # make -n parses the makefile without running a recipe.
    need("make")
    subprocess.run(["make", "-n", "-f", str(rules), "clean"], cwd=REPO, env=SYSTEM_ENV,
                   capture_output=True, check=True)


# --- RPM metadata --------------------------------------------------------------------


def test_rpm_spec_parses() -> None:
    need("rpmspec")
    proc = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True,
                          env=SYSTEM_ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "error:" not in proc.stderr
    # The fallbacks for systemd-rpm-macros expanded; no unit path is left as a macro.
    assert "%{_unitdir}" not in proc.stdout
    assert "/usr/lib/systemd/system/kmodtrimd.service" in proc.stdout


def test_rpm_spec_version_and_requires() -> None:
    need("rpmspec")
    nv = subprocess.run(["rpmspec", "-q", "--srpm", "--qf", "%{NAME} %{VERSION}\n",
                         str(SPEC)], capture_output=True, text=True, env=SYSTEM_ENV,
                        check=True)
    assert nv.stdout.split() == ["kmodtrim", project_version()]
    requires = subprocess.run(["rpmspec", "-q", "--requires", str(SPEC)],
                              capture_output=True, text=True, env=SYSTEM_ENV, check=True)
    got = {line.split()[0]: " ".join(line.split()[1:]) or None
           for line in requires.stdout.splitlines() if line.strip()}
    for package, constraint in RUNTIME_DEPENDS.items():
        assert package in got, f"Requires lacks {package}"
        assert got[package] == constraint, f"{package}: {got[package]!r}"


def test_rpm_source_package_builds(tmp_path: Path) -> None:
    """rpmbuild -bs here; a binary build (-bb) needs Fedora's pyproject-rpm-macros
    (%pyproject_buildrequires, %pyproject_wheel), which no Debian package provides."""
    need("rpmbuild", "rpm")
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    prefix = f"kmodtrim-{project_version()}"
    with tarfile.open(top / "SOURCES" / f"{prefix}.tar.gz", "w:gz") as tar:
        for name in (*BUILD_INPUTS, "packaging"):
            tar.add(REPO / name, arcname=f"{prefix}/{name}",
                    filter=lambda info: None if "__pycache__" in info.name else info)
    proc = subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "-bs", str(SPEC)],
                          capture_output=True, text=True, env=SYSTEM_ENV, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srpm = top / "SRPMS" / f"{prefix}-1.src.rpm"
    assert srpm.is_file(), proc.stdout
    requires = subprocess.run(["rpm", "-qp", "--requires", str(srpm)], capture_output=True,
                              text=True, env=SYSTEM_ENV, check=True).stdout.splitlines()
    # A source package's requirements are its BuildRequires.
    assert {"python3-argparse-manpage", "python3-shtab", "pyproject-rpm-macros"} <= {
        line.split()[0] for line in requires}


# --- Nothing forgotten ---------------------------------------------------------------


def test_every_file_in_units_is_packaged_for_debian_and_rpm() -> None:
    debian_text = "\n".join(p.read_text() for p in
                            (DEBIAN / "rules", DEBIAN / "kmodtrim.install"))
    spec_text = SPEC.read_text()
    # /etc/kernel hooks are Debian's mechanism (Fedora uses kernel-install only); Debian
    # enables services through debhelper rather than presets.
    debian_only = {"kernel-postinst.d-kmodtrim", "kernel-postrm.d-kmodtrim"}
    rpm_only = {"kmodtrim.preset"}
    for unit in sorted(p.name for p in UNITS.iterdir()):
        if unit not in rpm_only:
            assert f"units/{unit}" in debian_text, f"{unit} is not in the .deb"
        if unit not in debian_only:
            assert f"units/{unit}" in spec_text, f"{unit} is not in the .rpm"


# --- The Debian package, built -------------------------------------------------------

@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_kmodtrim_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="module")
def unpacked(built_deb: Path) -> Path:
    root = built_deb.parent / "root"
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(root)], env=SYSTEM_ENV,
                   check=True)
    return root


def _unit_dir(root: Path) -> Path:
    for candidate in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (root / candidate / "kmodtrimd.service").exists():
            return root / candidate
    raise AssertionError("kmodtrimd.service is not in the package")


def test_deb_places_every_file_where_its_consumer_looks(unpacked: Path) -> None:
    same_as_source = {
        "usr/share/dbus-1/system.d/org.kmodtrim.KmodTrim1.conf": "org.kmodtrim.KmodTrim1.conf",
        "usr/share/dbus-1/interfaces/org.kmodtrim.KmodTrim1.xml": "org.kmodtrim.KmodTrim1.xml",
        "usr/share/dbus-1/system-services/org.kmodtrim.KmodTrim1.service":
            "org.kmodtrim.KmodTrim1.service",
        "usr/share/polkit-1/actions/org.kmodtrim.policy": "org.kmodtrim.policy",
        "usr/lib/kernel/install.d/45-kmodtrim.install": "45-kmodtrim.install",
        "usr/lib/tmpfiles.d/kmodtrim.conf": "kmodtrim.tmpfiles",
        "etc/kernel/postinst.d/kmodtrim": "kernel-postinst.d-kmodtrim",
        "etc/kernel/postrm.d/kmodtrim": "kernel-postrm.d-kmodtrim",
    }
    for installed, source in same_as_source.items():
        assert (unpacked / installed).read_bytes() == (UNITS / source).read_bytes(), installed
    assert (_unit_dir(unpacked) / "kmodtrimd.service").read_bytes() == \
        (UNITS / "kmodtrimd.service").read_bytes()
    for executable in ("usr/lib/kernel/install.d/45-kmodtrim.install",
                       "etc/kernel/postinst.d/kmodtrim", "etc/kernel/postrm.d/kmodtrim",
                       "usr/bin/kmodtrim", "usr/bin/kmodtrimd"):
        assert os.access(unpacked / executable, os.X_OK), executable
    assert (unpacked / "etc/kmodtrim/policy.toml").read_bytes() == \
        (REPO / "config/policy.toml").read_bytes()
    assert (unpacked / "etc/kmodtrim/policy.d").is_dir()
    assert (unpacked / "usr/lib/python3/dist-packages/kmodtrim/daemon.py").exists()


def test_deb_marks_configuration_and_hooks_as_conffiles(built_deb: Path) -> None:
    proc = subprocess.run(["dpkg-deb", "-I", str(built_deb), "conffiles"],
                          capture_output=True, text=True, env=SYSTEM_ENV, check=True)
    assert set(proc.stdout.split()) == {"/etc/kmodtrim/policy.toml",
                                        "/etc/kernel/postinst.d/kmodtrim",
                                        "/etc/kernel/postrm.d/kmodtrim"}


def test_deb_enables_the_service_and_creates_tmpfiles(built_deb: Path) -> None:
    proc = subprocess.run(["dpkg-deb", "-I", str(built_deb), "postinst"],
                          capture_output=True, text=True, env=SYSTEM_ENV, check=True)
    assert "deb-systemd-helper enable 'kmodtrimd.service'" in proc.stdout
    assert "systemd-tmpfiles" in proc.stdout and "kmodtrim.conf" in proc.stdout


def test_installed_hooks_are_run_by_run_parts(unpacked: Path) -> None:
    need("run-parts")
    for directory in ("etc/kernel/postinst.d", "etc/kernel/postrm.d"):
        proc = subprocess.run(["run-parts", "--test", str(unpacked / directory)],
                              capture_output=True, text=True, check=True)
        assert proc.stdout.split() == [str(unpacked / directory / "kmodtrim")]


def test_installed_unit_verifies_against_the_packaged_daemon(unpacked: Path) -> None:
    # The packaged /usr/bin/kmodtrimd (the console script) satisfies ExecStart=.
    need("systemd-analyze")
    stand_ins = unpacked / "etc/systemd/system"
    stand_ins.mkdir(parents=True, exist_ok=True)
    for target in ("sysinit.target", "basic.target", "shutdown.target", "local-fs.target",
                   "multi-user.target"):
        (stand_ins / target).write_text("[Unit]\nDescription=stand-in\n")
    (stand_ins / "dbus.socket").write_text(
        "[Socket]\nListenStream=/run/dbus/system_bus_socket\n")
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={unpacked}", "--man=no",
                           "--generators=no", "kmodtrimd.service"], capture_output=True,
                          text=True, env={**SYSTEM_ENV, "SYSTEMD_COLORS": "0"}, timeout=60,
                          check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


# --- Man pages and completion --------------------------------------------------------

# What kmodtrim.cli.docs generates -> where each package installs it (man pages compressed
# by dh_installman on Debian, by brp-compress on RPM).
GENERATED_DEB = {
    "kmodtrim.8": "usr/share/man/man8/kmodtrim.8.gz",
    "kmodtrimd.8": "usr/share/man/man8/kmodtrimd.8.gz",
    "kmodtrim-policy.5": "usr/share/man/man5/kmodtrim-policy.5.gz",
    "kmodtrim.bash": "usr/share/bash-completion/completions/kmodtrim",
    "_kmodtrim": "usr/share/zsh/vendor-completions/_kmodtrim",
}
GENERATED_RPM = {
    "kmodtrim.8": "/usr/share/man/man8/kmodtrim.8*",
    "kmodtrimd.8": "/usr/share/man/man8/kmodtrimd.8*",
    "kmodtrim-policy.5": "/usr/share/man/man5/kmodtrim-policy.5*",
    "kmodtrim.bash": "/usr/share/bash-completion/completions/kmodtrim",
    "_kmodtrim": "/usr/share/zsh/site-functions/_kmodtrim",
}


def test_deb_installs_the_man_pages_and_completion(unpacked: Path) -> None:
    for installed in GENERATED_DEB.values():
        assert (unpacked / installed).is_file(), installed
    bash = (unpacked / GENERATED_DEB["kmodtrim.bash"]).read_text()
    assert re.search(r"^complete .*kmodtrim$", bash, re.MULTILINE), bash[-400:]
    assert (unpacked / GENERATED_DEB["_kmodtrim"]).read_text().startswith("#compdef kmodtrim")


def test_packaged_man_pages_render_with_man(unpacked: Path) -> None:
    need("man")
    for page, words in (("kmodtrim.8", ("kmodtrim", "plan", "rollback")),
                        ("kmodtrimd.8", ("kmodtrimd",)),
                        ("kmodtrim-policy.5", ("presets", "min_observation"))):
        proc = subprocess.run(["man", "-l", str(unpacked / GENERATED_DEB[page])],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**SYSTEM_ENV, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "",
                                   "MANPAGER": "cat", "PAGER": "cat"})
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr.lower(), proc.stderr
        text = proc.stdout
        assert text.splitlines()[0].split()[0].upper().startswith(page.split(".")[0].upper())
        for word in words:
            assert word in text, (page, word)


def test_rpm_spec_installs_the_man_pages_and_completion() -> None:
    need("rpmspec")
    proc = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True,
                          env=SYSTEM_ENV, check=True)
    files = proc.stdout.split("%files", 1)[1]
    for generated, installed in GENERATED_RPM.items():
        assert installed in files.splitlines(), installed
        assert f"generated/{generated} " in proc.stdout, generated
    assert "-m kmodtrim.cli.docs generated" in proc.stdout


# --- lintian ---------------------------------------------------------------------------


def test_lintian_finds_no_errors_in_the_deb(built_deb: Path) -> None:
    need("lintian")
    proc = subprocess.run(["lintian", "--fail-on", "error", "--display-info",
                           str(built_deb)], capture_output=True, text=True, timeout=600,
                          env={**SYSTEM_ENV, "HOME": str(built_deb.parent)}, check=False)
    print(proc.stdout + proc.stderr)  # the warnings and notes, for the record (-s)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIPXN]: ", line)]
    errors = [line for line in tags if line.startswith("E: ")]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stderr
