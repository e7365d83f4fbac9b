"""An unprivileged flood of read calls starves neither root nor kmodtrimd's memory.

Integration tests over a real private system bus (tests/dbusfixture.py): kmodtrimd runs as
a subprocess, and flooding clients run as uid 65534 (``setpriv``), as an unprivileged local
user would. The flooding client is this file run as a script: it keeps a number of read
calls (Plan, Explain with varying module names, ListGenerations, ShowGeneration) in flight
over several bus connections, sending the next call as soon as one is answered.

The measurements (root's latency, the daemon's RSS from /proc/PID/status) are printed;
``pytest -s`` shows them. The last tests run the limiter (kmodtrim/dbus/limits.py)
in-process: sharing, refusals and giving memory back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from dbusfixture import PrivateBus, private_bus, running_daemon
from kernels import KernelTree, copy_kernel_tree
from kmodtrim.dbus import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH
from kmodtrim.dbus.errors import LimitsExceededError
from kmodtrim.dbus.limits import CACHE_TTL, QUIET, AnswerCache, Memo, ReadLimiter
from kmodtrim.dbus.writer import tolerate_full_socket
from kmodtrim.operations import Target, load_index
from modbuild import ModSpec, scratch_root

__all__ = ["private_bus"]  # the fixture, re-exported for pytest

LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
MIB = 1024 * 1024
FLOOD_CALLS = 200  # in flight at any time, from uid 65534
FLOOD_CONNECTIONS = 4  # the bus itself allows 128 pending replies per connection
FLOOD_SECONDS = 8.0
ROOT_DEADLINE = 1.0  # root's ListGenerations under the flood, seconds
RSS_MARGIN = 15 * MIB  # the daemon's RSS after the flood, over its idle RSS
# When the daemon has given the memory back: its cached answers have expired, then it
# waited for more calls (limits.py), plus a margin for a loaded machine.
RSS_SETTLE = CACHE_TTL + QUIET + 3.0
# A call the daemon never answers would otherwise hang the test (and the flood client).
CALL_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------
# The flooding client (run as a script, as uid 65534)


def _flood_call(i: int, names: Sequence[str]) -> tuple[str, str, list[Any]]:
    kind = i % 4
    if kind == 0:
        return "Plan", "a{sv}", [{}]
    if kind == 1:
        return "Explain", "sa{sv}", [names[(i // 4) % len(names)], {}]
    if kind == 2:
        return "ListGenerations", "", []
    return "ShowGeneration", "u", [0]


async def flood(address: str, connections: int, calls: int, seconds: float,
                names: Sequence[str]) -> dict[str, Any]:
    """Keep ``calls`` read calls in flight for ``seconds``; returns the replies counted
    by kind ("ok" or the error name), the slowest reply of each kind and the text of one
    error of each name. Calls still unanswered CALL_TIMEOUT seconds after the end are
    counted as "unanswered"."""
    buses: list[Any] = [await MessageBus(bus_address=address).connect()
                        for _ in range(connections)]
    for bus in buses:
        tolerate_full_socket(bus)  # a flooder that keeps its connections
    deadline = time.monotonic() + seconds
    replies: Counter[str] = Counter()
    slowest: dict[str, float] = {}
    texts: dict[str, str] = {}

    async def worker(n: int) -> None:
        bus = buses[n % connections]
        i = n
        while time.monotonic() < deadline:
            member, signature, body = _flood_call(i, names)
            i += calls
            started = time.monotonic()
            reply = await bus.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH, interface=MANAGER_INTERFACE,
                member=member, signature=signature, body=body))
            kind = "ok" if reply.message_type == MessageType.METHOD_RETURN \
                else str(reply.error_name)
            replies[kind] += 1
            slowest[kind] = max(slowest.get(kind, 0.0), time.monotonic() - started)
            if kind != "ok":
                texts.setdefault(kind, str(reply.body[0]) if reply.body else "")

    workers = [asyncio.ensure_future(worker(n)) for n in range(calls)]
    _done, pending = await asyncio.wait(workers, timeout=seconds + CALL_TIMEOUT)
    for task in pending:
        task.cancel()
    replies["unanswered"] = len(pending)
    for bus in buses:
        bus.disconnect()
    return {"replies": dict(replies), "slowest": slowest, "texts": texts}


def _start_flood(bus: PrivateBus, names: Sequence[str], *, calls: int = FLOOD_CALLS,
                 connections: int = FLOOD_CONNECTIONS,
                 seconds: float = FLOOD_SECONDS) -> subprocess.Popen[str]:
    """This file as the flooding client, run as uid/gid 65534 with no groups."""
    return subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         __file__, bus.address, str(connections), str(calls), str(seconds), *names],
        env={**bus.env(), "PYTHONDONTWRITEBYTECODE": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _flood_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=FLOOD_SECONDS + CALL_TIMEOUT + 30)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


# ---------------------------------------------------------------------------------------
# Measuring


def _status(pid: int, field: str) -> int:
    """A size field of /proc/PID/status (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _timed_call(bus: Any, member: str, signature: str = "",
                      body: list[Any] | None = None) -> tuple[float, Message]:
    started = time.monotonic()
    reply: Message = await asyncio.wait_for(bus.call(Message(
        destination=BUS_NAME, path=OBJECT_PATH, interface=MANAGER_INTERFACE, member=member,
        signature=signature, body=body or [])), CALL_TIMEOUT)
    return time.monotonic() - started, reply


async def _root_calls(address: str, until: float) -> dict[str, list[float]]:
    """Root calls ListGenerations (and once Plan) every half second until ``until``;
    returns the latencies (seconds) per method. Every call must succeed."""
    bus: Any = await MessageBus(bus_address=address).connect()
    latencies: dict[str, list[float]] = {"ListGenerations": [], "Plan": []}
    try:
        while True:
            took, reply = await _timed_call(bus, "ListGenerations")
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
            assert reply.body[0][0]["generation"].value == 0
            latencies["ListGenerations"].append(took)
            if not latencies["Plan"]:
                took, reply = await _timed_call(bus, "Plan", "a{sv}", [{}])
                assert reply.message_type == MessageType.METHOD_RETURN, reply.body
                latencies["Plan"].append(took)
            if time.monotonic() >= until:
                return latencies
            await asyncio.sleep(0.5)
    finally:
        bus.disconnect()


# ---------------------------------------------------------------------------------------


@pytest.fixture
def cloud_root(cloud_kernel: KernelTree, tmp_path: Path) -> KernelTree:
    """A copy of the cloud kernel with its module index cached, as on a machine where
    kmodtrim has planned before (the first index is a one-time cost, flood or not)."""
    tree = copy_kernel_tree(cloud_kernel, tmp_path / "root")
    load_index(Target(root=tree.root, kernel=tree.kver))
    return tree


@pytest.mark.slow
@pytest.mark.kernel
def test_root_is_answered_promptly_and_memory_recovers_under_an_unprivileged_flood(
    private_bus: PrivateBus, cloud_root: KernelTree
) -> None:
    names = sorted(p.name.split(".ko")[0] for p in cloud_root.moddir.rglob("*.ko*"))[:64]
    with running_daemon(private_bus, cloud_root.root) as daemon:
        idle = _status(daemon.pid, "VmRSS")
        flooder = _start_flood(private_bus, names)
        try:
            time.sleep(2.0)  # the flood is in full swing
            latencies = asyncio.run(_root_calls(
                private_bus.address, time.monotonic() + FLOOD_SECONDS - 3.0))
        finally:
            result = _flood_result(flooder)
        peak = _status(daemon.pid, "VmHWM")
        at_end = _status(daemon.pid, "VmRSS")
        time.sleep(RSS_SETTLE)  # cached answers expire, then the heap is given back
        after = _status(daemon.pid, "VmRSS")
        assert daemon.poll() is None
    print(f"\nflood of {FLOOD_CALLS} calls from uid 65534: {result}")
    print(f"root ListGenerations under the flood: "
          f"{', '.join(f'{t:.3f}' for t in latencies['ListGenerations'])} s; "
          f"root Plan: {latencies['Plan'][0]:.3f} s")
    print(f"kmodtrimd RSS: idle {idle / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
          f"at the end of the flood {at_end / MIB:.1f} MiB, "
          f"{RSS_SETTLE:.0f} s later {after / MIB:.1f} MiB")
    assert max(latencies["ListGenerations"]) < ROOT_DEADLINE
    replies = result["replies"]
    assert replies["unanswered"] == 0
    # The flood is answered, partly refused at once, and not refused wholesale.
    assert set(replies) <= {"ok", LIMITS_EXCEEDED, "unanswered"}, replies
    assert replies.get("ok", 0) > 0 and replies.get(LIMITS_EXCEEDED, 0) > 0
    assert result["slowest"][LIMITS_EXCEEDED] < ROOT_DEADLINE
    assert after <= idle + RSS_MARGIN


# ---------------------------------------------------------------------------------------
# The limits themselves, on a small scratch root


KVER = "6.1.0-test"
POLICY = "presets = []\nclouds = []\nrules = []\n"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("net_a", imports=("core_fn",), depends=("core",)),
    ModSpec("unused_c"),
)


@pytest.mark.slow
def test_caller_over_its_limit_is_refused_and_root_is_not(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    root = scratch_root(tmp_path / "root", KVER, SPECS, policy=POLICY)

    async def as_root() -> list[Message]:
        bus: Any = await MessageBus(bus_address=private_bus.address).connect()
        try:
            calls = [bus.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH, interface=MANAGER_INTERFACE,
                member="Explain", signature="sa{sv}",
                body=[name, {"kernel": Variant("s", KVER)}]))
                for name in ("core", "net_a", "unused_c") * 16]
            return list(await asyncio.gather(*calls))
        finally:
            bus.disconnect()

    with running_daemon(private_bus, root):
        flooder = _start_flood(private_bus, ["core", "net_a", "unused_c"], calls=64,
                               connections=1, seconds=3.0)
        try:
            time.sleep(1.0)
            root_replies = asyncio.run(as_root())
        finally:
            result = _flood_result(flooder)
    replies = result["replies"]
    assert replies.get(LIMITS_EXCEEDED, 0) > 0 and replies.get("ok", 0) > 0, replies
    assert replies["unanswered"] == 0
    refusal = result["texts"][LIMITS_EXCEEDED]
    assert "uid 65534 has 8 read calls in flight" in refusal and str(root) not in refusal
    # Root is not limited: 48 concurrent calls during the flood, all answered.
    assert [r.message_type for r in root_replies] == [MessageType.METHOD_RETURN] * 48
    assert {json.loads(r.body[0])["status"] for r in root_replies} <= {"kept", "removed"}


# ---------------------------------------------------------------------------------------
# The limiter in-process (its threads and timers are real; the answers are made up)


def test_identical_reads_share_one_computation_while_the_state_is_unchanged() -> None:
    computed: list[str] = []

    def compute(text: str, memo: Memo) -> str:
        computed.append(text)
        time.sleep(0.05)  # long enough for the other calls to arrive meanwhile
        return text

    async def scenario() -> None:
        reads = ReadLimiter(lambda: None, cache=AnswerCache(ttl=0.3))
        try:
            answers = await asyncio.gather(*(
                reads.answer("Plan", "state 1", partial(compute, "plan 1"),
                             privileged=False, expensive=True) for _ in range(20)))
            assert answers == ["plan 1"] * 20 and computed == ["plan 1"]
            # Cached: root gets it too, without a computation of its own.
            assert await reads.answer("Plan", "state 1", partial(compute, "x"),
                                      privileged=True, expensive=True) == "plan 1"
            # A new state is a new answer; an expired one is made again.
            assert await reads.answer("Plan", "state 2", partial(compute, "plan 2"),
                                      privileged=False, expensive=True) == "plan 2"
            await asyncio.sleep(0.35)
            assert await reads.answer("Plan", "state 2", partial(compute, "plan 2'"),
                                      privileged=False, expensive=True) == "plan 2'"
            assert computed == ["plan 1", "plan 2", "plan 2'"]
        finally:
            reads.close()

    asyncio.run(scenario())


def test_limits_refuse_at_once_and_never_root() -> None:
    async def scenario() -> None:
        reads = ReadLimiter(lambda: None, per_caller=2, unprivileged=3)
        try:
            with reads.admit(1000), reads.admit(1000):
                with pytest.raises(LimitsExceededError, match="uid 1000 has 2 read calls"), \
                        reads.admit(1000):
                    pass
                with reads.admit(1001):
                    with pytest.raises(LimitsExceededError, match="unprivileged callers"), \
                            reads.admit(1002):
                        pass
                    with reads.admit(0), reads.admit(0), reads.admit(0), reads.admit(0):
                        pass
            with reads.admit(1000), reads.admit(1000):  # the slots are free again
                pass
        finally:
            reads.close()

    asyncio.run(scenario())


def test_memory_is_given_back_once_the_reads_are_over() -> None:
    released: list[float] = []

    async def scenario() -> None:
        reads = ReadLimiter(lambda: released.append(time.monotonic()), quiet=0.05,
                            cache=AnswerCache(ttl=0.2))
        try:
            with reads.admit(1000):
                await reads.answer("List", "state", lambda memo: "[]", privileged=False,
                                   expensive=False)
            ended = time.monotonic()
            await asyncio.sleep(0.1)
            # Quiet: what answering used is given back; the answer is still fresh.
            assert len(released) == 1 and released[0] - ended >= 0.05
            assert len(reads.cache) == 1
            await asyncio.sleep(0.3)
            # Expired: the cache is dropped and its memory given back too.
            assert len(released) == 2 and released[1] - ended >= 0.15
            assert len(reads.cache) == 0
            await asyncio.sleep(0.3)
            assert len(released) == 2  # twice per burst: an idle daemon stays idle
        finally:
            reads.close()

    asyncio.run(scenario())


def _flood_main(argv: Sequence[str]) -> int:
    """``test_dbus_flood.py ADDRESS CONNECTIONS CALLS SECONDS NAME…``: flood, print the
    result as JSON."""
    address, connections, calls, seconds, *names = argv
    result = asyncio.run(flood(address, int(connections), int(calls), float(seconds), names))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_flood_main(sys.argv[1:]))
