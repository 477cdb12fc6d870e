"""seqrec.lease: one writer per night, locally (O_EXCL + flock) and on S3 (conditional PUT)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest

from seqrec.lease import Holder, Lease, LeaseHeld, LeaseLost, current_lease, hold_night
from seqrec.storage import Storage

DATE = "2024-01-07"


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage(request.getfixturevalue("s3_root"))


def test_second_holder_is_refused_with_the_holder_named(storage):
    with Lease(storage, DATE, ttl_s=60, run_id="first-run") as first:
        with pytest.raises(LeaseHeld) as refused:
            Lease(storage, DATE, ttl_s=60).acquire()
        message = str(refused.value)
        assert "\n" not in message
        for part in (
            DATE,
            socket.gethostname(),
            f"pid {os.getpid()}",
            "run first-run",
            "since 20",
            first.location,
        ):
            assert part in message, (part, message)
        Lease(storage, "2024-01-08", ttl_s=60).acquire().release()  # another night is free
    with Lease(storage, DATE, ttl_s=60):  # released: free again
        pass


def test_stale_lease_is_taken_over_after_its_ttl(storage):
    checker = Lease(storage, DATE, ttl_s=5.0)  # S3: its client is built before the clock starts
    dead = Lease(storage, DATE, ttl_s=5.0, run_id="dead-run").acquire()
    dead._stop.set()  # the holder stops renewing, as a killed process would
    dead._thread.join()
    with pytest.raises(LeaseHeld):
        checker.acquire()
    time.sleep(max(0.0, Holder.loads(dead._store.read()[0]).renewed_at + 5.2 - time.time()))
    with Lease(storage, DATE, ttl_s=30, run_id="next-run") as taker:
        assert Holder.loads(taker._store.read()[0]).run_id == "next-run"
        with pytest.raises(LeaseLost):
            dead.check()  # the old holder, were it only paused, must not commit now
        dead.release()  # ... and its release leaves the new holder's lease alone
        with pytest.raises(LeaseHeld, match="run next-run"):
            Lease(storage, DATE, ttl_s=30).acquire()


def test_renewal_keeps_a_live_lease_past_its_ttl(storage):
    checker = Lease(storage, DATE, ttl_s=3.0)
    with Lease(storage, DATE, ttl_s=3.0):
        time.sleep(7.0)
        with pytest.raises(LeaseHeld):
            checker.acquire()


def test_hold_night_is_reentrant_in_one_process(storage):
    with hold_night(storage, DATE, 60) as outer:
        with hold_night(storage, DATE, 60) as inner:
            assert inner is outer and current_lease(storage, DATE) is outer
        assert current_lease(storage, DATE) is outer  # the inner block did not release it
        with pytest.raises(LeaseHeld):
            Lease(storage, DATE, ttl_s=60).acquire()
    assert current_lease(storage, DATE) is None
    Lease(storage, DATE, ttl_s=60).acquire().release()


def _race(root: str, env: dict[str, str], ready, tried, results) -> None:
    os.environ.update(env)
    lease = Lease(Storage(root), DATE, ttl_s=30)  # S3: the client is built and the store probed here
    ready.wait(timeout=60)  # spawned interpreters are slow to start: then all go
    try:
        lease.acquire()
        results.put("won")
    except LeaseHeld:
        results.put("refused")
    tried.wait(timeout=60)  # the winner holds on until every process has tried
    lease.release()


def test_racing_processes_exactly_one_wins(storage, request):
    env = request.getfixturevalue("s3_env") if storage.is_s3 else {}
    context = multiprocessing.get_context("spawn")
    results, ready, tried = context.Queue(), context.Barrier(4), context.Barrier(4)
    procs = [context.Process(target=_race, args=(storage.root, env, ready, tried, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_renewal_whose_reply_was_lost_keeps_the_lease(storage):
    """The store applied a renewal but the reply never came (a restart): the token held is stale."""
    with Lease(storage, DATE, ttl_s=60) as lease:
        lease._stop.set()
        lease._thread.join()
        data, _ = lease._store.read()
        lease._token = lease._store.replace(data, lease._token)  # the renewal that happened ...
        lease._token = b"stale" if not storage.is_s3 else '"0123456789abcdef"'  # ... and its lost reply
        lease.check()  # still ours: no LeaseLost
        assert Holder.loads(lease._store.read()[0]).run_id == lease.run_id
