"""How many threads read a compressed module tree."""

from __future__ import annotations

from kmodtrim.index.parallel import MAX_THREADS, thread_count, usable_cpus


def test_one_thread_per_cpu_up_to_the_cap() -> None:
    assert [thread_count(n) for n in (0, 1, 2, 3)] == [1, 1, 2, 3]
    assert thread_count(MAX_THREADS) == thread_count(64) == MAX_THREADS


def test_usable_cpus_is_at_least_one() -> None:
    assert usable_cpus() >= 1
