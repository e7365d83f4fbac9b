"""What the benchmarks share: the repository's test helpers on the path, the recorded VM
observation every benchmark plans with, and timing one command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # kernels, dbusfixture

OBSERVED = REPO / "examples" / "observed-bookworm-qemu-virtio.txt"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of one run of ``argv`` (in ``env``, default this environment); exits with
    its stderr if it fails."""
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return elapsed
