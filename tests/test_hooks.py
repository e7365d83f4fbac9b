"""The kernel-install plugin and the Debian kernel hooks hand kernel versions to kmodtrim.

The hooks are run with the arguments their callers document (kernel-install, and run-parts
from a Debian kernel package's maintainer scripts), with ``kmodtrim`` on PATH replaced by a
small recording script: these tests prove the hooks' argument handling and that they never
fail a kernel installation; the tests of ``kmodtrim kernel-event`` prove the verb itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from need import need

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
PLUGIN = UNITS / "45-kmodtrim.install"
POSTINST = UNITS / "kernel-postinst.d-kmodtrim"
POSTRM = UNITS / "kernel-postrm.d-kmodtrim"

KVER = "6.1.0-28-cloud-amd64"

# Records each call as one line per argument, then "--", plus what its stdin was; prints
# on stdout and stderr so the tests see where a hook sends a tool's output; exits with
# $STUB_EXIT.
STUB = """#!/bin/sh
{
    for arg in "$@"; do printf '%s\\n' "$arg"; done
    printf 'stdin=%s\\n' "$(readlink /proc/self/fd/0)"
    printf -- '--\\n'
} >>"$STUB_LOG"
echo "stub says hello on stdout"
echo "stub says hello on stderr" >&2
exit "${STUB_EXIT:-0}"
"""


@dataclass(frozen=True)
class Call:
    argv: tuple[str, ...]
    stdin: str


@dataclass(frozen=True)
class Scratch:
    """A PATH with a recording ``kmodtrim`` and the basic tools the hooks use."""

    bin_dir: Path
    log: Path
    tmp: Path

    def env(self, stub_exit: int = 0, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "STUB_LOG": str(self.log),
            "STUB_EXIT": str(stub_exit),
            "TMPDIR": str(self.tmp),
            "LC_ALL": "C",
            **extra,
        }

    def calls(self) -> list[Call]:
        if not self.log.exists():
            return []
        calls: list[Call] = []
        lines: list[str] = []
        for line in self.log.read_text().splitlines():
            if line == "--":
                *argv, stdin = lines
                calls.append(Call(tuple(argv), stdin.removeprefix("stdin=")))
                lines = []
            else:
                lines.append(line)
        return calls


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "kmodtrim"
    stub.write_text(STUB)
    stub.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return Scratch(bin_dir=bin_dir, log=tmp_path / "calls.log", tmp=tmp)


def run_hook(hook: Path, args: list[str], env: Mapping[str, str],
             stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # stdin carries data a careless hook would swallow; the stub reports what it got.
    return subprocess.run([str(hook), *args], input=stdin, capture_output=True,
                          env=dict(env), timeout=30, check=False)


# --- kernel-install plugin -----------------------------------------------------------


def test_plugin_add_hands_kernel_version_to_kmodtrim(scratch: Scratch) -> None:
    proc = run_hook(PLUGIN, ["add", KVER, "/boot/abc/" + KVER, "/boot/vmlinuz-" + KVER,
                             "/boot/initrd.img-" + KVER], scratch.env())
    assert proc.returncode == 0, proc.stderr
    assert [c.argv for c in scratch.calls()] == [("kernel-event", "add", KVER)]


def test_plugin_remove_hands_kernel_version_to_kmodtrim(scratch: Scratch) -> None:
    proc = run_hook(PLUGIN, ["remove", KVER, "/boot/abc/" + KVER], scratch.env())
    assert proc.returncode == 0, proc.stderr
    assert [c.argv for c in scratch.calls()] == [("kernel-event", "remove", KVER)]


@pytest.mark.parametrize("args", [["inspect"], [], ["add-all", KVER], ["frobnicate", KVER]])
def test_plugin_ignores_other_commands(scratch: Scratch, args: list[str]) -> None:
    proc = run_hook(PLUGIN, args, scratch.env())
    assert proc.returncode == 0, proc.stderr
    assert scratch.calls() == []


def test_plugin_without_kernel_version_does_nothing_and_succeeds(scratch: Scratch) -> None:
    proc = run_hook(PLUGIN, ["add"], scratch.env())
    assert proc.returncode == 0
    assert scratch.calls() == []
    assert b"without a kernel version" in proc.stderr


@pytest.mark.parametrize("stub_exit", [1, 2, 77, 127])
def test_plugin_succeeds_when_kmodtrim_fails(scratch: Scratch, stub_exit: int) -> None:
    proc = run_hook(PLUGIN, ["add", KVER, "/boot/e", "/boot/vmlinuz"],
                    scratch.env(stub_exit=stub_exit))
    assert proc.returncode == 0  # never 77: that would skip depmod and the initramfs
    assert len(scratch.calls()) == 1
    assert f"exit status {stub_exit}".encode() in proc.stderr


def test_plugin_succeeds_when_kmodtrim_is_not_installed(scratch: Scratch) -> None:
    (scratch.bin_dir / "kmodtrim").unlink()
    proc = run_hook(PLUGIN, ["add", KVER, "/boot/e", "/boot/vmlinuz"], scratch.env())
    assert proc.returncode == 0
    assert proc.stdout == b""


def test_plugin_keeps_stdin_and_stdout_to_itself(scratch: Scratch) -> None:
    proc = run_hook(PLUGIN, ["add", KVER, "/boot/e", "/boot/vmlinuz"], scratch.env(),
                    stdin=b"y\n")
    assert proc.returncode == 0
    assert scratch.calls()[0].stdin == "/dev/null"
    assert proc.stdout == b""
    assert b"stub says hello on stdout" in proc.stderr


def test_plugin_is_quiet_unless_kernel_install_is_verbose(scratch: Scratch) -> None:
    quiet = run_hook(PLUGIN, ["add", KVER, "/boot/e", "/boot/vmlinuz"],
                     scratch.env(KERNEL_INSTALL_VERBOSE="0"))
    verbose = run_hook(PLUGIN, ["add", KVER, "/boot/e", "/boot/vmlinuz"],
                       scratch.env(KERNEL_INSTALL_VERBOSE="1"))
    assert quiet.returncode == verbose.returncode == 0
    assert b"45-kmodtrim" not in quiet.stderr
    assert f"kmodtrim kernel-event add {KVER}".encode() in verbose.stderr


def _kernel_install_env(scratch: Scratch, tmp_path: Path, plugins: list[Path],
                        stub_exit: int = 0) -> dict[str, str]:
    conf = tmp_path / "kernel-conf"  # no install.conf: nothing read from the host's /etc
    conf.mkdir(exist_ok=True)
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    return scratch.env(
        stub_exit=stub_exit,
        KERNEL_INSTALL_CONF_ROOT=str(conf),
        BOOT_ROOT=str(boot),
        MACHINE_ID="0123456789abcdef0123456789abcdef",
        KERNEL_INSTALL_PLUGINS=" ".join(str(p) for p in plugins),
    )


def _recording_plugin(path: Path, log: Path) -> Path:
    path.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >>"{log}"\nexit 0\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("stub_exit", [0, 1, 77])
def test_real_kernel_install_runs_later_plugins_whatever_kmodtrim_does(
        scratch: Scratch, tmp_path: Path, stub_exit: int) -> None:
    need("kernel-install")
    order = tmp_path / "order.log"
    plugins_dir = tmp_path / "install.d"
    plugins_dir.mkdir()
    depmod = _recording_plugin(plugins_dir / "50-depmod.install", order)
    dracut = _recording_plugin(plugins_dir / "50-dracut.install", order)
    # kernel-install runs plugins in lexical order of their names; ours must sort first.
    plugins = sorted([depmod, dracut, PLUGIN], key=lambda p: p.name)
    assert plugins[0] == PLUGIN
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"not really a kernel")
    env = _kernel_install_env(scratch, tmp_path, plugins, stub_exit)

    added = subprocess.run(["kernel-install", "add", KVER, str(image)], env=env,
                           capture_output=True, timeout=30, check=False)
    removed = subprocess.run(["kernel-install", "remove", KVER], env=env,
                             capture_output=True, timeout=30, check=False)

    assert added.returncode == 0, added.stderr
    assert removed.returncode == 0, removed.stderr
    assert [c.argv for c in scratch.calls()] == [
        ("kernel-event", "add", KVER), ("kernel-event", "remove", KVER)]
    entry_dir = tmp_path / "boot" / "0123456789abcdef0123456789abcdef" / KVER
    assert order.read_text().splitlines() == [
        f"50-depmod.install add {KVER} {entry_dir} {image}",
        f"50-dracut.install add {KVER} {entry_dir} {image}",
        f"50-depmod.install remove {KVER} {entry_dir}",
        f"50-dracut.install remove {KVER} {entry_dir}",
    ]


# --- Debian /etc/kernel/postinst.d and postrm.d hooks --------------------------------


@pytest.mark.parametrize(("hook", "action"), [(POSTINST, "add"), (POSTRM, "remove")])
def test_debian_hook_hands_kernel_version_to_kmodtrim(scratch: Scratch, hook: Path,
                                                      action: str) -> None:
    proc = run_hook(hook, [KVER, f"/boot/vmlinuz-{KVER}"], scratch.env(), stdin=b"y\n")
    assert proc.returncode == 0, proc.stderr
    assert scratch.calls() == [Call(("kernel-event", action, KVER), "/dev/null")]
    assert proc.stdout == b""  # stdout may belong to debconf
    assert b"stub says hello on stdout" in proc.stderr


@pytest.mark.parametrize("hook", [POSTINST, POSTRM])
def test_debian_hook_accepts_version_without_image(scratch: Scratch, hook: Path) -> None:
    proc = run_hook(hook, [KVER], scratch.env())
    assert proc.returncode == 0
    assert [c.argv[2] for c in scratch.calls()] == [KVER]


@pytest.mark.parametrize(("hook", "params", "acts"), [
    (POSTINST, "configure 6.1.119-1", True),
    (POSTINST, "'configure' '6.1.119-1'", True),
    (POSTINST, "abort-upgrade 6.1.119-1", False),
    (POSTINST, "abort-remove", False),
    (POSTRM, "remove", True),
    (POSTRM, "'remove'", True),
    (POSTRM, "purge", False),
    (POSTRM, "upgrade 6.1.119-1", False),
    (POSTRM, "*", False),
])
def test_debian_hook_acts_once_per_package_operation(scratch: Scratch, hook: Path,
                                                     params: str, acts: bool) -> None:
    proc = run_hook(hook, [KVER, f"/boot/vmlinuz-{KVER}"],
                    scratch.env(DEB_MAINT_PARAMS=params))
    assert proc.returncode == 0
    assert len(scratch.calls()) == (1 if acts else 0)


@pytest.mark.parametrize("hook", [POSTINST, POSTRM])
@pytest.mark.parametrize("stub_exit", [1, 77, 255])
def test_debian_hook_succeeds_when_kmodtrim_fails(scratch: Scratch, hook: Path,
                                                  stub_exit: int) -> None:
    proc = run_hook(hook, [KVER, f"/boot/vmlinuz-{KVER}"], scratch.env(stub_exit=stub_exit))
    assert proc.returncode == 0
    assert proc.stdout == b""
    assert f"exit status {stub_exit}".encode() in proc.stderr


@pytest.mark.parametrize("hook", [POSTINST, POSTRM])
def test_debian_hook_left_behind_after_package_removal_is_silent(scratch: Scratch,
                                                                 hook: Path) -> None:
    # /etc/kernel hooks are conffiles: they outlive "apt remove kmodtrim".
    (scratch.bin_dir / "kmodtrim").unlink()
    proc = run_hook(hook, [KVER, f"/boot/vmlinuz-{KVER}"], scratch.env())
    assert proc.returncode == 0
    assert proc.stdout == b"" and proc.stderr == b""


@pytest.mark.parametrize("hook", [POSTINST, POSTRM])
def test_debian_hook_without_arguments_does_nothing(scratch: Scratch, hook: Path) -> None:
    proc = run_hook(hook, [], scratch.env())
    assert proc.returncode == 0
    assert scratch.calls() == []


def _install_hook_dir(tmp_path: Path, name: str, hook: Path) -> Path:
    """Lay the hook out as the packages install it: /etc/kernel/<name>.d/kmodtrim."""
    directory = tmp_path / "etc" / "kernel" / name
    directory.mkdir(parents=True)
    installed = directory / "kmodtrim"
    shutil.copy2(hook, installed)
    return directory


@pytest.mark.parametrize(("name", "hook", "params", "action"), [
    ("postinst.d", POSTINST, "configure 6.1.119-1", "add"),
    ("postrm.d", POSTRM, "remove", "remove"),
])
def test_run_parts_runs_installed_hook_like_a_kernel_package(
        scratch: Scratch, tmp_path: Path, name: str, hook: Path, params: str,
        action: str) -> None:
    directory = _install_hook_dir(tmp_path, name, hook)
    assert os.stat(directory / "kmodtrim").st_mode & stat.S_IXUSR

    listed = subprocess.run(["run-parts", "--test", str(directory)], capture_output=True,
                            text=True, check=True)
    assert listed.stdout.splitlines() == [str(directory / "kmodtrim")]

    # As linux-image-*.postinst / postrm call it.
    env = scratch.env(stub_exit=1, DEB_MAINT_PARAMS=params)
    proc = subprocess.run(
        ["run-parts", "--report", "--exit-on-error", f"--arg={KVER}",
         f"--arg=/boot/vmlinuz-{KVER}", str(directory)],
        input=b"", capture_output=True, env=env, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert [c.argv for c in scratch.calls()] == [("kernel-event", action, KVER)]


def test_hooks_are_posix_shell_scripts() -> None:
    for hook in (PLUGIN, POSTINST, POSTRM):
        assert hook.read_text().startswith("#!/bin/sh\n"), hook
        assert hook.stat().st_mode & stat.S_IXUSR, f"{hook} is not executable"
        # `sh -n` parses without running; dash is the strict POSIX shell Debian uses.
        shell = shutil.which("dash") or "sh"
        subprocess.run([shell, "-n", str(hook)], check=True)
