"""Disk really freed: bytes a trim takes out of the module tree, net of what the stash
keeps, for each ``[stash] keep`` on Debian's generic kernels.

For each release, the real linux-image .deb is installed with dpkg into a scratch root
(its maintainer scripts left out: they need a whole system; depmod is run here) whose own
apt configuration names a local archive (a ``file:`` source made with dpkg-scanpackages)
serving that very .deb. Then `kmodtrim apply` with the recorded VM observation and the
default policy, except ``[stash] keep`` (and ``initramfs = "skip"``, no boot here), and
the figures from ``du``-like sums of allocated blocks: the module tree before and after,
the stash, net freed and its share of the tree, and the apply's wall time. Beside them,
Debian's own answer to a small kernel: its cloud kernel package's module tree as
installed, untrimmed, of the same release. ``--cloud NAME`` trims for that platform
(a scratch root shows none, so by default every platform's drivers stay).

    .venv/bin/python benchmarks/bench_net_freed.py [--release bookworm|trixie|both]
        [--keep likely,all,none] [--cloud NAME] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, timed  # puts tests/ on the path

from kernels import KernelTree, prepare_kernel
from kmodtrim.backends.dpkg import dpkg_command

MIB = 1 << 20


def allocated(path: Path) -> int:
    """Bytes of disk the files under ``path`` take (du: allocated blocks, links once)."""
    total, seen = 0, set()
    for top, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(top, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def sh(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                            "LC_ALL": "C"})
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{proc.stderr}")
    return proc.stdout


def scriptless(deb: Path, work: Path) -> Path:
    """The .deb without maintainer scripts: the same files and md5sums."""
    tree = work / "deb-tree"
    sh("dpkg-deb", "-R", deb, tree)
    for script in ("preinst", "postinst", "prerm", "postrm"):
        (tree / "DEBIAN" / script).unlink(missing_ok=True)
    out = work / deb.name
    sh("dpkg-deb", "--root-owner-group", "-Znone", "--build", tree, out)
    return out


def installed_root(kernel: KernelTree, work: Path, keep: str) -> Path:
    root = work / "root"
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log", "etc/dpkg/dpkg.cfg.d",
                "etc/kmodtrim", "etc/apt/preferences.d", "var/lib/apt/lists/partial",
                "var/cache/apt/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (root / "var/lib/dpkg" / name).touch()
    if kernel.release.usrmerged:
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    sh(*dpkg_command(root), "--force-depends", "-i", scriptless(kernel.deb, work))
    sh("depmod", "-b", root, kernel.kver)
    repo = work / "archive"
    repo.mkdir()
    os.link(kernel.deb, repo / kernel.deb.name)
    (repo / "Packages").write_text(sh("dpkg-scanpackages", ".", "/dev/null", cwd=repo))
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    sh("apt-get", "-q", "-o", f"Dir={root}", "update")
    (root / "etc/kmodtrim/policy.toml").write_text(
        f'initramfs = "skip"\n[stash]\nkeep = "{keep}"\n')
    return root


def measure(kernel: KernelTree, keep: str, clouds: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch:
        work = Path(scratch)
        root = installed_root(kernel, work, keep)
        moddir = root / "usr/lib/modules" if kernel.release.usrmerged else root / "lib/modules"
        tree_before = allocated(moddir / kernel.kver)
        seconds = timed([sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--force",
                         "--observed", str(OBSERVED), "--root", str(root), "--kernel",
                         kernel.kver, "--symvers", str(kernel.symvers), "--offline",
                         *(arg for cloud in clouds for arg in ("--cloud", cloud))])
        tree_after = allocated(moddir / kernel.kver)
        stash = allocated(root / "var/lib/kmodtrim/stash")
        net = tree_before - tree_after - stash
        return {"release": kernel.release.name, "kernel": kernel.kver, "keep": keep,
                "clouds": clouds or "every platform",
                "tree_before_mib": round(tree_before / MIB, 1),
                "tree_after_mib": round(tree_after / MIB, 1),
                "stash_mib": round(stash / MIB, 1), "net_freed_mib": round(net / MIB, 1),
                "net_freed_percent": round(100 * net / tree_before, 1),
                "apply_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="both", choices=["bookworm", "trixie", "both"])
    parser.add_argument("--keep", default="likely,all,none")
    parser.add_argument("--cloud", action="append", default=[], metavar="NAME")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    releases = ["bookworm", "trixie"] if args.release == "both" else [args.release]
    rows = []
    for release in releases:
        kernel = prepare_kernel("generic", release)
        cloud = prepare_kernel("cloud", release)
        cloud_dir = (cloud.root / "usr/lib/modules" if cloud.release.usrmerged
                     else cloud.root / "lib/modules") / cloud.kver
        cloud_mib = round(allocated(cloud_dir) / MIB, 1)
        if not args.json:
            print(f"{release:9} Debian's cloud kernel {cloud.kver} as installed: "
                  f"{cloud_mib} MiB", flush=True)
        for keep in args.keep.split(","):
            rows.append({**measure(kernel, keep, args.cloud), "debian_cloud_kernel": cloud.kver,
                         "debian_cloud_tree_mib": cloud_mib})
            if not args.json:
                r = rows[-1]
                print(f"{r['release']:9} keep={r['keep']:7} tree {r['tree_before_mib']:6} → "
                      f"{r['tree_after_mib']:5} MiB  stash {r['stash_mib']:5} MiB  net freed "
                      f"{r['net_freed_mib']:6} MiB ({r['net_freed_percent']}% of the tree)  "
                      f"apply {r['apply_seconds']} s", flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
