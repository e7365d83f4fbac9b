"""The records kmodtrim's state is made of — files out of the tree, packages out of the
system, generations — and their strict reading from JSON.

State files are read back by root and drive writes into the tree, so nothing in them is
taken on trust: every field is type-checked, and every path must be a normalised absolute
path under the trees kmodtrim manages (module trees, firmware, a removed package's own
files). A record that fails any check raises StoreError naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import repeat
from typing import Any

from .errors import StoreError
from .fsutil import UnsafePathError, check_relative
from .takeout import Source

MODULE_TREES = ("/lib/modules/", "/usr/lib/modules/")
FIRMWARE_TREES = ("/lib/firmware/", "/usr/lib/firmware/")
# A package removed whole owns its modules plus documentation and such under /usr.
PACKAGE_TREES = (*MODULE_TREES, *FIRMWARE_TREES, "/usr/")
KINDS = ("module", "firmware", "package", "package-control")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.+:@~-]{1,200}\Z")


def package_listing_path(path: object) -> str:
    """A path as a package lists it (``/.`` and directories above the managed trees
    included): only ever created inside a rebuild tree, so it must only be normalised.
    Raises StoreError."""
    if path == "/.":
        return path
    return managed_path(path, "listing")


def managed_path(path: object, kind: str) -> str:
    """``path`` if it may be written for a record of ``kind``; raises StoreError."""
    try:
        check_relative(path)  # type: ignore[arg-type]
    except UnsafePathError as exc:
        raise StoreError(exc.message) from None
    assert isinstance(path, str)
    trees = {"module": MODULE_TREES, "firmware": FIRMWARE_TREES,
             "package": PACKAGE_TREES}.get(kind)
    if trees is not None and not path.startswith(trees):
        raise StoreError(f"refusing path {path[:200]!r}: a {kind} file must lie under "
                         + ", ".join(t.rstrip("/") for t in trees))
    return path


class _Fields:
    """Typed access to one JSON object; errors name the record and the field."""

    def __init__(self, doc: object, what: str) -> None:
        if not isinstance(doc, dict):
            raise StoreError(f"{what}: expected an object, found {type(doc).__name__}")
        self.doc: dict[str, Any] = doc
        self.what = what

    def _get(self, key: str, kinds: tuple[type, ...], default: object) -> Any:
        if key not in self.doc:
            if default is _REQUIRED:
                raise StoreError(f"{self.what}: missing field {key!r}")
            return default
        value = self.doc[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise StoreError(f"{self.what}: field {key!r} must be {names}, "
                             f"found {type(value).__name__}")
        return value

    def text(self, key: str, default: object = None) -> str:
        return str(self._get(key, (str,), _REQUIRED if default is None else default))

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, (str, type(None)), None)
        return None if value is None else str(value)

    def number(self, key: str, default: int | None = None) -> int:
        value = int(self._get(key, (int,), _REQUIRED if default is None else default))
        if value < 0:
            raise StoreError(f"{self.what}: field {key!r} must not be negative")
        return value

    def opt_number(self, key: str) -> int | None:
        value = self._get(key, (int, type(None)), None)
        return None if value is None else int(value)

    def texts(self, key: str) -> tuple[str, ...]:
        values = self._get(key, (list,), [])
        if not all(isinstance(v, str) for v in values):
            raise StoreError(f"{self.what}: field {key!r} must be a list of strings")
        return tuple(values)

    def objects(self, key: str) -> list[Any]:
        return list(self._get(key, (list,), []))

    def mapping(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, (dict,), {}))


_REQUIRED = object()


@dataclass(frozen=True)
class StashedFile:
    """A file kmodtrim took out of the tree, with everything needed to put it back.

    ``source`` says where it comes back from: the stash (a blob named ``sha256``), or the
    package archive (``package`` at ``version``, checked against the package database's
    own digest, then against ``sha256``). Records written before sources existed have
    neither field and read as the stash."""

    path: str  # in-root absolute path
    size: int
    sha256: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    kind: str = "module"  # one of KINDS
    module: str | None = None  # module name (for modules; a control file's name)
    kernel: str | None = None
    package: str | None = None  # owning package, if any
    link: str | None = None  # a symlink's target (then there is no blob)
    source: Source = Source.STASH
    version: str | None = None  # the owning package's installed version (archive source)

    @property
    def has_blob(self) -> bool:
        """Whether the stash holds (or must hold) this file's bytes."""
        return self.link is None and self.source is Source.STASH

    def to_json(self) -> dict[str, Any]:
        doc = dict(self.__dict__)
        # The defaults are left out: a stash record reads as it did before sources existed.
        if self.source is Source.STASH:
            del doc["source"]
        else:
            doc["source"] = str(self.source)
        if self.version is None:
            del doc["version"]
        return doc

    @staticmethod
    def from_json(doc: object) -> StashedFile:
        """Raises StoreError for a wrong type, a missing field or an unsafe path."""
        fast = _fast_stashed_files([doc])
        if fast is not None:
            return fast[0]
        f = _Fields(doc, "stashed file record")
        kind = f.text("kind", "module")
        if kind not in KINDS:
            raise StoreError(f"stashed file record: unknown kind {kind[:40]!r}")
        path = managed_path(f.text("path"), kind)
        sha256 = f.text("sha256")
        if not _SHA256.match(sha256):
            raise StoreError(f"stashed file record {path}: sha256 is not 64 hex digits")
        module = f.opt_text("module")
        if kind == "package-control" and (module is None or not _PLAIN_NAME.match(module)):
            raise StoreError(f"stashed file record {path}: control file name {module!r} "
                             "is not a plain file name")
        mode = f.number("mode")
        if mode > 0o7777:
            raise StoreError(f"stashed file record {path}: mode {mode:o} is not a file mode")
        named = _Fields(doc, f"stashed file record {path}")
        source = _source(named.text("source", str(Source.STASH)), path)
        package, version = named.opt_text("package"), named.opt_text("version")
        if source is Source.ARCHIVE and not _archive_origin(package, version):
            raise StoreError(f"stashed file record {path}: an archive source needs a "
                             "plain package name and version")
        return StashedFile(
            path=path, size=f.number("size"), sha256=sha256, mode=mode, uid=f.number("uid"),
            gid=f.number("gid"), mtime_ns=f.number("mtime_ns"), kind=kind, module=module,
            kernel=f.opt_text("kernel"), package=package, link=f.opt_text("link"),
            source=source, version=version)


def _source(text: str, path: str) -> Source:
    try:
        return Source(text)
    except ValueError:
        raise StoreError(f"stashed file record {path}: unknown source {text[:40]!r} "
                         f"(expected {' or '.join(Source)})") from None


def _archive_origin(package: str | None, version: str | None) -> bool:
    """A package and version safe to hand to the package manager's downloader."""
    return (package is not None and version is not None
            and _PLAIN_NAME.match(package) is not None and not package.startswith("-")
            and _PLAIN_NAME.match(version) is not None and not version.startswith("-"))


_TREES = {"module": MODULE_TREES, "firmware": FIRMWARE_TREES, "package": PACKAGE_TREES,
          "package-control": ("/",)}
_SOURCES = {str(s): s for s in Source}
_HEX = re.compile(r"[0-9a-f]*\Z")
_CANONICAL = ("path", "size", "sha256", "mode", "uid", "gid", "mtime_ns", "kind", "module",
              "kernel", "package", "link")
_ONE_SHAPE = {_CANONICAL}
_ONLY_DICT, _ONLY_INT, _ONLY_STR, _STR_OR_NONE = {dict}, {int}, {str}, {str, type(None)}
_FILE_KINDS = {"module", "firmware", "package"}
_SHA_LENGTH = {64}
# Written as a dataclass's own __init__ would, without its 14 frozen setattr calls each.
_new = object.__new__
_set = object.__setattr__


def stashed_files(docs: list[Any]) -> tuple[StashedFile, ...]:
    """``docs`` as records, in order. Raises StoreError for a wrong type, a missing field
    or an unsafe path, as StashedFile.from_json does for each."""
    fast = _column_stashed_files(docs)
    if fast is None:
        fast = _fast_stashed_files(docs)
    if fast is not None:
        return fast
    return tuple(StashedFile.from_json(x) for x in docs)


def _column_stashed_files(docs: list[Any]) -> tuple[StashedFile, ...] | None:
    """The records when every one is a stash record as to_json writes it (the keys of
    _CANONICAL, in that order) and passes every check, each check run over a whole column
    at once; None sends the caller to the record-by-record reading. Accepts only what
    StashedFile.from_json accepts, and builds equal records."""
    if not docs or set(map(type, docs)) != _ONLY_DICT or set(map(tuple, docs)) != _ONE_SHAPE:
        return None
    (paths, sizes, shas, modes, uids, gids, mtimes, kinds, modules, kernels, packages,
     links) = zip(*map(dict.values, docs), strict=True)
    numbers = sizes + modes + uids + gids + mtimes
    if not (set(map(type, numbers)) == _ONLY_INT and min(numbers) >= 0
            and max(modes) <= 0o7777
            and set(map(type, paths + shas + kinds)) == _ONLY_STR
            and set(map(type, modules + kernels + packages + links)) <= _STR_OR_NONE
            and set(kinds) <= _FILE_KINDS
            and all(map(str.startswith, paths, map(_TREES.__getitem__, kinds)))
            and set(map(len, shas)) == _SHA_LENGTH and _HEX.match("".join(shas))
            and paths_are_normalised(paths)):
        return None
    records = tuple(map(_new, repeat(StashedFile, len(docs))))
    with_defaults: Iterable[dict[str, Any]] = map(
        partial(dict, source=Source.STASH, version=None), docs)
    any(map(_set, records, repeat("__dict__"), with_defaults))  # each record's fields
    return records


def paths_are_normalised(paths: Sequence[str]) -> bool:
    """Whether every string in ``paths`` is a normalised absolute path other than ``/``
    (no NUL, no empty, ``.`` or ``..`` component, no trailing slash), as check_relative
    requires: one pass over them all, joined by NUL (which no accepted path contains)."""
    if not paths:
        return True
    joined = "\x00".join(paths) + "\x00"
    return (joined.count("\x00") == len(paths) and joined[0] == "/"
            and joined.count("\x00/") == len(paths) - 1
            and "//" not in joined and "/./" not in joined and "/../" not in joined
            and "/\x00" not in joined and "/.\x00" not in joined and "/..\x00" not in joined)


def _fast_stashed_files(docs: list[Any]) -> tuple[StashedFile, ...] | None:
    """The records when every check passes at once (thousands per manifest); None sends
    the caller to the field-by-field reading, which names what is wrong. Accepts only
    what StashedFile.from_json accepts, and builds equal records."""
    out: list[StashedFile] = []
    paths: list[str] = []
    shas: list[str] = []
    trees, sources, stash, canonical = _TREES, _SOURCES, Source.STASH, _CANONICAL
    for doc in docs:
        if type(doc) is not dict:
            return None
        if len(doc) == 12 and tuple(doc) == canonical:  # as to_json writes a stash record
            (path, size, sha256, mode, uid, gid, mtime_ns, kind, module, kernel, package,
             link) = doc.values()
            raw_source, version = "stash", None
        else:
            get = doc.get
            path, sha256, kind = get("path"), get("sha256"), get("kind", "module")
            size, mode, uid, gid, mtime_ns = (get("size"), get("mode"), get("uid"),
                                              get("gid"), get("mtime_ns"))
            module, kernel, package, link = (get("module"), get("kernel"), get("package"),
                                             get("link"))
            raw_source, version = get("source", "stash"), get("version")
        if not (type(path) is str and type(sha256) is str and len(sha256) == 64
                and type(kind) is str and kind in trees and path.startswith(trees[kind])
                and type(size) is int and type(mode) is int and type(uid) is int
                and type(gid) is int and type(mtime_ns) is int
                and (size | mode | uid | gid | mtime_ns) >= 0 and mode <= 0o7777
                and (module is None or type(module) is str)
                and (kernel is None or type(kernel) is str)
                and (package is None or type(package) is str)
                and (link is None or type(link) is str)
                and (version is None or type(version) is str)
                and type(raw_source) is str):
            return None
        source = sources.get(raw_source)
        if source is not stash and (source is None
                                    or not _archive_origin(package, version)):
            return None
        if kind == "package-control" and (module is None or not _PLAIN_NAME.match(module)):
            return None
        paths.append(path)
        shas.append(sha256)
        record = _new(StashedFile)
        _set(record, "__dict__", {
            "path": path, "size": size, "sha256": sha256, "mode": mode, "uid": uid,
            "gid": gid, "mtime_ns": mtime_ns, "kind": kind, "module": module,
            "kernel": kernel, "package": package, "link": link, "source": source,
            "version": version})
        out.append(record)
    if not paths_are_normalised(paths) or not _HEX.match("".join(shas)):
        return None
    return tuple(out)


@dataclass(frozen=True)
class RemovedPackage:
    """A whole package kmodtrim removed through the package manager, with everything needed
    to rebuild it offline (dpkg-repack style) and install it again.

    ``files`` are every non-directory path the package owns, as it spells them, each with
    its stash copy (files already trimmed share the blob of their ``removed`` entry);
    ``control`` are the package manager's own files for it (dpkg: maintainer scripts,
    md5sums, … with ``module`` holding the control file's name), also stashed; ``dirs``
    the directories it lists with their modes; ``absent`` paths it lists that were already
    missing from the tree for another reason (e.g. documentation a site ``path-exclude``
    keeps out) and that a rebuilt package therefore lacks; ``metadata`` what the backend
    needs for the package's header (dpkg: the control paragraph; rpm: header tags)."""

    name: str  # as the package manager names it (dpkg ``name`` or ``name:arch``)
    version: str
    arch: str
    backend: str  # "dpkg" or "rpm"
    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[StashedFile, ...] = ()
    control: tuple[StashedFile, ...] = ()
    dirs: tuple[tuple[str, int], ...] = ()
    absent: tuple[str, ...] = ()

    @property
    def blobs(self) -> set[str]:
        """The stash blobs a rebuild of this package reads."""
        return {f.sha256 for f in self.files + self.control if f.link is None}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "arch": self.arch,
            "backend": self.backend, "metadata": dict(self.metadata),
            "files": [f.to_json() for f in self.files],
            "control": [f.to_json() for f in self.control],
            "dirs": [[path, mode] for path, mode in self.dirs],
            "absent": list(self.absent),
        }

    @staticmethod
    def from_json(doc: object) -> RemovedPackage:
        """Raises StoreError for a wrong type, a missing field or an unsafe path."""
        f = _Fields(doc, "removed package record")
        name = f.text("name")
        dirs = []
        for item in f.objects("dirs"):
            if (not isinstance(item, list) or len(item) != 2
                    or not isinstance(item[1], int) or isinstance(item[1], bool)):
                raise StoreError(f"removed package {name}: a dirs entry is not [path, mode]")
            dirs.append((package_listing_path(item[0]), int(item[1]) & 0o7777))
        return RemovedPackage(
            name=name, version=f.text("version"), arch=f.text("arch"),
            backend=f.text("backend"), metadata=f.mapping("metadata"),
            files=stashed_files(f.objects("files")),
            control=stashed_files(f.objects("control")),
            dirs=tuple(dirs),
            absent=tuple(package_listing_path(p) for p in f.texts("absent")),
        )


@dataclass(frozen=True)
class Generation:
    """One numbered state of the trimmed files. ``removed`` is the whole state (every file
    out of the tree), not only this generation's changes."""

    number: int
    created: str
    action: str  # "untrimmed", "apply", "rollback", "restore"
    description: str
    removed: tuple[StashedFile, ...] = ()
    stashed: tuple[str, ...] = ()  # paths this generation took out
    restored: tuple[str, ...] = ()  # paths this generation put back
    kernels: tuple[str, ...] = ()  # kernels whose trees changed
    rollback_to: int | None = None
    keep_reasons: dict[str, str] = field(default_factory=dict)
    regen: dict[str, Any] = field(default_factory=dict)
    # Whole packages out of the system (the whole state, like ``removed``), and the
    # package operations this generation ran.
    packages: tuple[RemovedPackage, ...] = ()
    packages_removed: tuple[str, ...] = ()
    packages_reinstalled: tuple[str, ...] = ()
    # Package managers whose exclusions (dpkg path-exclude, rpm netsharedpath) this state
    # has written: each must rewrite them on the next change, whatever the policy says then.
    exclusion_backends: tuple[str, ...] = ()

    @property
    def removed_bytes(self) -> int:
        return sum(f.size for f in self.removed)

    @property
    def referenced_blobs(self) -> set[str]:
        """Every stash blob this state needs: removed files and removed packages. A file
        the archive serves has no blob, but its sha256 keeps the pack whose manifest
        describes it (the stash describes every file out of the tree)."""
        blobs = {f.sha256 for f in self.removed}
        for package in self.packages:
            blobs |= package.blobs
        return blobs

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["removed"] = [entry.to_json() for entry in self.removed]
        for key in ("stashed", "restored", "kernels", "packages_removed",
                    "packages_reinstalled", "exclusion_backends"):
            doc[key] = list(doc[key])
        doc["packages"] = [p.to_json() for p in self.packages]
        doc["keep_reasons"] = dict(self.keep_reasons)
        doc["regen"] = dict(self.regen)
        doc["removed_bytes"] = self.removed_bytes
        return doc

    @staticmethod
    def from_json(doc: object) -> Generation:
        """Raises StoreError for a wrong type, a missing field or an unsafe path."""
        f = _Fields(doc, "generation manifest")
        regen = f.mapping("regen")
        return Generation(
            number=f.number("number"), created=f.text("created", ""), action=f.text("action"),
            description=f.text("description", ""),
            removed=stashed_files(f.objects("removed")),
            stashed=f.texts("stashed"), restored=f.texts("restored"), kernels=f.texts("kernels"),
            rollback_to=f.opt_number("rollback_to"),
            keep_reasons={str(k): str(v) for k, v in f.mapping("keep_reasons").items()},
            regen=regen,
            packages=tuple(RemovedPackage.from_json(x) for x in f.objects("packages")),
            packages_removed=f.texts("packages_removed"),
            packages_reinstalled=f.texts("packages_reinstalled"),
            exclusion_backends=f.texts("exclusion_backends"),
        )


GENERATION_ZERO = Generation(0, "", "untrimmed", "the tree as installed")
