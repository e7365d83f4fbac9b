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

The package's files: macros.py holds rpm's macros for a root (the rpm command line,
``%_netsharedpath``), spec.py rebuilds a package's spec file from its header, backend.py
is RpmBackend.
"""

from __future__ import annotations

from .backend import DNF_LOCK, RpmBackend
from .macros import (
    MACRO_FILE,
    effective_netsharedpath,
    macro_path,
    rpm_command,
    system_netsharedpath,
)

__all__ = [
    "DNF_LOCK",
    "MACRO_FILE",
    "RpmBackend",
    "effective_netsharedpath",
    "macro_path",
    "rpm_command",
    "system_netsharedpath",
]
