"""dpkg backend: trimmed paths become ``path-exclude`` lines in
ROOT/etc/dpkg/dpkg.cfg.d/kmodtrim, so reinstalls and upgrades leave them out.

What dpkg does (checked against dpkg 1.21 by tests/test_backend_dpkg.py):

- ``path-exclude`` applies at unpack only.  The file stays in the package's file list, and
  ``dpkg --verify`` reports it as ``missing`` — the one documented trace of a trim.
- dpkg reads its configuration from the *host's* /etc/dpkg (dpkg.cfg.d/*, dpkg.cfg) even
  with ``--root=ROOT`` (or DPKG_ROOT); ROOT/etc/dpkg is never read.  On the live system that
  is the file we write.  For any other root every dpkg command we run gets ROOT's
  ``path-exclude``/``path-include`` options on its command line (in dpkg's own reading
  order, after the host's), so operations on an image root obey the image's config.
- ``--root`` does not move the log: dpkg would append to the host's /var/log/dpkg.log, so
  for other roots we point ``--log`` into ROOT (or /dev/null).
- Patterns are fnmatch(3) without FNM_NOESCAPE: a backslash escapes the next character, and
  ``*`` crosses ``/``.  Config values lose surrounding whitespace and quotes and lines are
  limited to 1024 bytes, so we escape spaces and quotes too and refuse longer paths.
- Patterns match the path as the package spells it, not the resolved file: with usrmerge a
  package may ship /lib/modules/… or /usr/lib/modules/…, so both spellings are excluded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from ..errors import CommandError, InputError
from ..inputs import MAX_KERNEL_METADATA_BYTES, read_input
from ..run import run
from ..store import RemovedPackage
from .package import (
    PM_ENV,
    OwnerTable,
    PackageDescription,
    VerifyProblem,
    check_paths,
    is_live,
    other_spelling,
    parse_verify,
    wait_for_fcntl_locks,
    write_config,
)

EXCLUDE_FILE = "etc/dpkg/dpkg.cfg.d/kmodtrim"
ADMIN_DIR = "var/lib/dpkg"

_HEADER = """\
# Managed by kmodtrim: these module files were moved to kmodtrim's stash, and dpkg must not
# install them again on reinstall or upgrade.  `dpkg --verify` lists them as missing.
# Do not edit; `kmodtrim restore` (or rollback) rewrites this file.
"""
_ALIASES = "# The same paths as spelled on the other side of usrmerge (/lib <-> /usr/lib).\n"
_MAX_LINE = 1000  # dpkg reads config lines into a 1024-byte buffer
_GLOB_SPECIAL = set("\\[]*?\"' \t")
_VALID_CFG_NAME = re.compile(r"[A-Za-z0-9_-]+")
_CFG_OPTION = re.compile(r"[A-Za-z0-9-]*")


def escape_pattern(path: str) -> str:
    """``path`` as an fnmatch pattern that matches exactly that path (and survives dpkg's
    config parser: no stripped quotes or whitespace)."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in path)


def unescape_pattern(pattern: str) -> str:
    """Inverse of escape_pattern."""
    return re.sub(r"\\(.)", r"\1", pattern)


def config_path_filters(root: Path) -> list[str]:
    """ROOT's ``path-exclude``/``path-include`` settings as dpkg command-line options, in the
    order dpkg itself would read them (dpkg.cfg.d/* by name, then dpkg.cfg)."""
    cfg = root / "etc/dpkg"
    files: list[Path] = []
    if (cfg / "dpkg.cfg.d").is_dir():
        files += sorted((p for p in (cfg / "dpkg.cfg.d").iterdir()
                         if _VALID_CFG_NAME.fullmatch(p.name) and p.is_file()),
                        key=lambda p: p.name.encode())
    if (cfg / "dpkg.cfg").is_file():
        files.append(cfg / "dpkg.cfg")
    options = []
    for file in files:
        for option, value in _read_dpkg_cfg(file):
            if option in ("path-exclude", "path-include") and value:
                options.append(f"--{option}={value}")
    return options


def _text(file: Path) -> str:
    """A dpkg database or configuration file's text (bounded; a FIFO is refused)."""
    return read_input(file, limit=MAX_KERNEL_METADATA_BYTES, what="dpkg file").decode(
        "utf-8", "surrogateescape")


def _read_dpkg_cfg(file: Path) -> list[tuple[str, str]]:
    # Mirrors dpkg's parser: a name of [A-Za-z0-9-], one separator character (and an "="
    # after it), blanks, then the value with surrounding quotes stripped; '#' comments.
    out = []
    for raw in _text(file).splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        m = _CFG_OPTION.match(line)
        name = m.group(0) if m else ""
        rest = line[len(name) + 1:]
        rest = rest.removeprefix("=").lstrip()
        if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "\"'":
            rest = rest[1:-1]
        out.append((name, rest))
    return out


# Fields dpkg keeps in its status file but which are not part of a package's control file.
_STATUS_ONLY = frozenset({"Status", "Conffiles", "Config-Version"})


def _paragraph(text: str) -> list[tuple[str, str]]:
    """A deb822 paragraph as (field name, the field's whole text with its continuation
    lines and newline), in order."""
    fields: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        if not line.strip():
            break
        if line[0] in " \t" and fields:
            name, body = fields[-1]
            fields[-1] = (name, body + line)
        else:
            fields.append((line.split(":", 1)[0], line if line.endswith("\n") else line + "\n"))
    return fields


def dpkg_command(root: Path, tool: str = "dpkg") -> list[str]:
    """The argv prefix for running dpkg on ``root`` so that it honours ROOT's path filters
    (see the module docstring for why other roots need them on the command line)."""
    if is_live(root):
        return [tool]
    argv = [tool, f"--root={root}"]
    if tool == "dpkg":
        log_dir = root / "var/log"
        argv.append(f"--log={log_dir / 'dpkg.log'}" if log_dir.is_dir() else "--log=/dev/null")
        argv += config_path_filters(root)
    return argv


class DpkgBackend:
    """The package manager is dpkg (with apt on top where available)."""

    name = "dpkg"

    # -- ownership ---------------------------------------------------------------------

    def owners(self, root: Path, paths: Sequence[str]) -> dict[str, str | None]:
        """The package (as dpkg names it: ``name`` or ``name:arch``) owning each path, or
        None.  Reads ROOT/var/lib/dpkg/info/*.list in one pass; a path not listed under its
        own spelling is looked up under the other usrmerge spelling when ROOT is merged."""
        table = OwnerTable(root, paths)
        info = root / ADMIN_DIR / "info"
        for listing in sorted(info.glob("*.list")) if info.is_dir() else []:
            package = listing.name[: -len(".list")]
            for line in _text(listing).split("\n"):
                table.record(line, package)
        return table.result

    def package_files(self, root: Path, package: str) -> list[str]:
        """Every path (files and directories) dpkg lists for ``package``; raises InputError
        when the package is not installed."""
        listing = self._list_file(root, package)
        text = _text(listing)
        return [line for line in text.split("\n") if line]

    # -- exclusions --------------------------------------------------------------------

    def read_exclusions(self, root: Path) -> set[str]:
        """The paths our dpkg.cfg.d file excludes (as written, without the usrmerge
        aliases)."""
        file = root / EXCLUDE_FILE
        if not file.is_file():
            return set()
        paths = set()
        for line in _text(file).splitlines():
            if line == _ALIASES.rstrip("\n"):
                break
            if line.startswith("path-exclude="):
                paths.add(unescape_pattern(line[len("path-exclude="):]))
        return paths

    def write_exclusions(self, root: Path, paths: Collection[str]) -> None:
        """Make ROOT/etc/dpkg/dpkg.cfg.d/kmodtrim exclude exactly ``paths`` (both usrmerge
        spellings); an empty set removes the file.  Atomic and idempotent.

        Raises InputError for a path dpkg's config cannot hold, CommandError when the file
        cannot be written."""
        ordered = check_paths(paths)
        if not ordered:
            write_config(root, EXCLUDE_FILE, None)
            return
        given = set(ordered)
        lines = [f"path-exclude={escape_pattern(p)}" for p in ordered]
        aliases = sorted({alt for p in ordered
                          if (alt := other_spelling(p)) is not None and alt not in given})
        alias_lines = [f"path-exclude={escape_pattern(p)}" for p in aliases]
        too_long = next((ln for ln in lines + alias_lines if len(ln.encode()) > _MAX_LINE), None)
        if too_long is not None:
            raise InputError(f"path too long for dpkg's configuration: {too_long[:80]}…")
        text = _HEADER + "".join(ln + "\n" for ln in lines)
        if alias_lines:
            text += _ALIASES + "".join(ln + "\n" for ln in alias_lines)
        write_config(root, EXCLUDE_FILE, text)

    # -- package operations ------------------------------------------------------------

    def reinstall(self, root: Path, packages: Sequence[str],
                  archives: Mapping[str, Path] | None = None) -> None:
        """Reinstall ``packages`` so that files no longer excluded come back.

        A package with an entry in ``archives`` (package -> .deb) is reinstalled from that
        file with ``dpkg -i``; the others with ``apt-get install --reinstall`` (live system
        only: it needs that exact version in a configured repository).
        Raises CommandError when dpkg/apt fail or no archive is known for an image root.
        """
        archives = archives or {}
        debs = [archives[p] for p in packages if p in archives]
        from_repo = [p for p in packages if p not in archives]
        if from_repo and not is_live(root):
            raise CommandError(
                f"cannot reinstall {', '.join(from_repo)} in {root}: no .deb given",
                hint="pass the package archives, or restore from kmodtrim's stash")
        if debs:
            run([*dpkg_command(root), "--install", *map(str, debs)], env=PM_ENV)
        if from_repo:
            run(["apt-get", "install", "--reinstall", "--yes", "--quiet", *from_repo],
                env={**PM_ENV, "DEBIAN_FRONTEND": "noninteractive"})

    def remove_packages(self, root: Path, packages: Sequence[str]) -> None:
        """Remove ``packages`` with ``dpkg --remove``, which refuses (CommandError) when an
        installed package depends on them, rather than apt's cascade of removals."""
        if packages:
            run([*dpkg_command(root), "--remove", *packages], env=PM_ENV)

    # -- whole-package removal -----------------------------------------------------------
    #
    # A package whose every file is trimmed (documentation aside) leaves through
    # ``dpkg --remove`` rather than apt: apt's resolver would remove whatever depends on
    # it too, and a cascade is never what a trim means.  dpkg refuses instead, and
    # ``--no-act`` asks the same question without acting.  Before the removal the executor
    # stashes every file and control file, so restoring rebuilds the .deb locally
    # (dpkg-repack style, with dpkg-deb) and installs it with ``dpkg -i``: no network, and
    # it works after the archive dropped that version.

    # dpkg marks a package's state before touching its files: "installed" means whole.
    partial_states = True

    def package_state(self, root: Path, package: str) -> str:
        """dpkg's state word for ``package``: "installed", "not-installed", or one dpkg
        records for a package it left part-way ("half-installed", "unpacked",
        "half-configured", "config-files", …).  Raises CommandError when dpkg-query fails."""
        done = run([*dpkg_command(root, "dpkg-query"), "--show",
                    "--showformat=${db:Status-Status}", package], env=PM_ENV, check=False)
        if done.returncode != 0:
            if "no packages found" in done.stderr:
                return "not-installed"
            raise CommandError(f"dpkg-query --show {package} in {root} failed:\n"
                               f"{done.stderr.strip()}")
        return done.stdout.strip() or "not-installed"

    def describe_package(self, root: Path, package: str) -> PackageDescription:
        """What rebuilding ``package`` needs: its control paragraph as dpkg recorded it at
        install (without the status-only fields), its control files and its file list.
        Raises InputError when it is not installed, CommandError when dpkg-query fails."""
        query = dpkg_command(root, "dpkg-query")
        done = run([*query, "--status", package], env=PM_ENV, check=False)
        if done.returncode != 0:
            raise InputError(f"package {package} is not installed in {root}: "
                             f"{done.stderr.strip()}")
        fields = _paragraph(done.stdout)
        control = "".join(text for name, text in fields if name not in _STATUS_ONLY)
        values = {name: text.split(":", 1)[1].strip() for name, text in fields}
        names = run([*query, "--control-list", package], env=PM_ENV).stdout.split()
        info = root / ADMIN_DIR / "info"
        stem = self._list_file(root, package).name[: -len(".list")]
        control_files = {name: f"/{ADMIN_DIR}/info/{stem}.{name}" for name in names
                         if (info / f"{stem}.{name}").is_file()}
        return PackageDescription(
            name=package, version=values.get("Version", ""),
            arch=values.get("Architecture", ""), metadata={"control": control},
            control=control_files, paths=self.package_files(root, package))

    def removal_refusal(self, root: Path, packages: Sequence[str]) -> str | None:
        """Why dpkg would not remove ``packages`` (together) without touching anything
        else — an installed package depends on one of them, one is essential, … — or None
        when ``dpkg --remove --no-act`` agrees.  Call it with dpkg's lock free."""
        done = run([*dpkg_command(root), "--no-act", "--remove", *packages],
                   env=PM_ENV, check=False)
        if done.returncode == 0:
            return None
        # dpkg names each reason on an indented line ("X depends on P."); else its message.
        details = done.stderr.split("Errors were encountered")[0].splitlines()
        reasons = [ln.strip().rstrip(".") for ln in details if ln.startswith(" ")
                   and ln.strip() and "not removing" not in ln]
        if not reasons:
            reasons = [ln.removeprefix("dpkg: ").strip() for ln in done.stderr.splitlines()
                       if ln.strip() and not ln.startswith("Errors were encountered")][:2]
        return "; ".join(reasons[:4]) or f"dpkg --remove --no-act exited {done.returncode}"

    def build_archive(self, package: RemovedPackage, tree: Path, control: Path,
                      out_dir: Path) -> Path:
        """Build ``package`` again as a .deb from ``tree`` (its files, put there from the
        stash) and ``control`` (its control files by name), with the control paragraph
        recorded at removal.  Uncompressed: the archive only lives until ``dpkg -i``.
        Raises CommandError when dpkg-deb refuses."""
        debian = tree / "DEBIAN"
        debian.mkdir(parents=True, exist_ok=True)
        for item in sorted(control.iterdir()) if control.is_dir() else []:
            item.replace(debian / item.name)
        (debian / "control").write_text(package.metadata["control"], encoding="utf-8")
        debian.chmod(0o755)
        deb = out_dir / f"{package.name.replace(':', '_')}.deb"
        argv = ["dpkg-deb", "-Znone", "--build", str(tree), str(deb)]
        if os.geteuid() != 0:
            argv.insert(1, "--root-owner-group")  # the stash's owners could not be set
        run(argv, env=PM_ENV)
        return deb

    def install_archives(self, root: Path, archives: Sequence[Path]) -> None:
        """``dpkg -i`` the given .debs (ROOT's path-exclude settings apply).  Raises
        CommandError when dpkg fails."""
        if archives:
            run([*dpkg_command(root), "--install", *map(str, archives)], env=PM_ENV)

    def _list_file(self, root: Path, package: str) -> Path:
        info = root / ADMIN_DIR / "info"
        listing = info / f"{package}.list"
        if not listing.is_file():
            candidates = sorted(info.glob(f"{package}:*.list"))
            if len(candidates) != 1:
                raise InputError(f"package {package} is not installed (no {listing})")
            listing = candidates[0]
        return listing

    def wait_for_lock(self, root: Path, timeout: float) -> None:
        """Return once neither apt/dpkg frontend lock nor dpkg's database lock is held;
        raises PackageManagerBusy after ``timeout`` seconds."""
        admin = root / ADMIN_DIR
        wait_for_fcntl_locks([admin / "lock-frontend", admin / "lock"], timeout, "dpkg")

    def verify(self, root: Path, packages: Sequence[str]) -> list[VerifyProblem]:
        """``dpkg --verify`` of ``packages``, parsed.  Raises CommandError when dpkg fails
        (e.g. a package is not installed)."""
        if not packages:
            return []
        done = run([*dpkg_command(root), "--verify", *packages], env=PM_ENV, check=False)
        if done.returncode != 0:
            raise CommandError(f"dpkg --verify {' '.join(packages)} in {root} failed:\n"
                               f"{done.stderr.strip()}")
        return parse_verify(done.stdout)

