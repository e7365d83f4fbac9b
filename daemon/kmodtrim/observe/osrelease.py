"""os-release(5) below a root: the image's ID, VERSION_ID, IMAGE_ID and IMAGE_VERSION
(what a fleet export names an image by, and what ``$releasever`` means in an rpm root's
repositories)."""

from __future__ import annotations

import shlex
from pathlib import Path

from .inroot import _inroot_realpath, _read_text

OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")
OS_RELEASE_KEYS = {"ID": "id", "VERSION_ID": "version_id", "IMAGE_ID": "image_id",
                   "IMAGE_VERSION": "image_version"}


def parse_os_release(text: str) -> dict[str, str | None]:
    """The image fields of an os-release file (shell-style ``KEY=value`` lines, quoted or
    not; os-release(5)); None for a field the file lacks."""
    found: dict[str, str | None] = dict.fromkeys(OS_RELEASE_KEYS.values())
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key not in OS_RELEASE_KEYS:
            continue
        try:
            words = shlex.split(value)
        except ValueError:  # an unbalanced quote: take the line as written
            words = [value.strip("\"'")]
        found[OS_RELEASE_KEYS[key]] = " ".join(words) or None
    return found


def read_os_release(root: Path) -> dict[str, str | None]:
    """parse_os_release of the root's os-release (links resolved inside the root, as
    systemd does: /etc/os-release, else /usr/lib/os-release); every field None without
    one. Raises ObservationError for a file that is not a regular file or is too large."""
    for name in OS_RELEASE_FILES:
        text = _read_text(root, _inroot_realpath(root, name))
        if text is not None:
            return parse_os_release(text)
    return dict.fromkeys(OS_RELEASE_KEYS.values())
