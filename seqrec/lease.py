"""One writer per night: a lease on (storage root, date) that a run holds while it writes.

The lease is one small JSON object, ``leases/dt=YYYY-MM-DD.json`` below the root, naming its holder
(host, pid, run id), when it was taken and when it was last renewed. Every change to it is a
compare-and-swap, so of two runs racing for a night exactly one wins:

* **local root**: the object is created with ``O_CREAT | O_EXCL``; renewal, takeover and release
  happen under an ``flock`` of a sidecar ``.lock`` file (held for microseconds, and released by the
  kernel when a process dies, so a crash never leaves it locked), after checking the content is
  still what the caller last saw.
* **S3**: a conditional PUT, ``If-None-Match: *`` to take a free lease and ``If-Match: <ETag>`` to
  renew or take over a stale one; the release is a DELETE with ``If-Match``. Where the store
  ignores those headers (probed once per bucket), the lease is best effort and a warning says so;
  the Delta table's own commit protocol is then what keeps the table whole.

A thread renews the lease every ``ttl / 3``; a holder that stops renewing (killed, machine lost)
leaves a lease that the next run takes over once ``ttl`` has passed since the last renewal. A run
whose lease was taken over while it was paused refuses to commit (:meth:`Lease.check`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from seqrec.storage import Storage, s3_endpoint

log = logging.getLogger("seqrec.lease")


class LeaseHeld(RuntimeError):
    """Another live run holds the lease: a one-line message naming it."""


class LeaseLost(RuntimeError):
    """This run's lease expired and was taken over by another run before it could commit."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    run_id: str
    since: str  # ISO-8601 UTC: when the lease was taken
    renewed_at: float  # epoch seconds of the last renewal
    ttl_s: float

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) > self.renewed_at + self.ttl_s

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes) -> Holder:
        return cls(**json.loads(data))


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


class _Conflict(Exception):
    """The object changed (or appeared) since the caller read it."""


class _LocalStore:
    """Compare-and-swap on a local file: O_EXCL create, flock'ed check-and-replace."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, bytes] | None:
        data = self._read()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> bytes:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise _Conflict() from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return data

    def replace(self, data: bytes, token: bytes) -> bytes:
        with self._locked():
            if self._read() != token:
                raise _Conflict()
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: a reader sees the old lease or the new one
        return data

    def delete(self, token: bytes) -> None:
        with self._locked():
            if self._read() != token:
                raise _Conflict()
            os.unlink(self.path)


class _S3Store:
    """Compare-and-swap on one S3 object with conditional requests (If-None-Match / If-Match)."""

    _honours: dict[str, bool] = {}  # bucket -> whether the store enforces conditional writes

    def __init__(self, path: str):
        import s3fs

        self.fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint(), skip_instance_cache=True)
        self.path = path
        self.bucket, _, self.key = path.partition("/")
        if self.bucket not in self._honours:
            self._honours[self.bucket] = self._probe()
            if not self._honours[self.bucket]:
                log.warning(
                    "the S3 store at %s ignores conditional writes (If-None-Match): the lease on a "
                    "night is best effort there; the Delta commit protocol still keeps the table whole",
                    s3_endpoint() or "AWS",
                )
        self.conditional = self._honours[self.bucket]

    def _probe(self) -> bool:
        key = f"{self.key.rsplit('/', 1)[0]}/.probe-{uuid.uuid4().hex}"
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
            return False
        except OSError:
            return True
        finally:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=key)

    def read(self) -> tuple[bytes, str] | None:
        """Body and ETag of one GET: the two must belong to the same version of the object."""
        from fsspec.asyn import sync

        async def _get() -> tuple[bytes, str]:
            got = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with got["Body"] as stream:
                return await stream.read(), got["ETag"]

        try:
            return sync(self.fs.loop, _get)
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition: str) -> str:
        try:
            out = self.fs.call_s3(
                "put_object",
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                **(condition if self.conditional else {}),
            )
        except OSError as error:  # s3fs maps 412 Precondition Failed to an OSError (EINVAL)
            if "pre-condition" in str(error).lower() or "precondition" in str(error).lower():
                raise _Conflict() from error
            raise
        return out["ETag"]

    def create(self, data: bytes) -> str:
        if not self.conditional and self.read() is not None:
            raise _Conflict()
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str:
        if not self.conditional and (current := self.read()) is not None and current[1] != token:
            raise _Conflict()
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3(
                "delete_object",
                Bucket=self.bucket,
                Key=self.key,
                **({"IfMatch": token} if self.conditional else {}),
            )
        except OSError as error:
            if "condition" in str(error).lower():
                raise _Conflict() from error
            raise


class Lease:
    """The lease on one night; use as a context manager (see :func:`hold_night`)."""

    def __init__(self, storage: Storage, date: str, ttl_s: float, run_id: str | None = None):
        self.storage, self.date, self.ttl_s = storage, date, float(ttl_s)
        self.location = storage.uri("leases", f"dt={date}.json")
        path = storage.path("leases", f"dt={date}.json")
        self._store = _S3Store(path) if storage.is_s3 else _LocalStore(path)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._token = None
        self._holder: Holder | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _new_holder(self, since: str | None = None) -> Holder:
        now = time.time()
        return Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            run_id=self.run_id,
            since=since or _utc(now),
            renewed_at=now,
            ttl_s=self.ttl_s,
        )

    def acquire(self) -> Lease:
        for _ in range(5):
            mine = self._new_holder()
            try:
                self._token = self._store.create(mine.dumps())
                self._holder = mine
                break
            except _Conflict:
                pass
            current = self._store.read()
            if current is None:
                continue  # released between our create and our read: try again
            data, token = current
            holder = Holder.loads(data)
            if not holder.expired():
                raise LeaseHeld(self._held_message(holder))
            try:
                self._token = self._store.replace(mine.dumps(), token)
            except _Conflict:
                continue  # renewed or taken by another run meanwhile: look again
            self._holder = mine
            log.warning(
                "took over the lease on %s from %s pid %d (run %s), silent since %s (ttl %.0f s)",
                self.date,
                holder.host,
                holder.pid,
                holder.run_id,
                _utc(holder.renewed_at),
                holder.ttl_s,
            )
            break
        else:
            raise LeaseHeld(
                f"could not take the lease {self.location}: it kept changing; is another run starting?"
            )
        log.info("lease on %s taken by run %s (%s)", self.date, self.run_id, self.location)
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"seqrec-lease-{self.date}", daemon=True
        )
        self._thread.start()
        return self

    def _held_message(self, holder: Holder) -> str:
        left = holder.renewed_at + holder.ttl_s - time.time()
        return (
            f"the night {self.date} is being written by host {holder.host} pid {holder.pid} "
            f"(run {holder.run_id}) since {holder.since}; its lease {self.location} expires in {left:.0f} s "
            "unless renewed. Wait for that run, or delete the lease if it is dead"
        )

    def renew(self) -> None:
        with self._lock:
            if self._holder is None or self._lost:
                return
            mine = Holder(**{**asdict(self._holder), "renewed_at": time.time()})
            try:
                self._token = self._store.replace(mine.dumps(), self._token)
                self._holder = mine
                return
            except _Conflict:
                current = self._store.read()
            # A renewal whose reply was lost (a store restart) changed the object without telling us
            # its new token: it is still ours if it still names this run.
            if current is not None and Holder.loads(current[0]).run_id == self.run_id:
                self._token = current[1]
                self._token = self._store.replace(mine.dumps(), self._token)
                self._holder = mine
                return
            self._lost = True
            log.error("the lease on %s was taken over by another run: this run will not commit", self.date)

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(self.ttl_s / 3, 0.05)):
            try:
                self.renew()
            except OSError as error:  # a store hiccup: the next renewal tries again
                log.warning("renewing the lease on %s failed: %s", self.date, error)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (called before a commit)."""
        self.renew()
        if self._lost:
            raise LeaseLost(
                f"the lease on {self.date} ({self.location}) expired and another run took it over; "
                "this run stopped before committing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            if self._holder is None or self._lost:
                return
            try:
                self._store.delete(self._token)
            except _Conflict:
                log.warning("the lease on %s changed hands before release; left it alone", self.date)
            self._holder = None
        log.info("lease on %s released by run %s", self.date, self.run_id)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: dict[str, tuple[Lease, int]] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def hold_night(storage: Storage, date: str, ttl_s: float) -> Iterator[Lease]:
    """Hold the lease on ``date`` for the block; re-entrant within one process (the nightly job
    holds it and calls scoring, which asks for it again)."""
    key = storage.uri("leases", f"dt={date}.json")
    with _held_lock:
        if key in _held:
            lease, depth = _held[key]
            _held[key] = (lease, depth + 1)
        else:
            lease = None
    if lease is None:
        lease = Lease(storage, date, ttl_s).acquire()
        with _held_lock:
            _held[key] = (lease, 1)
    try:
        yield lease
    finally:
        with _held_lock:
            lease, depth = _held[key]
            if depth > 1:
                _held[key] = (lease, depth - 1)
            else:
                del _held[key]
                lease.release()


def current_lease(storage: Storage, date: str) -> Lease | None:
    """The lease this process holds on ``date``, if any."""
    with _held_lock:
        held = _held.get(storage.uri("leases", f"dt={date}.json"))
    return held[0] if held else None
