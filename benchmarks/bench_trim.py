"""Apply and restore speed on real Debian generic kernels, and what the stash costs on disk.

Reports, for Debian 12 (bookworm: 6.1, plain ``.ko``) and Debian 13 (trixie: 6.12,
``.ko.xz`` under ``/usr/lib/modules``) side by side: `kmodtrim apply` wall time without the
initramfs step (target ≤ 3 s), the same divided by one `depmod -a` on the same full tree
(the step every trim must run anyway; target ≤ 2.5 ×), `kmodtrim restore` of one module
including its depmod (target ≤ 1 s), and the stash size against the bytes it holds. Every
figure is a whole process; each run is on a fresh copy of the tree.

    .venv/bin/python benchmarks/bench_trim.py [--flavour generic|cloud]
        [--release bookworm|trixie|both] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_index import side_by_side  # imports common, which puts tests/ on the path
from common import OBSERVED, timed

from kernels import FLAVOURS, RELEASES, KernelTree, copy_kernel_tree, prepare_kernel
from kmodtrim.state.stash import Stash
from kmodtrim.store import current_generation

RESTORED = "virtio_gpu"  # not in the recorded VM: trimmed, then asked back


def measure(pristine: KernelTree, runs: int) -> dict[str, object]:
    """The figures for one kernel tree (see the module docstring)."""
    kmodtrim = [sys.executable, "-m", "kmodtrim.cli"]
    applies, restores, depmods = [], [], []
    stash_bytes = removed_bytes = removed_files = 0
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        for run in range(runs):
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
    return {
        "release": pristine.release.name,
        "debian": pristine.release.debian,
        "kernel": pristine.kver,
        "apply_seconds": round(a, 3),
        "apply_over_depmod": round(a / d, 2),
        "depmod_seconds": round(d, 3),
        "restore_one_module_seconds": round(r, 3),
        "removed_files": removed_files,
        "removed_bytes": removed_bytes,
        "stash_bytes_on_disk": stash_bytes,
        "stash_ratio": round(stash_bytes / removed_bytes, 3) if removed_bytes else None,
        "runs": runs,
    }


MIB = 1024 * 1024
ROWS = (
    ("depmod_seconds", "depmod -a on the full tree (s)", "{:.2f}"),
    ("apply_seconds", "kmodtrim apply, no initramfs (≤ 3 s)", "{:.2f}"),
    ("apply_over_depmod", "  ÷ depmod -a (≤ 2.5)", "{:.2f}"),
    ("restore_one_module_seconds", f"kmodtrim restore {RESTORED} (≤ 1 s)", "{:.2f}"),
    ("removed_files", "files removed", "{}"),
    ("removed_mib", "MiB removed", "{:.1f}"),
    ("stash_mib", "MiB in the stash", "{:.1f}"),
    ("stash_ratio", "  stash ÷ removed", "{:.3f}"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="generic", choices=sorted(FLAVOURS))
    parser.add_argument("--release", default="both", choices=[*RELEASES, "both"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    releases = list(RELEASES) if args.release == "both" else [args.release]
    results = [measure(prepare_kernel(args.flavour, release), args.runs)
               for release in releases]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"median of {args.runs} runs on fresh copies")
        shown = [{**r, "removed_mib": int(str(r["removed_bytes"])) / MIB,
                  "stash_mib": int(str(r["stash_bytes_on_disk"])) / MIB} for r in results]
        print(side_by_side(shown, ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
