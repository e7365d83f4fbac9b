"""Restore on demand never hangs modprobe: with the real dpkg and apt on scratch roots, a
package-manager lock held by a transaction and an archive that refuses or does not answer
each fail ``kmodtrim restore --on-demand NAME`` within seconds, with one line naming
what, and lose nothing; a module the stash serves comes back while dpkg is locked."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import test_archive_restore as archive
import test_package_removal as removal
from kmodtrim.store import current_generation
from pkgbuild import hold_lock
from test_archive_restore import debs as archive_debs
from test_package_removal import debs, root

__all__ = ["archive_debs", "debs", "root"]  # the fixtures, re-exported for pytest

ON_DEMAND = ("restore", "--on-demand")


def test_a_held_dpkg_lock_fails_a_package_reinstall_fast_and_loses_nothing(
        root: Path) -> None:
    proc = removal.apply(root)
    assert proc.returncode == 0, proc.stderr
    assert removal.installed_version(root, removal.EXTRA) is None  # it left whole
    before, generation = removal.snapshot(root), current_generation(root).number
    lock = root / "var/lib/dpkg/lock-frontend"
    holder = hold_lock(lock)  # as apt holds it during a transaction
    try:
        started = time.monotonic()
        # e_three comes back by reinstalling its package: that needs dpkg's lock.
        proc = removal.kmodtrim(root, *ON_DEMAND, "e_three")
        took = time.monotonic() - started
        lines = proc.stderr.strip().splitlines()
        command = Path(f"/proc/{holder.pid}/comm").read_text().strip()  # the holder's name
        assert proc.returncode == 1, proc.stderr
        assert re.fullmatch(
            rf"kmodtrim: error: e_three not restored for modprobe: dpkg is busy: "
            rf"{re.escape(str(lock))} is locked by {re.escape(command)} "
            rf"\(pid {holder.pid}\) "
            r"\(waited 3 s\)", lines[0]), lines
        assert len(lines) <= 2  # the line and its hint
        assert took < 15, took
        assert removal.snapshot(root) == before  # nothing lost, nothing half-done
        assert current_generation(root).number == generation
        assert removal.installed_version(root, removal.EXTRA) is None
        assert removal.audit(root) == ""
        # A module the stash serves needs no package manager: it comes back meanwhile.
        proc = removal.kmodtrim(root, *ON_DEMAND, "unused")
        assert proc.returncode == 0, proc.stderr
        assert removal.present(root, f"{removal.MODDIR}/unused.ko")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    proc = removal.kmodtrim(root, *ON_DEMAND, "e_three")  # the transaction has ended
    assert proc.returncode == 0, proc.stderr
    assert removal.installed_version(root, removal.EXTRA) == "1.2-3"
    assert removal.present(root, removal.E_THREE)


@contextlib.contextmanager
def _serving(directory: Path) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 serving ``directory``; yields its port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _silent(port: int) -> Iterator[None]:
    """Something listening on ``port`` that accepts connections and never answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    try:
        yield
    finally:
        sock.close()


def test_an_archive_that_refuses_or_does_not_answer_fails_fast_and_loses_nothing(
        tmp_path: Path, archive_debs: dict[str, Path]) -> None:
    repo = tmp_path / "archive"
    archive.publish(repo, archive_debs["installed"])
    root = archive.make_root(tmp_path, archive_debs["installed"], repo)
    with _serving(repo) as port:  # the root's archive is served over http from now on
        (root / "etc/apt/sources.list").write_text(
            f"deb [trusted=yes] http://127.0.0.1:{port}/ ./\n")
        archive.apt_update(root)
        archive.apply(root)  # keep = "none": unused_a and unused_b only in the archive
    trimmed = archive.snapshot(root)
    generation = current_generation(root).number
    # apt waits 120 s by default for a server that does not answer, and retries; on
    # demand it waits ON_DEMAND_DOWNLOAD.stall (10 s) once.
    cases = (("nothing listens", 0, 10, contextlib.nullcontext()),
             ("accepted, never answered", 9, 40, _silent(port)))
    for why, least, bound, context in cases:
        with context:
            started = time.monotonic()
            proc = archive.kmodtrim(root, *ON_DEMAND, "unused_b")
            took = time.monotonic() - started
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (why, proc.stderr)
        assert lines[0].startswith(
            f"kmodtrim: error: unused_b not restored for modprobe: cannot restore "
            f"{archive.MODDIR}/unused_a.ko.xz: the archive does not give "
            f"{archive.IMAGE} {archive.VERSION} ("), (why, lines)
        assert lines[0].endswith("; nothing was written"), (why, lines)
        assert len(lines) <= 2, (why, lines)
        assert least <= took < bound, (why, took)
        assert archive.snapshot(root) == trimmed and archive.stray_files(root) == []
        assert current_generation(root).number == generation
