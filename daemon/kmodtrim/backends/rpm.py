"""rpm backend: trimmed paths go into ``%_netsharedpath`` in ROOT/etc/rpm/macros.kmodtrim.

What rpm does (checked against rpm 4.18 by tests/test_backend_rpm.py):

- ``%_netsharedpath`` is a colon-separated list of path prefixes (a prefix matches only at
  a ``/`` boundary, so a file path matches exactly that file).  Matching files are not
  installed, the database records them as "net shared", ``rpm -V`` is silent about them and
  ``rpm -e`` leaves them alone.  Lifting the macro and reinstalling brings them back.
- File states are recorded at install time.  A file trimmed from an installed package is
  reported ``missing`` by ``rpm -V`` until the package is next reinstalled or upgraded
  with the macro in place; from then on it is "net shared" and ``rpm -V`` is silent.
- It is one macro: the definition loaded last wins.  We merge with the value the system
  defines without our file (evaluated by rpm itself over the same macro files minus ours),
  and after writing check that our definition is the one in effect — a file loaded after
  ours (e.g. /etc/rpm/macros) that sets ``%_netsharedpath`` would silently drop our paths.
  Our own paths are also available as ``%_kmodtrim_netsharedpath`` for such a file.
- Macro files are read through a 16 KiB line buffer and longer lines are silently
  truncated, so long lists are split over chunk macros joined by references.
- ``rpm --root ROOT`` reads macro files from the *host* (/usr/lib/rpm, /etc/rpm, ~), never
  from ROOT.  On the live system that is right.  For any other root every rpm command gets
  ``--macros`` (placed before ``--root``, or rpm ignores it) with the host's macro path,
  its /etc entries moved into ROOT, and ``--dbpath`` of ROOT's database (Debian's rpm,
  for one, defaults to ~/.rpmdb).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
import shlex
import shutil
import stat
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CommandError, InputError
from ..inputs import MAX_CONFIG_BYTES, read_input
from ..run import run
from ..store import RemovedPackage
from .package import (
    PM_ENV,
    OwnerTable,
    PackageDescription,
    VerifyProblem,
    check_paths,
    fcntl_lock_holder,
    is_live,
    other_spelling,
    parse_verify,
    rpm_db_dir,
    wait_for_lock_holders,
    write_config,
)

MACRO_FILE = "etc/rpm/macros.kmodtrim"
DNF_LOCK = "var/lib/dnf/rpmdb_lock.pid"
_NEVRA = "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}"
_CHUNK = 8000  # characters per macro line, well below rpm's 16 KiB line buffer
_FALLBACK_MACRO_PATH = ("/usr/lib/rpm/macros:/usr/lib/rpm/macros.d/macros.*:"
                        "/usr/lib/rpm/platform/%{_target}/macros:/usr/lib/rpm/fileattrs/*.attr:"
                        "/etc/rpm/macros.*:/etc/rpm/macros:/etc/rpm/%{_target}/macros:"
                        "~/.rpmmacros")
_HEADER = """\
# Managed by kmodtrim: these module files were moved to kmodtrim's stash; rpm must not
# install them again on reinstall or upgrade, and records them as "net shared".
# %_netsharedpath keeps what the system defines elsewhere.  Do not edit; `kmodtrim restore`
# (or rollback) rewrites this file.  To set %_netsharedpath in a file loaded after this one,
# append :%{?_kmodtrim_netsharedpath} to keep kmodtrim's paths.
"""


@functools.lru_cache(maxsize=1)
def _host_macro_path() -> tuple[str, ...]:
    done = run(["rpm", "--showrc"], env=PM_ENV)
    for line in done.stdout.splitlines():
        if line.startswith("Macro path:"):
            return tuple(line.split(":", 1)[1].strip().split(":"))
    return tuple(_FALLBACK_MACRO_PATH.split(":"))


def macro_path(root: Path, *, without_ours: bool = False) -> list[str]:
    """The macro files rpm reads for ``root`` (globs left to rpm), optionally without our
    macro file — to learn what the system defines on its own."""
    live = is_live(root)
    ours = str(Path("/") / MACRO_FILE) if live else str(root / MACRO_FILE)
    entries = []
    for entry in _host_macro_path():
        if not live:
            if entry.startswith("~"):
                continue  # the invoking user's macros say nothing about an image
            if entry.startswith("/etc/"):
                entry = str(root) + entry
        if without_ours and fnmatch.fnmatchcase(ours, entry):
            # rpm sorts glob matches; list them ourselves, leaving our file out
            entries += [m for m in sorted(glob.glob(entry)) if m != ours]
        else:
            entries.append(entry)
    return entries


def rpm_command(root: Path) -> list[str]:
    """The argv prefix for running rpm on ``root`` with ROOT's macros and database."""
    if is_live(root):
        return ["rpm"]
    # --macros must come before --root: given after it, rpm 4.18 loads none of the files.
    argv = ["rpm", "--macros=" + ":".join(macro_path(root)), f"--root={root}"]
    db = rpm_db_dir(root)
    if db is not None:
        argv.append(f"--dbpath={db}")
    return argv


def _split(value: str) -> list[str]:
    return [p for p in value.strip().split(":") if p]


def system_netsharedpath(root: Path) -> list[str]:
    """``%_netsharedpath`` as the system defines it without our macro file."""
    argv = ["rpm", "--macros=" + ":".join(macro_path(root, without_ours=True)),
            "--eval", "%{?_netsharedpath}"]
    return _split(run(argv, env=PM_ENV).stdout)


def effective_netsharedpath(root: Path) -> list[str]:
    """``%_netsharedpath`` as rpm operating on ``root`` sees it."""
    return _split(run([*rpm_command(root), "--eval", "%{?_netsharedpath}"], env=PM_ENV).stdout)


def _macro_escape(path: str) -> str:
    return path.replace("%", "%%")


def _define(name: str, items: Sequence[str]) -> list[str]:
    """Lines defining ``%name`` as ``items`` joined by colons, split over ``%name_N`` chunk
    macros (recursively) when one line would be too long for rpm's macro file reader."""
    line = f"%{name} " + ":".join(items)
    if len(line) <= _CHUNK:
        return [line]
    chunks: list[list[str]] = [[]]
    size = 0
    for item in items:
        if chunks[-1] and size + len(item) + 1 > _CHUNK - len(name) - 16:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item) + 1
    lines = [f"%{name}_{i} " + ":".join(chunk) for i, chunk in enumerate(chunks, 1)]
    return lines + _define(name, [f"%{{{name}_{i}}}" for i in range(1, len(chunks) + 1)])


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


_SCRIPTLETS = (("pretrans", "Pretrans"), ("pre", "Prein"), ("post", "Postin"),
               ("preun", "Preun"), ("postun", "Postun"), ("posttrans", "Posttrans"))
_DEPENDENCIES = {"Requires": "Require", "Provides": "Provide", "Conflicts": "Conflict",
                 "Obsoletes": "Obsolete", "Recommends": "Recommend", "Suggests": "Suggest",
                 "Supplements": "Supplement", "Enhances": "Enhance"}
# rpmsense bits: comparison, and the dependencies rpm adds by itself
_SENSE = {2: "<", 4: ">", 8: "=", 10: "<=", 12: ">="}
_RPMLIB, _INTERP, _CONFIG = 1 << 24, 1 << 8, 1 << 28
_SPEC_UNSAFE = re.compile(r"[\s\"'%*?\[\]{}\\]")
_FILE_FLAGS = ((1, "%config"), (2, "%doc"), (64, "%ghost"), (128, "%license"),
               (256, "%readme"), (4096, "%artifact"))


def _header_tags(xml: str) -> dict[str, Any]:
    """``rpm -q --xml`` output as tag name → value (a list for array tags)."""
    import xml.etree.ElementTree as ET

    tags: dict[str, Any] = {}
    for tag in ET.fromstring(xml).iter("rpmTag"):
        values: list[Any] = []
        for item in tag:
            text = item.text or ""
            values.append(int(text) if item.tag == "integer" else text)
        tags[tag.get("name", "")] = values
    return tags


def _scalar(tags: dict[str, Any], name: str) -> Any:
    values = tags.get(name)
    return values[0] if values else None


def _evr(meta: dict[str, Any]) -> str:
    epoch = f"{meta['epoch']}:" if meta.get("epoch") is not None else ""
    return f"{epoch}{meta['version']}-{meta['release']}"


def _dependencies(tags: dict[str, Any], kind: str) -> list[str]:
    """A dependency list as spec lines' values ("name >= 1.0"), without those rpm(build)
    adds by itself (rpmlib(), scriptlet interpreters, config(), the self-provide)."""
    prefix = _DEPENDENCIES[kind]
    names = tags.get(prefix + "name", [])
    flags = tags.get(prefix + "flags", [0] * len(names))
    versions = tags.get(prefix + "version", [""] * len(names))
    out = []
    for name, flag, version in zip(names, flags, versions, strict=False):
        if flag & (_RPMLIB | _INTERP) or name.startswith(("rpmlib(", "config(")):
            continue
        if kind == "Provides" and name in (_scalar(tags, "Name"),
                                           f"{_scalar(tags, 'Name')}({_scalar(tags, 'Arch')})"):
            continue
        op = _SENSE.get(flag & 14)
        out.append(f"{name} {op} {version}" if op and version else name)
    return out


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _spec(meta: dict[str, Any], tree: Path) -> str:
    """A spec file that packages ``tree`` as the recorded package."""
    lines = [f"Name: {meta['name']}", f"Version: {meta['version']}",
             f"Release: {meta['release']}"]
    if meta.get("epoch") is not None:
        lines.append(f"Epoch: {meta['epoch']}")
    lines += [f"Summary: {_escape(meta.get('summary') or meta['name'])}",
              f"License: {_escape(meta.get('license') or 'unknown')}", "AutoReqProv: no"]
    for key, tag in (("group", "Group"), ("url", "URL"), ("vendor", "Vendor"),
                     ("packager", "Packager")):
        if meta.get(key):
            lines.append(f"{tag}: {_escape(str(meta[key]))}")
    if meta.get("arch") == "noarch":
        lines.append("BuildArch: noarch")
    for kind, deps in meta.get("dependencies", {}).items():
        lines += [f"{kind}: {_escape(dep)}" for dep in deps]
    lines += ["", "%description", _escape(meta.get("description") or ""), "",
              "%install", "mkdir -p %{buildroot}",
              f"cp -a {shlex.quote(str(tree))}/. %{{buildroot}}/", ""]
    for section, script in meta.get("scripts", {}).items():
        prog = f" -p {script['prog']}" if script["prog"] else ""
        lines += [f"%{section}{prog}", _escape(script["body"]), ""]
    lines.append("%files")
    for f in meta.get("files", []):
        words = ["%dir"] if stat.S_ISDIR(f["mode"]) else []
        words += [word for bit, word in _FILE_FLAGS if f["flags"] & bit]
        if "%config" in words and f["flags"] & 16:
            words[words.index("%config")] = "%config(noreplace)"
        if f.get("lang"):
            words.append(f"%lang({f['lang']})")
        mode = "-" if stat.S_ISLNK(f["mode"]) else f"{stat.S_IMODE(f['mode']):o}"
        words.append(f"%attr({mode},{f['user']},{f['group']})")
        words.append(f["path"])
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def _dnf_lock_holder(root: Path) -> int | None:
    # dnf writes its pid into this file while it holds the rpmdb and unlinks it after;
    # a file left by a dead process does not count (dnf itself ignores those).
    try:
        pid = int(read_input(root / DNF_LOCK, limit=64, what="dnf pid file").strip())
    except (InputError, ValueError):
        return None
    return pid if pid != os.getpid() and os.path.exists(f"/proc/{pid}") else None
