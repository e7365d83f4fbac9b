"""A real Debian VM for end-to-end tests: systemd as PID 1, journald, udev, the system bus,
and kmodtrimd installed from this tree with its own unit, bus policy and activation file.

The root file system is a Debian bookworm ``debootstrap --variant=minbase`` (cached under
.cache/vm) plus the Debian cloud kernel's modules, kmodtrim and its Python dependencies
(``pip install --target``, same Python minor version as Debian's python3). It boots under
qemu from one uncompressed cpio archive used as the initramfs (``rdinit=/sbin/init``), so
no boot loader, disk image or initramfs generator is involved. A check service inside the
guest writes its findings to the serial console; the host talks QMP to hot-plug devices.

Skips unless run as root with qemu-system-x86_64, debootstrap and cpio installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from debroots import debootstrap
from kernels import KernelTree, kernel_cache_dir
from need import need
from pkgbuild import sh

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# nftables: the guest asks for netfilter modules by alias (restore on demand).
BASE_PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "kmod", "python3", "iproute2",
                 "nftables")
PYTHON_DIR = "/usr/local/lib/kmodtrim"


def need_vm_tools() -> None:
    need("qemu-system-x86_64", "debootstrap", "cpio", root=True)


def base_image() -> Path:
    """The cached debootstrap of Debian bookworm (built once, ~1 min and ~270 MB)."""
    cache = kernel_cache_dir().parent / "vm"
    # Named after its package list: a list changed is a new image, never a stale one.
    packages = hashlib.sha256(" ".join(BASE_PACKAGES).encode()).hexdigest()[:8]
    base = cache / f"{SUITE}-minbase-{packages}"
    if (base / "etc/os-release").exists():
        return base
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{base.name}.partial"
    debootstrap(SUITE, partial, BASE_PACKAGES)
    partial.rename(base)
    return base


def build_image(dest: Path, kernel: KernelTree, *, policy: str, check_script: str) -> Path:
    """A guest root at ``dest``: the base image, ``kernel``'s modules and image, kmodtrim
    with its units (kmodtrimd enabled), ``policy`` as /etc/kmodtrim/policy.toml, and
    ``check_script`` run by vmcheck.service once kmodtrimd is up."""
    sh("cp", "-a", "--reflink=auto", f"{base_image()}/.", dest)
    sh("cp", "-a", "--reflink=auto", f"{kernel.root}/lib/.", dest / "lib")
    sh("cp", "-a", "--reflink=auto", f"{kernel.root}/boot/.", dest / "boot")
    # pip keeps the caller's environment: its index settings may come from PIP_* variables.
    sh(sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
       "--disable-pip-version-check", "--target", dest / PYTHON_DIR.lstrip("/"), REPO,
       env=os.environ)
    for name, module in (("kmodtrim", "kmodtrim.cli"), ("kmodtrimd", "kmodtrim.daemon")):
        wrapper = dest / "usr/bin" / name
        wrapper.write_text(f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, {PYTHON_DIR!r})\n"
                           f"from {module} import main\nsys.exit(main())\n")
        wrapper.chmod(0o755)
    units = REPO / "units"
    for src, where in (
        ("kmodtrimd.service", "etc/systemd/system"),
        ("org.kmodtrim.KmodTrim1.conf", "usr/share/dbus-1/system.d"),
        ("org.kmodtrim.KmodTrim1.service", "usr/share/dbus-1/system-services"),
    ):
        (dest / where).mkdir(parents=True, exist_ok=True)
        shutil.copy2(units / src, dest / where / src)
    shutil.copy2(units / "kmodtrim.tmpfiles", dest / "usr/lib/tmpfiles.d/kmodtrim.conf")
    (dest / "etc/kmodtrim").mkdir(parents=True, exist_ok=True)
    (dest / "etc/kmodtrim/policy.toml").write_text(policy)
    script = dest / "usr/local/sbin/vmcheck"
    script.write_text(check_script)
    script.chmod(0o755)
    (dest / "etc/systemd/system/vmcheck.service").write_text(
        "[Unit]\nDescription=kmodtrim VM checks\nAfter=kmodtrimd.service\n"
        "Wants=kmodtrimd.service\n\n[Service]\nType=oneshot\n"
        "ExecStart=/usr/local/sbin/vmcheck\nStandardOutput=tty\nStandardError=tty\n"
        "TTYPath=/dev/ttyS0\n\n[Install]\nWantedBy=multi-user.target\n")
    wants = dest / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("kmodtrimd.service", "vmcheck.service"):
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    (dest / "etc/hostname").write_text("kmodtrim-vm\n")
    # The console belongs to the check script; no login prompt on it.
    (dest / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    sh("depmod", "-b", dest, kernel.kver)
    return dest


def pack_initramfs(root: Path, archive: Path) -> Path:
    """``root`` as an uncompressed newc cpio archive (the guest's whole root file system)."""
    names = sh("find", ".", "-mindepth", "1", cwd=root).stdout
    with open(archive, "wb") as out:
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], input=names.encode(),
                              stdout=out, stderr=subprocess.PIPE, cwd=root, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"cpio failed: {proc.stderr.decode()}")
    return archive


class Guest:
    """A running qemu guest: its serial console lines and a QMP connection."""

    def __init__(self, proc: subprocess.Popen[bytes], qmp_path: Path) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._qmp_path = qmp_path
        self._qmp: socket.socket | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, marker: str, timeout: float) -> str:
        """The first console line containing ``marker``; fails with the console's tail."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((ln for ln in self.lines if marker in ln), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-60:])
                    raise AssertionError(f"no {marker!r} on the guest console:\n{tail}")
                self._cond.wait(min(left, 1.0))

    def qmp(self, command: str, **arguments: object) -> dict[str, object]:
        """Run a QMP command; returns its reply (events in between are skipped)."""
        if self._qmp is None:
            self._qmp = socket.socket(socket.AF_UNIX)
            self._qmp.connect(str(self._qmp_path))
            self._qmp_file = self._qmp.makefile("rwb")
            json.loads(self._qmp_file.readline())  # greeting
            self.qmp("qmp_capabilities")
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._qmp_file.write(json.dumps(request).encode() + b"\n")
        self._qmp_file.flush()
        while True:
            reply: dict[str, object] = json.loads(self._qmp_file.readline())
            if "return" in reply or "error" in reply:
                return reply

    def console(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@contextmanager
def boot(kernel_image: Path, initramfs: Path, workdir: Path, *, memory_mb: int = 2048,
         append: str = "") -> Iterator[Guest]:
    """Boot a guest (software emulation: nested KVM is not dependable) until the block
    ends, then power it off."""
    qmp_path = workdir / "qmp.sock"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", str(memory_mb),
        "-smp", "2", "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-nic", "user,model=virtio-net-pci",
        "-kernel", str(kernel_image), "-initrd", str(initramfs),
        "-append", f"console=ttyS0 rdinit=/sbin/init panic=-1 {append}".strip(),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Guest(proc, qmp_path)
    finally:
        proc.kill()
        proc.wait()
