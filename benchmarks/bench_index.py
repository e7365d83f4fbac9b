"""Index and plan speed on real Debian generic kernels, against depmod on the same tree.

Reports, for Debian 12 (bookworm: 6.1, plain ``.ko``) and Debian 13 (trixie: 6.12,
``.ko.xz`` under ``/usr/lib/modules``) side by side: cold index ÷ ``depmod -b`` (target
≤ 1.5; on a compressed tree ≤ 0.6), warm index ÷ depmod (target ≤ 0.1), whole-process
``kmodtrim plan`` wall time with a warm cache (target ≤ 0.5 s), and peak memory. Each
figure is the median of several runs; the page cache is warm for both tools, and depmod
and the cold builds take turns. The cold build is also timed with every module read in
one thread (as before compressed modules were read on every CPU), and the CPU seconds of
depmod and of the cold-build process are shown: on a busy machine (with the kernel's
autogroup scheduling, CPUs are shared between sessions, not threads) extra threads buy
little and the wall ratio tends to the CPU ratio. A warm index
decodes a module's undefined-symbol lists only when asked for them; the "warm + all symbol
lists" figure (no target) is a warm build that then reads every module's lists, the most
any caller can ask for.

    .venv/bin/python benchmarks/bench_index.py [--flavour generic|cloud]
        [--release bookworm|trixie|both] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OBSERVED, timed  # first: it puts tests/ on the path

from kernels import FLAVOURS, RELEASES, KernelTree, prepare_kernel

KMODTRIM = [sys.executable, "-m", "kmodtrim.cli"]

_INDEX_CHILD = """
import resource, sys, time
from pathlib import Path
from kmodtrim.index import build_index, parallel
if sys.argv[4] == "cold1":  # the cold build as before threads: every file in one thread
    parallel.usable_cpus = lambda: 1
started = time.perf_counter()
index, _ = build_index(Path(sys.argv[1]), sys.argv[2], cache_dir=Path(sys.argv[3]),
                       rebuild=sys.argv[4].startswith("cold"), symvers=Path(sys.argv[5]))
if sys.argv[4] == "symbols":
    sum(len(e.info.undefined) + len(e.info.weak_undefined) for e in index.modules.values())
elapsed = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(elapsed, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""


def _index_in_child(tree: KernelTree, root: Path, cache: Path, mode: str
                    ) -> tuple[float, int, float]:
    """Wall seconds of one build_index in a process of its own, its peak RSS (KiB) and the
    process's CPU seconds (start-up included)."""
    out = subprocess.run(
        [sys.executable, "-c", _INDEX_CHILD, str(root), tree.kver, str(cache), mode,
         str(tree.symvers)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), float(out[2])


def measure(tree: KernelTree, runs: int) -> dict[str, object]:
    """The figures for one kernel tree (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / "root"
        # Hard links: depmod replaces its outputs by rename, module files are only read.
        # A usrmerged root's lib -> usr/lib is copied as the link it is.
        subprocess.run(["cp", "-al", str(tree.root), str(root)], check=True)
        cache = scratch / "cache"
        modules = sum(1 for _ in (root / "lib/modules" / tree.kver).rglob("*.ko*"))

        # depmod and the cold builds take turns, so that a change in the machine's load
        # during the run weighs on both alike.
        depmod: list[float] = []
        depmod_cpu: list[float] = []
        cold: list[float] = []
        cold_cpu: list[float] = []
        cold1: list[float] = []
        cold_rss = cold1_rss = 0
        for _ in range(runs):
            seconds, cpu = _timed_cpu(["depmod", "-b", str(root), tree.kver])
            depmod.append(seconds)
            depmod_cpu.append(cpu)
            shutil.rmtree(cache, ignore_errors=True)
            seconds, rss, cpu = _index_in_child(tree, root, cache, "cold")
            cold.append(seconds)
            cold_cpu.append(cpu)
            cold_rss = max(cold_rss, rss)
            shutil.rmtree(cache, ignore_errors=True)
            seconds, rss, _ = _index_in_child(tree, root, cache, "cold1")
            cold1.append(seconds)
            cold1_rss = max(cold1_rss, rss)
        warm = []
        warm_rss = 0
        for _ in range(runs):
            seconds, rss, _ = _index_in_child(tree, root, cache, "warm")
            warm.append(seconds)
            warm_rss = max(warm_rss, rss)
        symbols = [_index_in_child(tree, root, cache, "symbols")[0] for _ in range(runs)]
        plan_argv = [*KMODTRIM, "plan", "--root", str(root), "--kernel", tree.kver,
                     "--observed", str(OBSERVED), "--symvers", str(tree.symvers),
                     "--cache-dir", str(cache), "--json"]
        timed(plan_argv)
        plan = []
        plan_rss = 0
        for _ in range(runs):
            seconds, rss = _timed_child(plan_argv)
            plan.append(seconds)
            plan_rss = max(plan_rss, rss)

    d, c, c1, w, s, p = (statistics.median(x)
                         for x in (depmod, cold, cold1, warm, symbols, plan))
    return {
        "release": tree.release.name,
        "debian": tree.release.debian,
        "kernel": tree.kver,
        "modules": modules,
        "depmod_seconds": round(d, 3),
        "cold_index_seconds": round(c, 3),
        "warm_index_seconds": round(w, 4),
        "cold_over_depmod": round(c / d, 2),
        "cold_one_thread_seconds": round(c1, 3),
        "cold_one_thread_over_depmod": round(c1 / d, 2),
        "depmod_cpu_seconds": round(statistics.median(depmod_cpu), 2),
        "cold_index_cpu_seconds": round(statistics.median(cold_cpu), 2),
        "warm_over_depmod": round(w / d, 3),
        "warm_index_all_symbols_seconds": round(s, 4),
        "plan_process_seconds": round(p, 3),
        "peak_rss_mib_cold_index": round(cold_rss / 1024, 1),
        "peak_rss_mib_cold_one_thread": round(cold1_rss / 1024, 1),
        "peak_rss_mib_warm_index": round(warm_rss / 1024, 1),
        "peak_rss_mib_plan": round(plan_rss / 1024, 1),
        "runs": runs,
        "cpus": os.cpu_count(),
    }


def _timed_cpu(argv: list[str]) -> tuple[float, float]:
    """Wall time and CPU seconds (user + system) of one run of argv."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr}")
    return elapsed, usage.ru_utime + usage.ru_stime


def _timed_child(argv: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one run of argv, a process of its own."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr}")
    return elapsed, usage.ru_maxrss


ROWS = (
    ("modules", "module files", "{}"),
    ("depmod_seconds", "depmod -b (s)", "{:.3f}"),
    ("cold_index_seconds", "cold index (s)", "{:.3f}"),
    ("cold_over_depmod", "  ÷ depmod (≤ 1.5; xz ≤ 0.6)", "{:.2f}"),
    ("cold_one_thread_seconds", "cold index, one thread (s)", "{:.3f}"),
    ("cold_one_thread_over_depmod", "  ÷ depmod", "{:.2f}"),
    ("depmod_cpu_seconds", "CPU: depmod (s)", "{:.2f}"),
    ("cold_index_cpu_seconds", "CPU: cold index process (s)", "{:.2f}"),
    ("warm_index_seconds", "warm index (s)", "{:.4f}"),
    ("warm_over_depmod", "  ÷ depmod (≤ 0.1)", "{:.3f}"),
    ("warm_index_all_symbols_seconds", "warm + all symbol lists (s)", "{:.4f}"),
    ("plan_process_seconds", "kmodtrim plan, process (≤ 0.5 s)", "{:.3f}"),
    ("peak_rss_mib_cold_index", "peak RSS cold index (MiB)", "{:.0f}"),
    ("peak_rss_mib_cold_one_thread", "peak RSS cold, one thread (MiB)", "{:.0f}"),
    ("peak_rss_mib_warm_index", "peak RSS warm index (MiB)", "{:.0f}"),
    ("peak_rss_mib_plan", "peak RSS plan (MiB)", "{:.0f}"),
)


def side_by_side(results: list[dict[str, object]], rows: tuple[tuple[str, str, str], ...]
                 ) -> str:
    """The figures of each release in a column of its own, one row per figure."""
    width = max(len(label) for _, label, _ in rows) + 2
    columns = [f"Debian {r['debian']} ({r['kernel']})" for r in results]
    col = max(18, *(len(c) for c in columns)) + 2
    lines = [" " * width + "".join(c.rjust(col) for c in columns)]
    for key, label, fmt in rows:
        lines.append(label.ljust(width) + "".join(fmt.format(r[key]).rjust(col)
                                                  for r in results))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="generic", choices=sorted(FLAVOURS))
    parser.add_argument("--release", default="both", choices=[*RELEASES, "both"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    releases = list(RELEASES) if args.release == "both" else [args.release]
    results = [measure(prepare_kernel(args.flavour, release), args.runs)
               for release in releases]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"median of {args.runs} runs, {os.cpu_count()} CPUs, page cache warm")
        print(side_by_side(results, ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
