"""Benchmark the nightly scoring stage: users/second, peak memory and hardware efficiency.

For each ``--users`` N it writes N synthetic users (``--seq-len`` events each, items drawn from a
Zipf-like popularity over ``--items``) as ``sequences/dt=...`` Parquet under a storage root, writes
and promotes a randomly initialised model artifact of the real architecture, and runs the real
:func:`seqrec.score.score` stage on a local Ray (``seqrec.runtime.init_ray``), measuring:

* wall seconds of the whole stage (reading, encoding, model, ranking, writing, publishing) and
  users/second;
* peak memory of all local Ray processes together (driver + GCS + raylet + workers) and Ray's
  object store: ``harness.ProcessTreeMemory`` explains the count (``peak_mem_gib``) and the two
  others kept beside it (summed PSS, summed RSS);
* the roofline ratio: achieved FLOP/s, counted analytically (see :func:`flops_per_user`), over
  this machine's float32 matmul FLOP/s measured in the same run with as many torch threads as
  there are scoring actors;
* actor_speedup: the same stage with 2 actors vs 1 actor (one torch thread each) on the same data, at
  ``--speedup-users``. The stage's fixed start-up (~6.5 s: actor processes, importing torch and
  transformers in them) weighs on small runs: measured at 1M users it is 1.75, at 100k 1.38.

``--items-sweep`` measures :func:`seqrec.ranking.rank_unseen` alone: a (256 x H) query block against
item tables up to 10,000,000 items, reporting how much resident memory the ranking adds on top of
the table itself (it scores the catalogue in cache-sized chunks, so this should not grow with N).

Examples::

    python benchmarks/scoring.py --users 100000 1000000
    python benchmarks/scoring.py --items-sweep --sweep-items 100000 1000000 10000000
    python benchmarks/scoring.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

log = logging.getLogger("benchmarks.scoring")

EVENT_TYPES = ["view", "click", "cart", "purchase", "interaction"]
ROWS_PER_FILE = 200_000  # as seqrec.prepare writes sequences
CALIBRATION_DATE, CALIBRATION_USERS = "2030-02-01", 2048


# --------------------------------------------------------------------------------------------
# The FLOP count
# --------------------------------------------------------------------------------------------
def flops_per_user(num_items: int, seq_len: int, hidden: int, layers: int) -> dict[str, float]:
    """Multiply-add FLOPs (2 per multiply-accumulate) that scoring one user executes.

    Transformer forward over all T = seq_len positions (the model runs every position, although
    only the last one's state becomes the user vector), per layer:
        QKV projection 2*T*H*3H + attention output projection 2*T*H*H + MLP 2*T*H*4H + 2*T*4H*H
        = 24*T*H^2, plus attention scores Q K^T 2*T*T*H and weights x V 2*T*T*H = 4*T^2*H
    (the causal mask's skipped half is counted: the kernel computes full T x T tiles here).
    Scores against the catalogue: 2*H*(N+1) (padding row included: it is computed, then masked).
    Layer norms, GELU, softmax, embedding lookups and the top-k are not counted: they are not
    matrix products, so the ratio to matmul peak charges them as overhead.
    """
    forward = layers * (24 * seq_len * hidden**2 + 4 * seq_len**2 * hidden)
    ranking = 2 * hidden * (num_items + 1)
    return {"forward": float(forward), "ranking": float(ranking), "total": float(forward + ranking)}


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------
def popularity(num_items: int, exponent: float = 0.8) -> np.ndarray:
    """(num_items,) probabilities of items 1..num_items, Zipf-like: real catalogues have a long tail."""
    weights = 1.0 / np.arange(1, num_items + 1) ** exponent
    return weights / weights.sum()


def write_sequences(storage, date: str, users: int, num_items: int, seq_len: int, seed: int = 0) -> int:
    """``users`` rows of (user_id, item_ids, event_types) under ``sequences/dt=date``; returns bytes written.

    Written file by file so that generating a million users needs no more memory than one file.
    """
    cdf = np.cumsum(popularity(num_items))
    types = pa.array(EVENT_TYPES[:4], pa.string())
    storage.delete_dir("sequences", f"dt={date}")
    written = 0
    for part, first in enumerate(range(0, users, ROWS_PER_FILE)):
        rng = np.random.default_rng([seed, part])
        n = min(ROWS_PER_FILE, users - first)
        items = np.minimum(np.searchsorted(cdf, rng.random(n * seq_len)), num_items - 1) + 1  # ids 1..N
        offsets = pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32))
        event_types = pc.take(types, pa.array(rng.choice(4, n * seq_len, p=[0.7, 0.2, 0.07, 0.03])))
        table = pa.table(
            {
                "user_id": pa.array(np.arange(first, first + n, dtype=np.int64)),
                "item_ids": pa.ListArray.from_arrays(offsets, pa.array(items, pa.int64())),
                "event_types": pa.ListArray.from_arrays(offsets, event_types),
            }
        )
        storage.write_table(table, "sequences", f"dt={date}", f"part-{part:05d}.parquet")
        written += table.nbytes
        del table, items, event_types
    storage.write_json({"rows": users, "synthetic": True}, "sequences", f"dt={date}", "_SUCCESS")
    return written


def in_child_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a forked child: the driver, whose memory is measured, keeps no trace
    of generating the data (allocators rarely hand freed memory back to the system)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def write_model(
    storage, num_items: int, seq_len: int, hidden: int, layers: int, heads: int, seed: int = 0
) -> str:
    """A randomly initialised model of the real architecture, saved and promoted; returns its version."""
    from seqrec import artifact as artifacts
    from seqrec.data import Vocabulary
    from seqrec.model import build_model

    torch.manual_seed(seed)
    model = build_model(
        num_items,
        kind="causal",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        max_len=seq_len,
        dropout=0.2,
        num_event_types=len(EVENT_TYPES),
    ).eval()
    counts = np.concatenate([[0], np.round(popularity(num_items) * 50 * num_items).astype(np.int64) + 1])
    vocab = Vocabulary(
        items=pa.array(np.arange(1, num_items + 1, dtype=np.int64)), event_types=EVENT_TYPES, counts=counts
    )
    version = f"bench-{num_items}-{hidden}-{seq_len}"
    artifacts.save(
        storage,
        artifacts.Artifact(
            version=version,
            model=model,
            vocab=vocab,
            manifest={"benchmark": "benchmarks/scoring.py", "seed": seed},
        ),
    )
    artifacts.promote(storage, version, "benchmark model (random weights)")
    return version


# --------------------------------------------------------------------------------------------
# One measured run of the stage
# --------------------------------------------------------------------------------------------
def run_stage(storage, date: str, version: str, *, actors: int, batch_size: int, item_chunk: int) -> dict:
    from seqrec.config import ScoreConfig
    from seqrec.score import score

    # Each actor: one torch thread on (in Ray's accounting) half a CPU, so two actors leave one of the
    # two CPUs for the read and write tasks (whole-CPU actors starve them: see PITFALLS.md).
    config = ScoreConfig(
        num_actors=actors, torch_threads=1, cpus_per_actor=0.5, batch_size=batch_size, item_chunk=item_chunk
    )
    gc.collect()
    with harness.ProcessTreeMemory() as memory:
        report = score(storage, date, version, config)
    return {"rows": report.rows, "wall_s": report.wall_s, **memory.result()}


def measure_users(storage, version: str, users: int, date: str, args, flops: dict, seed: int) -> dict:
    import ray

    from seqrec.runtime import init_ray

    started = time.perf_counter()
    data_bytes = in_child_process(write_sequences, storage, date, users, args.items, args.seq_len, seed=seed)
    generate_s = time.perf_counter() - started
    started_ray = not ray.is_initialized()  # a caller's Ray (the tests') is used and left running
    init_ray()
    try:
        peak = harness.matmul_peak_flops(args.actors)
        run = run_stage(
            storage, date, version, actors=args.actors, batch_size=args.batch_size, item_chunk=args.item_chunk
        )
        peak = max(peak, harness.matmul_peak_flops(args.actors))  # the better of before / after
        one_actor = fixed = None
        if users == args.speedup_users and args.actors != 1:
            one_actor = run_stage(
                storage, date, version, actors=1, batch_size=args.batch_size, item_chunk=args.item_chunk
            )
            # The stage's fixed cost (starting actors, loading the model, publishing) for each actor
            # count, measured on a few users; subtracted, it leaves the steady-state speedup.
            write_sequences(storage, CALIBRATION_DATE, CALIBRATION_USERS, args.items, args.seq_len, seed=99)
            fixed = {
                n: run_stage(
                    storage,
                    CALIBRATION_DATE,
                    version,
                    actors=n,
                    batch_size=args.batch_size,
                    item_chunk=args.item_chunk,
                )["wall_s"]
                for n in (args.actors, 1)
            }
    finally:
        if started_ray:
            ray.shutdown()
    if run["rows"] != users:
        raise AssertionError(f"scored {run['rows']} users, expected {users}")
    achieved = users * flops["total"] / run["wall_s"]
    row = {
        "users": users,
        "actors": args.actors,
        "wall_s": round(run["wall_s"], 2),
        "users_per_s": round(users / run["wall_s"], 1),
        "peak_mem_gib": run["peak_mem_gib"],
        "peak_pss_sum_gib": run["peak_pss_gib"],
        "peak_rss_sum_gib": run["peak_rss_gib"],
        "peak_object_store_gib": run["peak_object_store_gib"],
        "achieved_gflop_s": round(achieved / 1e9, 2),
        "peak_gflop_s": round(peak / 1e9, 2),
        "roofline_ratio": round(achieved / peak, 3),
        "actor_speedup": None,
        "actor_speedup_steady": None,
        "one_actor_wall_s": None,
        "generate_s": round(generate_s, 1),
        "input_gib_in_memory": round(data_bytes / harness.GIB, 3),
        "memory_samples": run["memory_samples"],
        "peak_processes": run["peak_processes"],
        "peak_mem_gib_by_process": run["peak_mem_gib_by_process"],
        "cpu_s_by_process": run["cpu_s_by_process"],
        "cpu_s_other_processes": run["cpu_s_other_processes"],
        "cpu_s_available": run["cpu_s_available"],
        "cpu_s_stolen_by_host": run["cpu_s_stolen_by_host"],
    }
    if one_actor:
        row["one_actor_wall_s"] = round(one_actor["wall_s"], 2)
        row["actor_speedup"] = round(one_actor["wall_s"] / run["wall_s"], 3)
        row["fixed_s_by_actors"] = {str(n): round(v, 2) for n, v in fixed.items()}
        row["actor_speedup_steady"] = round(
            (one_actor["wall_s"] - fixed[1]) / max(run["wall_s"] - fixed[args.actors], 1e-9), 3
        )
        row["one_actor_peak_mem_gib"] = one_actor["peak_mem_gib"]
        row["one_actor_cpu_s_by_process"] = one_actor["cpu_s_by_process"]
        row["one_actor_cpu_s_other_processes"] = one_actor["cpu_s_other_processes"]
    storage.delete_dir("sequences", f"dt={date}")
    storage.delete_dir("recommendations")  # the whole Delta table: a date folder alone would break its log
    return row


# --------------------------------------------------------------------------------------------
# rank_unseen alone, against catalogues up to 10M items
# --------------------------------------------------------------------------------------------
def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """This process's peak RSS over a block, sampled every 5 ms (torch releases the GIL while it works)."""

    def __enter__(self):
        self.peak, self._stop = current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def items_sweep(
    sizes: list[int], hidden: int, queries: int, seq_len: int, item_chunk: int, k: int = 10
) -> list[dict]:
    from seqrec.ranking import rank_unseen

    torch.set_num_threads(1)  # as in a scoring actor
    rows = []
    for num_items in sizes:
        generator = torch.Generator().manual_seed(num_items)
        user_vectors = torch.randn(queries, hidden, generator=generator)
        seen = torch.randint(1, num_items, (queries, seq_len), generator=generator)
        excluded = torch.zeros(num_items + 1, dtype=torch.bool)
        excluded[0] = True
        gc.collect()
        before_table = current_rss()
        table = torch.empty(num_items + 1, hidden)
        for start in range(0, num_items + 1, 1 << 20):  # filled in slices: no temporary copy
            table[start : start + (1 << 20)].normal_(generator=generator)
        table_bytes = table.numel() * table.element_size()
        with_table = current_rss()
        with PeakRSS() as peak:
            started = time.perf_counter()
            ranked = rank_unseen(user_vectors, table, seen, k, excluded=excluded, chunk_size=item_chunk)
            seconds = time.perf_counter() - started
        assert ranked.indices.shape == (queries, k) and bool(torch.isfinite(ranked.scores).all())
        flops = 2.0 * queries * hidden * (num_items + 1)
        rows.append(
            {
                "items": num_items,
                "queries": queries,
                "table_gib": round(table_bytes / harness.GIB, 3),
                "rss_before_table_gib": round(before_table / harness.GIB, 3),
                "rss_with_table_gib": round(with_table / harness.GIB, 3),
                "peak_growth_mib": round((peak.peak - with_table) / 2**20, 1),
                "seconds": round(seconds, 3),
                "gflop_s": round(flops / seconds / 1e9, 1),
            }
        )
        del table, ranked
    return rows


# --------------------------------------------------------------------------------------------
def share_speedup(rows: list[dict]) -> None:
    """A row that measured 1 vs 2 actors keeps its own figures; the others show those of the largest
    user count that measured them (each row says where its figures were measured)."""
    measured = [r for r in rows if r.get("one_actor_wall_s")]
    source = max(measured, key=lambda r: r["users"]) if measured else None
    for row in rows:
        if row.get("one_actor_wall_s"):
            row["actor_speedup_measured_at_users"] = row["users"]
        else:
            row["actor_speedup_measured_at_users"] = source["users"] if source else None
            row["actor_speedup"] = source["actor_speedup"] if source else None
            row["actor_speedup_steady"] = source["actor_speedup_steady"] if source else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--users", type=int, nargs="+", default=[100_000], help="user counts to score (default 100000)"
    )
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size (default 100000)")
    parser.add_argument(
        "--seq-len", type=int, default=50, help="events per user = model max_len (default 50)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (default 1)")
    parser.add_argument(
        "--actors", type=int, default=2, help="scoring actors, one torch thread each (default 2)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="users per Ray Data batch (default 1024)"
    )
    parser.add_argument(
        "--item-chunk", type=int, default=16384, help="ScoreConfig.item_chunk (default 16384)"
    )
    parser.add_argument(
        "--speedup-users",
        type=int,
        default=None,
        help="at this user count also run 1 actor, for actor_speedup (default: the smallest --users; "
        "0 to skip)",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="storage root: a local folder or s3://bucket/prefix "
        "(default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument(
        "--items-sweep",
        action="store_true",
        help="only measure rank_unseen's memory against large catalogues (no Ray)",
    )
    parser.add_argument(
        "--sweep-items",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000, 10_000_000],
        help="catalogue sizes for --items-sweep (default 100000 1000000 10000000)",
    )
    parser.add_argument(
        "--sweep-queries", type=int, default=256, help="query rows for --items-sweep (default 256)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other user counts already in the JSON file (replace same users)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny version that runs in seconds (for tests)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/scoring.json, "
        "scoring-items.json for --items-sweep, scoring-smoke.json for --smoke)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.users, args.items, args.seq_len, args.hidden = [3000], 5000, 20, 32
        args.sweep_items, args.sweep_queries = [20_000, 200_000], 64
    if args.speedup_users is None:
        args.speedup_users = min(args.users)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    name = "scoring" + ("-items" if args.items_sweep else "") + ("-smoke" if args.smoke else "")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "root")}

    if args.items_sweep:
        rows = items_sweep(args.sweep_items, args.hidden, args.sweep_queries, args.seq_len, args.item_chunk)
        print(
            harness.table(
                rows, ["items", "table_gib", "rss_with_table_gib", "peak_growth_mib", "seconds", "gflop_s"]
            )
        )
        path = harness.write_results(name, {"settings": settings, "rows": rows}, args.out)
        print(f"wrote {path}")
        return 0

    from seqrec.storage import Storage

    root = args.root or tempfile.mkdtemp(prefix="seqrec-bench-scoring-")
    storage = Storage(root)
    storage.ensure_bucket()
    flops = flops_per_user(args.items, args.seq_len, args.hidden, args.layers)
    rows = []
    try:
        version = write_model(storage, args.items, args.seq_len, args.hidden, args.layers, args.heads)
        for i, users in enumerate(args.users):
            date = f"2030-01-{i + 1:02d}"
            row = measure_users(storage, version, users, date, args, flops, seed=i)
            rows.append(row)
            print(harness.table([row], list(row)[:9]), file=sys.stderr, flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out) if args.out else harness.RESULTS / f"{name}.json"
    if args.merge and out.exists():
        measured = {r["users"] for r in rows}
        rows = sorted(
            [r for r in json.loads(out.read_text())["rows"] if r["users"] not in measured] + rows,
            key=lambda r: r["users"],
        )
        settings["users"] = [r["users"] for r in rows]
    share_speedup(rows)
    print(
        harness.table(
            rows,
            [
                "users",
                "wall_s",
                "users_per_s",
                "peak_mem_gib",
                "peak_object_store_gib",
                "achieved_gflop_s",
                "peak_gflop_s",
                "roofline_ratio",
                "actor_speedup",
                "actor_speedup_steady",
            ],
        )
    )
    path = harness.write_results(
        name,
        {
            "settings": settings,
            "flops_per_user": flops,
            "flops_formula": flops_per_user.__doc__.strip(),
            "rows": rows,
        },
        out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
