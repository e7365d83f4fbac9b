"""How fast the CLI answers, as whole processes, on a trimmed Debian generic kernel: bare
Python's start-up (the baseline, same run), ``kmodtrim --version``, ``status``,
``history`` and a warm ``plan``. Targets: --version, status, history ≤ 0.15 s; warm
plan ≤ 0.3 s.

    .venv/bin/python benchmarks/bench_cli.py [--runs N] [--json] [--compare REV]

Every process runs with its modules' bytecode cached (as an installed package has it),
in a private cache directory, whatever ``PYTHONDONTWRITEBYTECODE`` says here; the warm-up
run writes it. ``--compare REV`` also times the package as it was at git revision REV,
on its own copy of the same trimmed root (its own index cache), each command's runs
alternating between the two so both see the same machine.
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
        samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        names = list(variants["working tree"][0])
        for name in names:
            for _ in range(args.runs):
                for variant, (argvs, env) in variants.items():
                    samples[variant].setdefault(name, []).append(timed(argvs[name], env=env))
    medians = {variant: {name: statistics.median(times) for name, times in by_name.items()}
               for variant, by_name in samples.items()}
    if args.json:
        print(json.dumps({"kernel": tree.kver, "runs": args.runs, "cpus": os.cpu_count(),
                          "seconds": {variant: {k: round(v, 3) for k, v in by_name.items()}
                                      for variant, by_name in medians.items()}}, indent=2))
        return 0
    print(f"kernel {tree.kver}, trimmed; medians of {args.runs} whole-process runs"
          + ("; variants alternating run by run" if args.compare else ""))
    print(f"  {'':28} " + "  ".join(f"{variant[:12]:>12}" for variant in medians)
          + "  target")
    for name in names:
        target = f"≤ {TARGETS[name]} s" if name in TARGETS else ""
        print(f"  {name:28} " + "  ".join(f"{by_name[name]:10.3f} s" for by_name in
                                          medians.values()) + f"  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
