"""What kmodtrim's on-demand modprobe.d file costs each modprobe call, and how long a
modprobe request for a trimmed module takes to come back through it.

On a real Debian generic kernel trimmed for the recorded VM observation: ``modprobe -n
-v`` of a kept module and of a kernel-requested alias, with the root's modprobe.d holding
kmodtrim's file and, in the same run, with the file moved aside (alternating, medians);
then the install line's ``kmodtrim restore --on-demand NAME`` run on the image root (a
dry load: the test machine's kernel is not the image's) as a whole process, in-process
(``--offline``) and through kmodtrimd on a private bus, ``--repeat`` times (``rollback 1``
takes the modules out again between rounds; medians and minimums).

    .venv/bin/python benchmarks/bench_ondemand.py [--release bookworm|trixie] [--calls N]
        [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, timed  # puts tests/ on the path

from dbusfixture import running_daemon, start_private_bus
from kernels import RELEASES, copy_kernel_tree, prepare_kernel
from kmodtrim.ondemand import CONF_PATH

KEPT = "virtio_net"  # in the recorded observation
REQUESTED = "rtnl-link-vxlan"  # `ip link add … type vxlan`: vxlan is trimmed
THROUGH_DAEMON = "rtnl-link-geneve"  # geneve: trimmed, restored through kmodtrimd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="bookworm", choices=list(RELEASES))
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    pristine = prepare_kernel("generic", args.release)
    kmodtrim = [sys.executable, "-m", "kmodtrim.cli"]
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch:
        tree = copy_kernel_tree(pristine, Path(scratch) / "root")
        root = tree.root
        (root / "etc/modprobe.d").mkdir(parents=True, exist_ok=True)
        common = ["--root", str(root), "--kernel", tree.kver, "--symvers", str(tree.symvers)]
        timed([*kmodtrim, "apply", "--yes", "--initramfs", "skip", "--offline",
               "--observed", str(OBSERVED), *common])
        conf = root / CONF_PATH.lstrip("/")
        aside = root / "conf.aside"
        text = conf.read_text()
        probe = ["modprobe", "-n", "-v", "-d", str(root), "-S", tree.kver, "-C",
                 str(root / "etc/modprobe.d")]
        figures: dict[str, list[float]] = {}
        for _ in range(args.calls):
            for state in ("with", "without"):
                if state == "without":
                    conf.rename(aside)
                for request in (KEPT, REQUESTED):
                    started = _clock()
                    subprocess.run([*probe, request], capture_output=True, check=False)
                    figures.setdefault(f"{state} {request}", []).append(_clock() - started)
                if state == "without":
                    aside.rename(conf)
        shown = subprocess.run([*probe, REQUESTED], capture_output=True, text=True,
                               check=False).stdout.strip().splitlines()
        restores: dict[str, list[float]] = {"in-process": [], "through kmodtrimd": []}
        with start_private_bus(Path(scratch) / "bus") as bus:
            for _ in range(args.repeat):
                restores["in-process"].append(timed(
                    [*_command(probe, REQUESTED), *common, "--offline"]))
                with running_daemon(bus, root):
                    restores["through kmodtrimd"].append(timed(
                        [*_command(probe, THROUGH_DAEMON), "--root", str(root), "--kernel",
                         tree.kver], env=bus.env()))
                timed([*kmodtrim, "rollback", "1", "--yes", "--initramfs", "skip",
                       "--offline", *common])
        result = {
            "kernel": tree.kver,
            "conf_lines": len(text.splitlines()),
            "conf_bytes": len(text.encode()),
            "install_lines": sum(line.startswith("install ") for line in text.splitlines()),
            "alias_lines": sum(line.startswith("alias ") for line in text.splitlines()),
            "modprobe_n_ms": {k: round(statistics.median(v) * 1000, 2)
                              for k, v in figures.items()},
            "resolved_to": shown[-1] if shown else None,
            "on_demand_restore_seconds": {
                how: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                      "runs": len(v)} for how, v in restores.items()},
            "calls": args.calls,
        }
    print(json.dumps(result, indent=2))
    return 0


def _command(probe: list[str], request: str) -> list[str]:
    """The install line modprobe runs for ``request`` (kmod replaces $CMDLINE_OPTS with
    the options it prints after the command: none here), as this run's kmodtrim."""
    shown = subprocess.run([*probe, request], capture_output=True, text=True,
                           check=False).stdout.strip().splitlines()
    if not shown or not shown[-1].startswith("install "):
        raise SystemExit(f"modprobe -n {request}: {shown or 'no output'}")
    words = shlex.split(shown[-1].replace(" $CMDLINE_OPTS", "", 1))[2:]
    return [sys.executable, "-m", "kmodtrim.cli", *words]


def _clock() -> float:
    import time

    return time.perf_counter()


if __name__ == "__main__":
    sys.exit(main())
