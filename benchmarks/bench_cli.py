"""How fast the CLI answers, as whole processes, on a trimmed Debian generic kernel: bare
Python's start-up (the baseline, same run), ``kmodtrim --version``, ``status``,
``history`` and a warm ``plan``. Targets: --version, status, history ≤ 0.15 s; warm
plan ≤ 0.3 s.

    .venv/bin/python benchmarks/bench_cli.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, timed

from kernels import prepare_kernel

KMODTRIM = [sys.executable, "-m", "kmodtrim.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tree = prepare_kernel("generic")
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        root = Path(scratch_dir) / "root"
        subprocess.run(["cp", "-a", str(tree.root), str(root)], check=True)
        common = ["--root", str(root), "--kernel", tree.kver, "--symvers", str(tree.symvers),
                  "--offline"]
        timed([*KMODTRIM, "apply", "--yes", "--initramfs", "skip", "--observed",
               str(OBSERVED), *common])
        commands = {
            "python -c pass (baseline)": [sys.executable, "-c", "pass"],
            "kmodtrim --version": [*KMODTRIM, "--version"],
            "kmodtrim status": [*KMODTRIM, "status", *common],
            "kmodtrim history": [*KMODTRIM, "history", *common],
            "kmodtrim plan (warm)": [*KMODTRIM, "plan", "--json", *common],
        }
        for argv in commands.values():
            timed(argv)  # warm the page cache and the index cache
        medians = {name: statistics.median(timed(argv) for _ in range(args.runs))
                   for name, argv in commands.items()}
    targets = {"kmodtrim --version": 0.15, "kmodtrim status": 0.15,
               "kmodtrim history": 0.15, "kmodtrim plan (warm)": 0.3}
    if args.json:
        print(json.dumps({"kernel": tree.kver, "runs": args.runs, "cpus": os.cpu_count(),
                          "seconds": {k: round(v, 3) for k, v in medians.items()}}, indent=2))
        return 0
    print(f"kernel {tree.kver}, trimmed; medians of {args.runs} whole-process runs")
    for name, seconds in medians.items():
        target = f"(target ≤ {targets[name]} s)" if name in targets else ""
        print(f"  {name:28} {seconds:6.3f} s  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
