"""RpmBackend: the package manager is rpm (with dnf on top): who owns a path, trimmed paths
excluded through ``%_netsharedpath``, reinstall, erase, verify, the rpmdb locks, and whole
packages erased and rebuilt with rpmbuild."""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import CommandError, InputError
from ...inputs import MAX_CONFIG_BYTES, read_input
from ...run import run
from ...store import RemovedPackage
from ..detect import rpm_db_dir
from ..package import (
    PM_ENV,
    OwnerTable,
    PackageDescription,
    VerifyProblem,
    check_paths,
    fcntl_lock_holder,
    is_live,
    other_spelling,
    parse_verify,
    wait_for_lock_holders,
    write_config,
)
from .macros import (
    _HEADER,
    MACRO_FILE,
    _define,
    _macro_escape,
    _split,
    effective_netsharedpath,
    rpm_command,
    system_netsharedpath,
)
from .spec import (
    _DEPENDENCIES,
    _SCRIPTLETS,
    _SPEC_UNSAFE,
    _dependencies,
    _evr,
    _header_tags,
    _scalar,
    _spec,
)

DNF_LOCK = "var/lib/dnf/rpmdb_lock.pid"
_NEVRA = "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}"


class RpmBackend:
    """The package manager is rpm (with dnf on top where available)."""

    name = "rpm"

    # -- ownership ---------------------------------------------------------------------

    def owners(self, root: Path, paths: Sequence[str]) -> dict[str, str | None]:
        """The installed package (name-version-release.arch) owning each path, or None.
        Two rpm queries: which packages own any of the paths, then those packages' file
        lists.  On a usrmerged root the other spelling of a path counts too."""
        table = OwnerTable(root, paths)
        if not paths:
            return table.result
        queried = table.queried
        candidates: set[str] = set()
        names = sorted(queried)
        for start in range(0, len(names), 2000):
            batch = names[start:start + 2000]
            done = run([*rpm_command(root), "-qf", "--qf", _NEVRA + "\\n", "--", *batch],
                       env=PM_ENV, check=False)
            unexpected = [ln for ln in done.stderr.splitlines()
                          if ln.strip() and not ln.startswith(("error: file ", "rpm: "))]
            if done.returncode != 0 and unexpected:
                raise CommandError(f"rpm -qf in {root} failed:\n" + "\n".join(unexpected[-10:]))
            # owners print as one NEVRA per line; "file … is not owned …" has spaces
            candidates |= {ln for ln in done.stdout.splitlines() if ln and " " not in ln}
        if not candidates:
            return table.result
        # inside [...] every scalar tag needs "=" to repeat alongside the file array
        nevra = _NEVRA.replace("%{", "%{=")
        listing = run([*rpm_command(root), "-q", "--qf", f"[%{{FILENAMES}}\\t{nevra}\\n]",
                       *sorted(candidates)], env=PM_ENV)
        if listing.stderr.strip():
            raise CommandError(f"rpm -q in {root} failed:\n{listing.stderr.strip()}")
        for line in listing.stdout.splitlines():
            path, _, package = line.rpartition("\t")
            table.record(path, package)
        return table.result

    def package_files(self, root: Path, package: str) -> list[str]:
        """Every path (files and directories) rpm lists for ``package`` (a name or
        name-version-release.arch); raises InputError when it is not installed."""
        done = run([*rpm_command(root), "-q", "--qf", "[%{FILENAMES}\\n]", package],
                   env=PM_ENV, check=False)
        if done.returncode != 0:
            raise InputError(f"package {package} is not installed in {root}: "
                             f"{(done.stdout + done.stderr).strip()}")
        return [ln for ln in done.stdout.splitlines() if ln]

    # -- exclusions --------------------------------------------------------------------

    def read_exclusions(self, root: Path) -> set[str]:
        """The paths our macro file lists (without the usrmerge aliases or the system's own
        %_netsharedpath entries)."""
        file = root / MACRO_FILE
        if not file.is_file():
            return set()
        paths: set[str] = set()
        for line in read_input(file, limit=MAX_CONFIG_BYTES, what="rpm macro file").decode(
                "utf-8", "surrogateescape").splitlines():
            name, _, value = line.partition(" ")
            if name == "%_kmodtrim_excluded" or name.startswith("%_kmodtrim_excluded_"):
                paths |= {p.replace("%%", "%") for p in _split(value)
                          if not p.startswith("%{")}
        return paths

    def write_exclusions(self, root: Path, paths: Collection[str]) -> None:
        """Make ROOT/etc/rpm/macros.kmodtrim exclude exactly ``paths`` (both usrmerge
        spellings) through ``%_netsharedpath``, merged with the value the system defines
        elsewhere; an empty set removes the file.  Atomic and idempotent.

        Raises InputError for a path a macro cannot hold (colon, whitespace, backslash),
        CommandError when the file cannot be written or another macro file overrides ours.
        """
        ordered = check_paths(paths, forbidden="\n\t :\\")
        file = root / MACRO_FILE
        if not ordered:
            write_config(root, MACRO_FILE, None)
            return
        given = set(ordered)
        aliases = sorted({alt for p in ordered
                          if (alt := other_spelling(p)) is not None and alt not in given})
        system = system_netsharedpath(root)
        lines = _define("_kmodtrim_excluded", [_macro_escape(p) for p in ordered])
        parts = ["%{_kmodtrim_excluded}"]
        if aliases:
            lines += _define("_kmodtrim_aliases", [_macro_escape(p) for p in aliases])
            parts.append("%{_kmodtrim_aliases}")
        lines += _define("_kmodtrim_netsharedpath", parts)
        if system:
            lines += _define("_kmodtrim_system_netsharedpath",
                             [_macro_escape(p) for p in system])
            lines.append("%_netsharedpath %{_kmodtrim_system_netsharedpath}:"
                         "%{_kmodtrim_netsharedpath}")
        else:
            lines.append("%_netsharedpath %{_kmodtrim_netsharedpath}")
        write_config(root, MACRO_FILE, _HEADER + "".join(ln + "\n" for ln in lines))
        effective = set(effective_netsharedpath(root))
        lost = [p for p in ordered if p not in effective]
        if lost:
            raise CommandError(
                f"{file}: %_netsharedpath is overridden by a macro file rpm reads later; "
                f"rpm would reinstall {len(lost)} trimmed file(s) such as {lost[0]}",
                hint="in that file, append :%{?_kmodtrim_netsharedpath} to %_netsharedpath")

    # -- package operations ------------------------------------------------------------

    def reinstall(self, root: Path, packages: Sequence[str],
                  archives: Mapping[str, Path] | None = None) -> None:
        """Reinstall ``packages`` so that files no longer excluded come back: from the given
        .rpm files with ``rpm --reinstall``, the rest with ``dnf reinstall`` (which needs the
        exact version in a configured repository).  Raises CommandError on failure."""
        archives = archives or {}
        files = [str(archives[p]) for p in packages if p in archives]
        from_repo = [p for p in packages if p not in archives]
        if files:
            run([*rpm_command(root), "--reinstall", *files], env=PM_ENV)
        if from_repo:
            where = [] if is_live(root) else [f"--installroot={root}"]
            run(["dnf", *where, "--assumeyes", "reinstall", *from_repo], env=PM_ENV)

    def remove_packages(self, root: Path, packages: Sequence[str]) -> None:
        """Erase ``packages`` with ``rpm -e``, which refuses (CommandError) when an installed
        package requires them, rather than dnf's cascade of removals."""
        if packages:
            run([*rpm_command(root), "-e", *packages], env=PM_ENV)

    def wait_for_lock(self, root: Path, timeout: float) -> None:
        """Return once no dnf process holds its rpmdb lock and nobody holds rpm's
        transaction lock; raises PackageManagerBusy after ``timeout`` seconds."""
        db = rpm_db_dir(root) or "/var/lib/rpm"
        rpm_lock = root / db.lstrip("/") / ".rpm.lock"

        def held() -> tuple[str, int] | None:
            dnf = _dnf_lock_holder(root)
            if dnf is not None:
                return f"{root / DNF_LOCK} (dnf)", dnf
            return fcntl_lock_holder([rpm_lock])

        wait_for_lock_holders(held, timeout, "rpm")

    def verify(self, root: Path, packages: Sequence[str]) -> list[VerifyProblem]:
        """``rpm -V`` of ``packages``, parsed.  Raises CommandError when rpm fails (e.g. a
        package is not installed)."""
        if not packages:
            return []
        done = run([*rpm_command(root), "-V", *packages], env=PM_ENV, check=False)
        missing = [ln for ln in done.stdout.splitlines() if ln.endswith(" is not installed")]
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        if missing or errors:
            raise CommandError(f"rpm -V in {root} failed:\n" + "\n".join(missing + errors))
        return parse_verify(done.stdout)

    # -- whole-package removal -----------------------------------------------------------
    #
    # A subpackage whose every file is trimmed (kernel-modules-extra, …) leaves through
    # ``rpm -e`` rather than dnf: dnf's resolver would also erase whatever requires it,
    # and a cascade is never what a trim means; rpm refuses instead, and ``rpm -e --test``
    # asks the same question without acting.  Its header is recorded and its files
    # stashed, so restoring rebuilds the .rpm locally with rpmbuild (same name, epoch,
    # version, release, arch, dependencies, scriptlets and file attributes) and installs
    # it with ``rpm -U --replacepkgs`` under ROOT's %_netsharedpath: no network, and it
    # works after the repositories dropped that version.

    # rpm records no part-way state: a package whose erase or install was interrupted may
    # look installed (or not) with only some of its files, so recovery reinstalls it.
    partial_states = False

    def package_state(self, root: Path, package: str) -> str:
        """"installed" or "not-installed"."""
        done = run([*rpm_command(root), "-q", package], env=PM_ENV, check=False)
        return "installed" if done.returncode == 0 else "not-installed"

    def describe_package(self, root: Path, package: str) -> PackageDescription:
        """What rebuilding ``package`` needs, from its installed header (``rpm -q --xml``).
        Raises InputError when it is not installed or has what a rebuild cannot carry
        (triggers, file capabilities, paths a spec file cannot name), CommandError when
        rpm fails."""
        done = run([*rpm_command(root), "-q", "--xml", package], env=PM_ENV, check=False)
        if done.returncode != 0:
            raise InputError(f"package {package} is not installed in {root}: "
                             f"{(done.stdout + done.stderr).strip()}")
        tags = _header_tags(done.stdout)
        for tag in ("Triggername", "Filetriggername", "Transfiletriggername"):
            if tags.get(tag):
                raise InputError(f"package {package} has {tag.lower()}s, which kmodtrim "
                                 "cannot rebuild")
        if any(tags.get("Filecaps") or []):
            raise InputError(f"package {package} has file capabilities, which kmodtrim "
                             "cannot rebuild")
        dirnames = tags.get("Dirnames", [])
        paths = [dirnames[int(i)] + base for i, base
                 in zip(tags.get("Dirindexes", []), tags.get("Basenames", []), strict=True)]
        bad = next((p for p in paths if _SPEC_UNSAFE.search(p)), None)
        if bad is not None:
            raise InputError(f"package {package} lists {bad!r}, which a spec file cannot name")
        count = len(paths)

        def column(tag: str, default: Any) -> list[Any]:
            values = list(tags.get(tag, []))
            return values if len(values) == count else [default] * count

        files = [
            {"path": path, "mode": int(mode), "user": user, "group": group, "flags": int(flags),
             "verify": int(verify), "lang": lang}
            for path, mode, user, group, flags, verify, lang in zip(
                paths, column("Filemodes", 0o100644), column("Fileusername", "root"),
                column("Filegroupname", "root"), column("Fileflags", 0),
                column("Fileverifyflags", -1), column("Filelangs", ""), strict=True)
        ]
        scripts = {}
        for section, tag in _SCRIPTLETS:
            body, prog = _scalar(tags, tag), tags.get(tag + "prog")
            if body is not None or prog:
                argv = prog if isinstance(prog, list) else [prog] if prog else []
                scripts[section] = {"prog": " ".join(str(a) for a in argv),
                                    "body": body or ""}
        metadata: dict[str, Any] = {
            key: _scalar(tags, key.capitalize()) for key in (
                "name", "epoch", "version", "release", "arch", "summary", "description",
                "license", "group", "url", "vendor", "packager")
        }
        metadata["dependencies"] = {kind: _dependencies(tags, kind) for kind in _DEPENDENCIES}
        metadata["scripts"] = scripts
        metadata["files"] = files
        return PackageDescription(
            name=package, version=_evr(metadata), arch=str(metadata["arch"] or ""),
            metadata=metadata, control={}, paths=paths)

    def removal_refusal(self, root: Path, packages: Sequence[str]) -> str | None:
        """Why rpm would not erase ``packages`` (together) without touching anything else
        (an installed package requires one of them, …), or None when ``rpm -e --test``
        agrees; also refuses when rpmbuild, which a restore needs, is missing."""
        if shutil.which("rpmbuild", path=PM_ENV["PATH"]) is None:
            return "rpmbuild is not installed, and restoring the package would need it"
        done = run([*rpm_command(root), "-e", "--test", *packages], env=PM_ENV, check=False)
        if done.returncode == 0:
            return None
        reasons = [ln.strip() for ln in done.stderr.splitlines()
                   if ln.startswith(("\t", " ")) and ln.strip()]
        if not reasons:
            reasons = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()][:2]
        return "; ".join(reasons[:4]) or f"rpm -e --test exited {done.returncode}"

    def build_archive(self, package: RemovedPackage, tree: Path, control: Path,
                      out_dir: Path) -> Path:
        """Build ``package`` again as an .rpm with rpmbuild: its recorded header as a spec
        file, ``tree`` (its files, put there from the stash) as the payload, uncompressed
        (the archive only lives until it is installed), with none of rpmbuild's
        post-processing (no stripping, no build-id links, no added dependencies), so the
        files are byte-identical.  Raises CommandError when rpmbuild refuses."""
        meta = package.metadata
        top = out_dir / "rpmbuild"
        for sub in ("SPECS", "RPMS", "BUILD", "tmp", "db"):
            (top / sub).mkdir(parents=True, exist_ok=True)
        spec = top / "SPECS" / "package.spec"
        spec.write_text(_spec(meta, tree), encoding="utf-8")
        defines = {
            "_topdir": str(top), "_rpmdir": str(top / "RPMS"), "_tmppath": str(top / "tmp"),
            "_dbpath": str(top / "db"), "_build_id_links": "none",
            "__spec_install_post": "%{nil}", "__os_install_post": "%{nil}",
            "debug_package": "%{nil}", "_binary_payload": "w.ufdio",
            "_unpackaged_files_terminate_build": "0",
            "_build_name_fmt": "package.rpm",
        }
        argv = ["rpmbuild", "-bb", "--target", str(meta["arch"] or "noarch")]
        for key, value in defines.items():
            argv += ["--define", f"{key} {value}"]
        run([*argv, str(spec)], env=PM_ENV)
        return top / "RPMS" / "package.rpm"

    def install_archives(self, root: Path, archives: Sequence[Path]) -> None:
        """Install the given .rpm files whether or not that version is installed
        (``rpm -U --replacepkgs``), under ROOT's %_netsharedpath.  ``--nodeps``: each
        puts back a package that was installed with its dependencies met, and a restore
        must not fail for a dependency dropped since.  Raises CommandError."""
        if archives:
            run([*rpm_command(root), "-U", "--replacepkgs", "--nodeps", *map(str, archives)],
                env=PM_ENV)


def _dnf_lock_holder(root: Path) -> int | None:
    # dnf writes its pid into this file while it holds the rpmdb and unlinks it after;
    # a file left by a dead process does not count (dnf itself ignores those).
    try:
        pid = int(read_input(root / DNF_LOCK, limit=64, what="dnf pid file").strip())
    except (InputError, ValueError):
        return None
    return pid if pid != os.getpid() and os.path.exists(f"/proc/{pid}") else None
