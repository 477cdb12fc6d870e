"""What the benchmark scripts share: memory sampling, peak matmul speed, the table and the JSON file.

Not a library of seqrec: the scripts beside this file import it as ``harness`` (Python puts a
script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30


class ProcessTreeMemory:
    """Peak memory of this process, all its descendants and Ray's object store, sampled in a thread.

    A local Ray started by ``ray.init`` is exactly that tree: the driver, then the GCS server and the
    raylet it spawns, then the workers and actors the raylet spawns. Selecting processes by
    descent, not by a name such as ``ray::`` or ``raylet``, keeps other people's Ray clusters on
    the same machine out of the number. (With ``RAY_ADDRESS`` pointing at a remote cluster only the
    driver is seen.)

    Three numbers are kept:

    * ``peak_mem_gib``, the headline: the private and file-backed proportional set size (PSS) of
      every process in the tree plus the bytes held in Ray's object store (Plasma). Shared memory
      is taken from the store's own count rather than from the processes, because a store page is
      in no process's PSS once the worker that wrote it has exited (or before anyone maps it), yet
      still takes RAM; and a page mapped by several processes would otherwise count several times.
    * ``peak_pss_gib``: the processes' whole PSS (shared pages split between the processes that map
      them; a store page nobody maps is missing).
    * ``peak_rss_gib``: summed RSS, which counts a shared page (the store, libtorch) once per
      process that maps it: an upper bound.

    RSS is read every ``interval_s``; PSS (``/proc/<pid>/smaps_rollup``, ~2 ms of CPU per process,
    20x an RSS read) and the store only every ``pss_every``-th sample, so that the sampler does not
    itself load a 2-core machine. CPU seconds per process role are kept too: a cheap profile of
    where the machine's time went.
    """

    def __init__(self, interval_s: float = 0.2, pss_every: int = 5, root_pid: int | None = None):
        self.interval_s = interval_s
        # PSS reads /proc/<pid>/smaps_rollup: ~2 ms of CPU per Ray process, 20x an RSS read. Read it
        # every ``pss_every``-th sample only, so that the sampler does not itself load the 2 cores.
        self.pss_every = pss_every
        self.root = psutil.Process(root_pid or os.getpid())
        self.peak_rss = self.peak_pss = self.peak_mem = self.peak_store = 0
        self._store = _ObjectStore()
        self.peak_processes = 0
        self.peak_driver_rss = 0  # this process alone (the job's driver)
        self.peak_by_process: dict[str, float] = {}  # role -> private + file PSS when peak_mem was reached
        self.samples = 0
        self.cpu_seen: dict[int, float] = {}  # pid -> its CPU seconds at the previous sample
        self.cpu_s: dict[str, float] = {}  # process role -> CPU seconds used while sampled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, with_pss: bool = True) -> tuple[int, int, int]:
        """(summed RSS, summed PSS or 0, processes) now; charges CPU time used since the last sample
        and, ``with_pss``, updates the peaks of PSS and of private + file PSS + object store."""
        rss = pss = private = count = 0
        by_role: dict[str, float] = {}
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            processes = [self.root]
        for process in processes:
            try:
                with process.oneshot():
                    info = process.memory_info()
                    times = process.cpu_times()
                    role = _role(process)
            except psutil.Error:
                continue
            rss += info.rss
            count += 1
            if process.pid == self.root.pid:
                self.peak_driver_rss = max(self.peak_driver_rss, info.rss)
            if with_pss:
                anon, file, shmem = _pss_parts(process.pid, default=info.rss)
                pss += anon + file + shmem
                private += anon + file
                by_role[role] = by_role.get(role, 0) + anon + file
            # A Ray worker's title changes with the task it runs: charge each interval to the current one.
            used = times.user + times.system
            self.cpu_s[role] = self.cpu_s.get(role, 0.0) + used - self.cpu_seen.get(process.pid, used)
            self.cpu_seen[process.pid] = used
        if with_pss:
            store = self._store.bytes_used()
            self.peak_pss, self.peak_store = max(self.peak_pss, pss), max(self.peak_store, store)
            if private + store > self.peak_mem:
                self.peak_mem, self.peak_by_process = private + store, {**by_role, "object store": store}
        return rss, pss, count

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, _, count = self.sample(with_pss=self.samples % self.pss_every == 0)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, count)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ProcessTreeMemory:
        self.sample(with_pss=False)  # baseline: CPU used before the block is not counted
        self.cpu_s.clear()
        self._machine_busy, self._started = _machine_busy_s(), time.perf_counter()
        self._steal = getattr(psutil.cpu_times(), "steal", 0.0)
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample(with_pss=False)
        self.wall_s = time.perf_counter() - self._started
        self.machine_busy_s = _machine_busy_s() - self._machine_busy
        self.steal_s = getattr(psutil.cpu_times(), "steal", 0.0) - self._steal

    def result(self) -> dict[str, Any]:
        """Peaks, and CPU seconds by process role (where the machine's time went: a profile of the tree)."""
        ours = sum(self.cpu_s.values())
        return {
            "peak_mem_gib": round(self.peak_mem / GIB, 3),
            "peak_pss_gib": round(self.peak_pss / GIB, 3),
            "driver_peak_rss_gib": round(self.peak_driver_rss / GIB, 3),
            "peak_rss_gib": round(self.peak_rss / GIB, 3),
            "peak_object_store_gib": round(self.peak_store / GIB, 3),
            "peak_processes": self.peak_processes,
            "memory_samples": self.samples,
            "peak_mem_gib_by_process": {
                k: round(v / GIB, 3) for k, v in sorted(self.peak_by_process.items(), key=lambda kv: -kv[1])
            },
            "cpu_s_by_process": {
                k: round(v, 1) for k, v in sorted(self.cpu_s.items(), key=lambda kv: -kv[1])
            },
            # The machine is shared: CPU seconds that processes outside this tree used meanwhile.
            "cpu_s_other_processes": round(max(self.machine_busy_s - ours, 0.0), 1),
            "cpu_s_available": round(self.wall_s * (os.cpu_count() or 1), 1),
            # A virtual machine's CPUs may be taken by the host for other guests ("steal").
            "cpu_s_stolen_by_host": round(self.steal_s, 1),
        }


def _pss_parts(pid: int, default: int) -> tuple[int, int, int]:
    """(anonymous, file-backed, shared-memory) PSS bytes of a process; ``(default, 0, 0)`` if unreadable."""
    parts = {"Pss_Anon:": 0, "Pss_File:": 0, "Pss_Shmem:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, value, *_ = line.split()
                if key in parts:
                    parts[key] = int(value) * 1024
    except (OSError, ValueError):
        return default, 0, 0
    return parts["Pss_Anon:"], parts["Pss_File:"], parts["Pss_Shmem:"]


class _ObjectStore:
    """Bytes used in the local Ray's object store (0 without Ray), from the raylet's own statistics."""

    def __init__(self):
        self._state = None

    def bytes_used(self) -> int:
        try:
            import ray

            if not ray.is_initialized():
                return 0
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            if self._state is None:
                self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
            stats = get_memory_info_reply(self._state, timeout_seconds=5).store_stats
            return int(stats.object_store_bytes_used + stats.object_store_bytes_fallback)
        except Exception:  # noqa: BLE001 - a private Ray API; without it the store is left out
            self._state = None
            return 0


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _role(process: psutil.Process) -> str:
    """A short name for a process of the tree: ``ray::MapWorker(MapBatches(Recommender))``, ``raylet``, ..."""
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return "?"
    if process.pid == os.getpid():
        return "driver"
    first = cmdline[0] if cmdline else process.name()
    if first.startswith("ray::"):
        return first.split(" ")[0][:60]
    executable = Path(first.split(" ")[0]).name
    if executable in ("raylet", "gcs_server"):
        return executable
    if "default_worker.py" in " ".join(cmdline):
        return "ray worker (idle)"
    return executable[:40]


def matmul_peak_flops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul FLOP/s with ``threads`` torch threads.

    The best of ``repeats`` products of two (n x n) matrices."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: MKL's first call sets up its buffers
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - started)
        return 2.0 * n**3 / best
    finally:
        torch.set_num_threads(previous)


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was (the load average counts other users)."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "torch": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def table(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    rows = list(rows)

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``payload`` (plus when and where) to ``results/<name>.json`` or ``out``."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> dict[str, Any]:
    """CPU model and the vector flags that decide training speed (hosts of this kind differ)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "vector_flags": [f for f in VECTOR_FLAGS if f in flags]}
