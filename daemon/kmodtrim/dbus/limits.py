"""Bounds on the read-only calls everyone may make (Plan, Explain, ListGenerations,
ShowGeneration), so that a flood of them starves neither root nor the daemon's memory.

- Admission: an unprivileged uid may have PER_CALLER read calls in flight, all
  unprivileged callers together UNPRIVILEGED; a call over either limit is refused at once
  with ``org.freedesktop.DBus.Error.LimitsExceeded``. Root (uid 0) is not limited.
- Lanes: answers are computed in threads of their own, never in asyncio's default
  executor (which runs jobs, self-healing and state refreshes): one thread for
  unprivileged Plan/Explain, one for unprivileged ListGenerations/ShowGeneration, and two
  for root, so root never queues behind anyone else's computation.
- Sharing: identical calls (same key, same state token) in a lane share one computation,
  and its answer is cached for CACHE_TTL seconds at most and only while the token is
  unchanged; the cache is bounded in entries and bytes. The lanes also share one expensive
  intermediate (a plan both the root and the unprivileged lane want) while any of them has
  work: made once, even by two lanes at a time, and dropped when they run dry.
- Memory: QUIET seconds after the last read call the heap is given back to the system,
  and again once the cache has expired and is empty. Timers run only after read calls: an
  idle daemon stays idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from .errors import LimitsExceededError

log = logging.getLogger("kmodtrim.dbus.limits")

PER_CALLER = 8  # read calls in flight per unprivileged uid
UNPRIVILEGED = 32  # read calls in flight from all unprivileged callers together
CACHE_TTL = 5.0  # seconds an answer is reused at most (state the daemon cannot watch)
CACHE_ENTRIES = 64
CACHE_BYTES = 8 * 1024 * 1024  # an answer bigger than a quarter of this is not kept
QUIET = 1.0  # seconds without read calls before memory is given back

T = TypeVar("T")


class Lane(enum.Enum):
    """Where an answer is computed (each lane has threads of its own)."""

    CHEAP = 1  # unprivileged ListGenerations, ShowGeneration
    EXPENSIVE = 2  # unprivileged Plan, Explain
    ROOT = 3  # every call of uid 0

    @property
    def threads(self) -> int:
        return 2 if self is Lane.ROOT else 1


class Memo:
    """One value worth keeping between computations (a plan two lanes want) until the
    lanes run dry. Thread-safe: a thread wanting the value another thread
    is making waits for it rather than making it again."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._key: Hashable = None
        self._value: Any = None
        self._making: set[Hashable] = set()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value kept for ``key``, else ``make()`` (kept instead). Raises what
        ``make`` raises."""
        with self._changed:
            while key in self._making:
                self._changed.wait()
            if self._value is not None and self._key == key:
                kept: T = self._value
                return kept
            self._making.add(key)
        value: T | None = None
        try:
            value = make()
            return value
        finally:
            with self._changed:
                self._making.discard(key)
                if value is not None:
                    self._key, self._value = key, value
                self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self._key = self._value = None


@dataclass(frozen=True)
class Typed:
    """A typed D-Bus answer and the size of its JSON form (what the cache counts)."""

    value: Any
    size: int


Answer = str | Typed  # JSON text, or a typed value


def answer_size(answer: Answer) -> int:
    return len(answer) if isinstance(answer, str) else answer.size


@dataclass(frozen=True)
class _Entry:
    token: Hashable
    answer: Answer
    expires: float


class AnswerCache:
    """Answers by call key, each valid for its state token and ``ttl`` seconds; at most
    ``entries`` answers and ``max_bytes`` (of JSON text), the oldest dropped first."""

    def __init__(self, ttl: float = CACHE_TTL, entries: int = CACHE_ENTRIES,
                 max_bytes: int = CACHE_BYTES) -> None:
        self.ttl = ttl
        self.entries = entries
        self.max_bytes = max_bytes
        self.size = 0
        self._answers: OrderedDict[Hashable, _Entry] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: Hashable, token: Hashable, now: float) -> Answer | None:
        entry = self._answers.get(key)
        if entry is None or entry.token != token or entry.expires <= now:
            return None
        return entry.answer

    def put(self, key: Hashable, token: Hashable, answer: Answer, now: float) -> None:
        self._drop(key)
        size = answer_size(answer)
        if size > self.max_bytes // 4:
            return
        self.expire(now)
        self._answers[key] = _Entry(token, answer, now + self.ttl)
        self.size += size
        while len(self._answers) > self.entries or self.size > self.max_bytes:
            self._drop(next(iter(self._answers)))

    def expire(self, now: float) -> float | None:
        """Drop the expired answers; returns when the next one expires (None: empty)."""
        while self._answers:
            key, entry = next(iter(self._answers.items()))
            if entry.expires > now:
                return entry.expires
            self._drop(key)
        return None

    def clear(self) -> None:
        self._answers.clear()
        self.size = 0

    def _drop(self, key: Hashable) -> None:
        entry = self._answers.pop(key, None)
        if entry is not None:
            self.size -= answer_size(entry.answer)


class ReadLimiter:
    """Admission, lanes, sharing and caching of read calls (see the module docstring).
    Used from the event loop's thread only; the computations run in the lanes' threads."""

    def __init__(self, release_memory: Callable[[], None], *, per_caller: int = PER_CALLER,
                 unprivileged: int = UNPRIVILEGED, quiet: float = QUIET,
                 cache: AnswerCache | None = None) -> None:
        self.release_memory = release_memory
        self.per_caller = per_caller
        self.unprivileged = unprivileged
        self.quiet = quiet
        self.cache = cache if cache is not None else AnswerCache()
        self._calls: Counter[int | None] = Counter()  # unprivileged uid → calls in flight
        self._active = 0  # read calls in flight, root's included
        self._refused: set[int | None] = set()  # logged once per burst
        self._running: dict[tuple[Lane, Hashable, Hashable], asyncio.Future[Any]] = {}
        self._queued = 0  # computations queued or running, all lanes
        self._executors: dict[Lane, ThreadPoolExecutor] = {}
        self._memo = Memo()
        self._timer: asyncio.TimerHandle | None = None
        self._used = False  # read calls since memory was last given back
        self._cached = False  # answers cached since memory was last given back

    @contextlib.contextmanager
    def admit(self, uid: int | None) -> Iterator[None]:
        """Count one read call of ``uid`` (None: unknown) as in flight for the block.

        Raises LimitsExceededError when ``uid`` is not 0 and it, or all unprivileged
        callers together, already have as many calls in flight as allowed.
        """
        limited = uid != 0
        if limited:
            self._check(uid)
            self._calls[uid] += 1
        self._active += 1
        self._cancel_timer()
        try:
            yield
        finally:
            self._active -= 1
            self._used = True
            if limited:
                self._calls[uid] -= 1
                if not self._calls[uid]:
                    del self._calls[uid]
            if not self._active:
                self._schedule(self.quiet)

    def _check(self, uid: int | None) -> None:
        who = f"uid {uid}" if uid is not None else "a caller of unknown uid"
        if self._calls[uid] >= self.per_caller:
            why = f"{who} has {self.per_caller} read calls in flight, the most allowed"
        elif self._calls.total() >= self.unprivileged:
            why = (f"unprivileged callers have {self.unprivileged} read calls in flight, "
                   "the most allowed")
        else:
            return
        if uid not in self._refused:
            self._refused.add(uid)
            log.warning("refusing read calls: %s", why)
        raise LimitsExceededError(f"too many calls: {why}",
                                  hint="wait for the answers before calling again")

    async def answer(self, key: Hashable, token: Hashable, compute: Callable[[Memo], Answer],
                     *, privileged: bool, expensive: bool) -> Answer:
        """The cached answer for ``key`` while ``token`` (the state it depends on) is
        unchanged, else ``compute(memo)`` in the caller's lane, shared with identical calls
        already computing there. Raises what ``compute`` raises."""
        cached = self.cache.get(key, token, time.monotonic())
        if cached is not None:
            return cached
        lane = Lane.ROOT if privileged else Lane.EXPENSIVE if expensive else Lane.CHEAP
        slot = (lane, key, token)
        future = self._running.get(slot)
        if future is None:
            executor = self._executors.get(lane)
            if executor is None:
                executor = self._executors[lane] = ThreadPoolExecutor(
                    lane.threads, thread_name_prefix=f"kmodtrimd-{lane.name.lower()}")
            future = asyncio.get_running_loop().run_in_executor(
                executor, compute, self._memo)
            self._running[slot] = future
            self._queued += 1
            future.add_done_callback(partial(self._computed, slot))
        # Shielded: a caller that goes away must not cancel the others' computation.
        answer: Answer = await asyncio.shield(future)
        return answer

    def _computed(self, slot: tuple[Lane, Hashable, Hashable],
                  future: asyncio.Future[Any]) -> None:
        _lane, key, token = slot
        del self._running[slot]
        self._queued -= 1
        if not self._queued:
            self._memo.clear()  # the lanes ran dry: nothing shares the plan now
        if not future.cancelled() and future.exception() is None:
            self.cache.put(key, token, future.result(), time.monotonic())

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.01), self._sweep)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        # Runs QUIET seconds after the last read call, then when cached answers expire.
        self._timer = None
        if self._active:
            return  # the last of them reschedules
        now = time.monotonic()
        expires = self.cache.expire(now)
        if self._used:
            # Reads are quiet: give back what computing and sending them used (the cached
            # texts stay until they expire, and are given back once more then).
            self._used = False
            self._cached = expires is not None
            self.release_memory()
            log.debug("read calls are quiet: memory given back")
        elif expires is None and self._cached:
            self._cached = False
            self.release_memory()
            log.debug("read calls are over: cache dropped, memory given back")
        if expires is not None:
            self._schedule(expires - now)
        else:
            self._refused.clear()  # refusals are logged once per burst

    def close(self) -> None:
        """Drop the cache and stop the lanes' threads (queued computations are dropped; a
        running one finishes)."""
        self._cancel_timer()
        self.cache.clear()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
