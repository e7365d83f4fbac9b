"""Rebuilding an installed rpm package: its header (``rpm -q --xml``) read into tags and
dependency lists, and the spec file that packages its stashed files again as it was."""

from __future__ import annotations

import re
import shlex
import stat
from pathlib import Path
from typing import Any

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
