"""How fast the CLI answers, as whole processes, on a trimmed Debian generic kernel: bare
Python's start-up (the baseline, same run), ``kmodtrim --version``, ``status``,
``history`` and a warm ``plan``. Targets: --version, status, history ≤ 0.15 s; warm
plan ≤ 0.3 s.

    .venv/bin/python benchmarks/bench_cli.py [--runs N] [--json] [--compare REV]

Each figure is the median wall time, with the median CPU time (user + system, which
hardly moves when other work shares the machine) beside it. Every process runs with its
modules' bytecode cached (as an installed package has it), in a private cache directory,
whatever ``PYTHONDONTWRITEBYTECODE`` says here; the warm-up run writes it.
``--compare REV`` (repeatable) also times the package as it was at git revision REV, on
its own copy of the same trimmed root (its own records and index cache), each command's
runs alternating between the variants so that all see the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import OBSERVED, REPO, timed

from kernels import KernelTree, prepare_kernel

KMODTRIM = [sys.executable, "-m", "kmodtrim.cli"]
TARGETS = {"kmodtrim --version": 0.15, "kmodtrim status": 0.15,
           "kmodtrim history": 0.15, "kmodtrim plan (warm)": 0.3}


def commands(root: Path, kver: str, symvers: Path) -> dict[str, list[str]]:
    common = ["--root", str(root), "--kernel", kver, "--symvers", str(symvers), "--offline"]
    return {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "kmodtrim --version": [*KMODTRIM, "--version"],
        "kmodtrim status": [*KMODTRIM, "status", *common],
        "kmodtrim history": [*KMODTRIM, "history", *common],
        "kmodtrim plan (warm)": [*KMODTRIM, "plan", "--json", *common],
    }


def environment(pycache: Path, package_dir: Path | None) -> dict[str, str]:
    """The children's environment: bytecode written to (and read from) ``pycache``, and
    the package imported from ``package_dir`` when given."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if package_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_dir),
                                                          env.get("PYTHONPATH")]))
    return env


def export_revision(revision: str, dest: Path) -> Path:
    """The package as it was at ``revision``, unpacked under ``dest``; returns the directory
    to put on PYTHONPATH. Exits if the package would still be imported from elsewhere."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "daemon/kmodtrim"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    package = dest / "daemon"
    where = subprocess.run([sys.executable, "-c", "import kmodtrim; print(kmodtrim.__file__)"],
                           capture_output=True, text=True, check=True,
                           env=environment(dest / "pycache", package)).stdout.strip()
    if not Path(where).is_relative_to(package):
        raise SystemExit(f"--compare {revision}: imported {where}, not the exported package")
    return package


def trimmed_root(tree: KernelTree, root: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """A copy of the kernel tree at ``root``, trimmed by the package ``env`` imports; the
    commands to time on it."""
    subprocess.run(["cp", "-a", str(tree.root), str(root)], check=True)
    timed([*KMODTRIM, "apply", "--yes", "--initramfs", "skip", "--observed", str(OBSERVED),
           "--root", str(root), "--kernel", tree.kver, "--symvers", str(tree.symvers),
           "--offline"], env=env)
    return commands(root, tree.kver, tree.symvers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--compare", metavar="REV", action="append", default=[],
                        help="also time the package at this git revision (repeatable)")
    args = parser.parse_args()

    tree = prepare_kernel("generic")
    with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        # Each variant trims its own copy (its own records and index cache).
        here = environment(scratch / "pycache", None)
        variants = {"working tree": (trimmed_root(tree, scratch / "root", here), here)}
        for number, revision in enumerate(args.compare):
            rev = scratch / f"rev{number}"
            env = environment(rev / "pycache", export_revision(revision, rev))
            variants[revision] = (trimmed_root(tree, rev / "root", env), env)
        for argvs, env in variants.values():
            for argv in argvs.values():
                timed(argv, env=env)  # bytecode, page cache and index cache warm
        walls: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        cpus: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        names = list(variants["working tree"][0])
        for name in names:
            for _ in range(args.runs):
                for variant, (argvs, env) in variants.items():
                    wall, cpu = timed_with_cpu(argvs[name], env)
                    walls[variant].setdefault(name, []).append(wall)
                    cpus[variant].setdefault(name, []).append(cpu)
    wall_medians = medians(walls)
    cpu_medians = medians(cpus)
    if args.json:
        print(json.dumps({"kernel": tree.kver, "runs": args.runs, "cpus": os.cpu_count(),
                          "seconds": rounded(wall_medians), "cpu_seconds": rounded(cpu_medians)},
                         indent=2))
        return 0
    print(f"kernel {tree.kver}, trimmed; medians of {args.runs} whole-process runs, wall "
          "time (CPU time, user + system)"
          + ("; variants alternating run by run" if args.compare else ""))
    print(f"  {'':28} " + "  ".join(f"{variant[:18]:>18}" for variant in wall_medians)
          + "  target")
    for name in names:
        target = f"≤ {TARGETS[name]} s" if name in TARGETS else ""
        print(f"  {name:28} " + "  ".join(
            f"{wall_medians[v][name]:7.3f} s ({cpu_medians[v][name]:5.3f})" for v in variants)
            + f"  {target}")
    return 0


def timed_with_cpu(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run of ``argv``: the CPU time hardly
    moves when other work shares the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(argv, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {variant: {name: statistics.median(values) for name, values in by_name.items()}
            for variant, by_name in samples.items()}


def rounded(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {variant: {k: round(v, 3) for k, v in by_name.items()}
            for variant, by_name in table.items()}


if __name__ == "__main__":
    sys.exit(main())
