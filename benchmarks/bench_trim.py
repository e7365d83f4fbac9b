"""Apply and restore speed on a real Debian generic kernel, and what the stash costs on disk.

Reports: `kmodtrim apply` wall time without the initramfs step (target ≤ 3 s), the same
divided by one `depmod -a` on the full tree (the step every trim must run anyway),
`kmodtrim restore` of one module including its depmod (target ≤ 1 s), and the stash size
against the bytes it holds. Runs on a fresh copy of the tree each time.

    .venv/bin/python benchmarks/bench_trim.py [--flavour generic|cloud] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, timed  # first: it puts tests/ on the path

from kernels import copy_kernel_tree, prepare_kernel
from kmodtrim.state.stash import Stash
from kmodtrim.store import current_generation

RESTORED = "virtio_gpu"  # not in the recorded VM: trimmed, then asked back


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="generic", choices=["generic", "cloud"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    pristine = prepare_kernel(args.flavour)
    kmodtrim = [sys.executable, "-m", "kmodtrim.cli"]
    applies, restores, depmods = [], [], []
    stash_bytes = removed_bytes = removed_files = 0
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        for run in range(args.runs):
            dest = Path(scratch_dir) / f"root{run}"
            tree = copy_kernel_tree(pristine, dest)
            common = ["--root", str(tree.root), "--kernel", tree.kver,
                      "--symvers", str(tree.symvers)]
            depmods.append(timed(["depmod", "-a", "-b", str(tree.root), tree.kver]))
            # Warm the index cache as a daemon or an earlier `plan` would have.
            timed([*kmodtrim, "plan", "--observed", str(OBSERVED), *common])
            applies.append(timed([*kmodtrim, "apply", "--yes", "--initramfs", "skip",
                                   "--observed", str(OBSERVED), *common]))
            restores.append(timed([*kmodtrim, "restore", RESTORED, "--yes",
                                    "--initramfs", "skip", *common]))
            generation = current_generation(tree.root)
            stash_bytes = Stash(tree.root).size_on_disk()
            removed_bytes = generation.removed_bytes
            removed_files = len(generation.removed)
            shutil.rmtree(dest)
    a, r, d = (statistics.median(x) for x in (applies, restores, depmods))
    figures = {
        "kernel": pristine.kver,
        "apply_seconds": round(a, 3),
        "apply_over_depmod": round(a / d, 2),
        "depmod_seconds": round(d, 3),
        "restore_one_module_seconds": round(r, 3),
        "removed_files": removed_files,
        "removed_bytes": removed_bytes,
        "stash_bytes_on_disk": stash_bytes,
        "stash_ratio": round(stash_bytes / removed_bytes, 3) if removed_bytes else None,
        "runs": args.runs,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        mib = 1024 * 1024
        print(f"kernel {pristine.kver}, median of {args.runs} runs on fresh copies")
        print(f"  kmodtrim apply (no initramfs)   {a:6.2f} s  = {a / d:4.1f} × depmod -a "
              f"({d:.2f} s)   (target ≤ 3 s)")
        print(f"  kmodtrim restore {RESTORED:<13} {r:6.2f} s   (target ≤ 1 s, includes depmod)")
        print(f"  stash: {removed_files} files, {removed_bytes / mib:.0f} MiB held in "
              f"{stash_bytes / mib:.0f} MiB on disk ({stash_bytes / removed_bytes:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
