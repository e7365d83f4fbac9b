"""Index and plan speed on a real Debian generic kernel, against depmod in the same run.

Reports: cold index ÷ ``depmod -b`` (target ≤ 1.5), warm index ÷ depmod (target ≤ 0.1),
whole-process ``kmodtrim plan`` wall time with a warm cache (target ≤ 0.5 s), and peak
memory. Each figure is the median of several runs; the page cache is warm for both tools.
A warm index decodes a module's undefined-symbol lists only when asked for them; the
"warm + all symbol lists" figure (no target) is a warm build that then reads every
module's lists, the most any caller can ask for.

    .venv/bin/python benchmarks/bench_index.py [--flavour generic|cloud] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, timed  # first: it puts tests/ on the path

from kernels import KernelTree, prepare_kernel

KMODTRIM = [sys.executable, "-m", "kmodtrim.cli"]

_INDEX_CHILD = """
import resource, sys, time
from pathlib import Path
from kmodtrim.index import build_index
started = time.perf_counter()
index, _ = build_index(Path(sys.argv[1]), sys.argv[2], cache_dir=Path(sys.argv[3]),
                       rebuild=sys.argv[4] == "cold", symvers=Path(sys.argv[5]))
if sys.argv[4] == "symbols":
    sum(len(e.info.undefined) + len(e.info.weak_undefined) for e in index.modules.values())
elapsed = time.perf_counter() - started
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _index_in_child(tree: KernelTree, root: Path, cache: Path, mode: str) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", _INDEX_CHILD, str(root), tree.kver, str(cache), mode,
         str(tree.symvers)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="generic", choices=["generic", "cloud"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tree = prepare_kernel(args.flavour)
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / "root"
        # Hard links: depmod replaces its outputs by rename, module files are only read.
        subprocess.run(["cp", "-al", str(tree.root), str(root)], check=True)
        cache = scratch / "cache"
        modules = sum(1 for _ in (root / "lib/modules" / tree.kver).rglob("*.ko*"))

        depmod = [timed(["depmod", "-b", str(root), tree.kver]) for _ in range(args.runs)]
        cold = []
        cold_rss = 0
        for _ in range(args.runs):
            shutil.rmtree(cache, ignore_errors=True)
            seconds, rss = _index_in_child(tree, root, cache, "cold")
            cold.append(seconds)
            cold_rss = max(cold_rss, rss)
        warm = []
        warm_rss = 0
        for _ in range(args.runs):
            seconds, rss = _index_in_child(tree, root, cache, "warm")
            warm.append(seconds)
            warm_rss = max(warm_rss, rss)
        symbols = [_index_in_child(tree, root, cache, "symbols")[0] for _ in range(args.runs)]
        plan_argv = [*KMODTRIM, "plan", "--root", str(root), "--kernel", tree.kver,
                     "--observed", str(OBSERVED), "--symvers", str(tree.symvers),
                     "--cache-dir", str(cache), "--json"]
        timed(plan_argv)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        plan = [timed(plan_argv) for _ in range(args.runs)]
        plan_rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)

    d, c, w, s, p = (statistics.median(x) for x in (depmod, cold, warm, symbols, plan))
    figures = {
        "kernel": tree.kver,
        "modules": modules,
        "depmod_seconds": round(d, 3),
        "cold_index_seconds": round(c, 3),
        "warm_index_seconds": round(w, 4),
        "cold_over_depmod": round(c / d, 2),
        "warm_over_depmod": round(w / d, 3),
        "warm_index_all_symbols_seconds": round(s, 4),
        "plan_process_seconds": round(p, 3),
        "peak_rss_mib_cold_index": round(cold_rss / 1024, 1),
        "peak_rss_mib_warm_index": round(warm_rss / 1024, 1),
        "peak_rss_mib_plan": round(plan_rss / 1024, 1),
        "runs": args.runs,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"kernel {tree.kver}: {modules} modules, median of {args.runs} runs")
        print(f"  depmod -b                 {d:7.3f} s")
        print(f"  cold index (no cache)     {c:7.3f} s   {c / d:5.2f} × depmod   (target ≤ 1.5)")
        print(f"  warm index (cache)        {w:7.4f} s   {w / d:5.3f} × depmod   (target ≤ 0.1)")
        print(f"  warm + all symbol lists   {s:7.4f} s   {s / d:5.3f} × depmod")
        print(f"  kmodtrim plan (process)   {p:7.3f} s   (target ≤ 0.5 s)")
        print(f"  peak RSS: cold index {cold_rss / 1024:.0f} MiB, warm index "
              f"{warm_rss / 1024:.0f} MiB, plan {plan_rss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
