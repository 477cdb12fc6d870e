"""Benchmark whole nights: a cold night, then a warm-start night on the next day's events.

For each ``--users`` N it writes ``--events-per-user`` x N synthetic events over ``--days`` days as
``events/dt=.../part-NNNNN.parquet`` (vectorised numpy: seconds for 30M events), then runs the real
nightly job (:func:`seqrec.nightly.run_nightly`: prepare -> train -> evaluate -> promote -> score)
for the second-to-last day (a cold night: prepare in full mode, training from scratch) and for the
last day (a warm night: incremental prepare, fine-tuning the promoted model). It prints, per stage
of each night, the wall seconds, the driver's peak RSS and the peak memory of all local Ray
processes together (``harness.ProcessTreeMemory``: driver, GCS, raylet, workers, object store).

The events have the shape of real logs and something to learn:

* activity: on every day a ``--daily-active`` share of the users is active, and every user has one
  further active day among the history days, so each user has a history by the cold night; an
  active user-day is a session of ``1 + Poisson`` events;
* structure: items form hidden chains (as :mod:`seqrec.synthetic` plants them): within a session
  the next item is the current one's chain successor with probability ``--follow``, otherwise a
  Zipf-popular item, so a sequence model beats popularity.

Training gets a fixed small budget (``--max-steps`` where the train stage has ``train.max_steps``,
else one epoch), so that the nights' costs are comparable from run to run. Equal budgets need not
give equal quality (the warm night's model has seen the cold night's data too), so
``--retrain-epochs N`` also trains from scratch on the warm night's sequences for up to N epochs
and reports when that retrain reaches the warm candidate's validation NDCG@10 (within one standard
error) and at what cost: the warm night against a full retrain of equal quality.

Examples::

    python benchmarks/nightly.py --users 100000 --items 100000 --events-per-user 30
    python benchmarks/nightly.py --users 1000000 --items 100000 --events-per-user 30 --merge
    python benchmarks/nightly.py --users 100000 --items 100000 --events-per-user 30 --retrain-epochs 4
    python benchmarks/nightly.py --prepare-only --users 1000000 --items 100000 --events-per-user 30
    python benchmarks/nightly.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import psutil

log = logging.getLogger("benchmarks.nightly")

EVENT_TYPES = ("view", "click", "cart", "purchase")
EVENT_P = (0.6, 0.25, 0.1, 0.05)
ROWS_PER_FILE = 1_000_000  # events per Parquet file: one prepare task each
END_DATE = "2030-03-07"
GIB = 1 << 30


# --------------------------------------------------------------------------------------------
# Synthetic events, vectorised
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EventSpec:
    users: int
    items: int
    events_per_user: float
    days: int = 7
    daily_active: float = 0.15
    follow: float = 0.8
    end_date: str = END_DATE
    seed: int = 0

    def dates(self) -> list[str]:
        end = dt.date.fromisoformat(self.end_date)
        return [(end - dt.timedelta(days=self.days - 1 - d)).isoformat() for d in range(self.days)]


def chains(rng: np.random.Generator, items: int) -> np.ndarray:
    """(items,) successor of each item: random cycles through the items of 8 categories."""
    succ = np.empty(items, dtype=np.int64)
    category = np.arange(items) % 8
    for c in range(8):
        members = rng.permutation(np.flatnonzero(category == c))
        succ[members] = np.roll(members, -1)
    return succ


def sessions_of_day(spec: EventSpec, day: int, rng: np.random.Generator) -> np.ndarray:
    """Users active on ``day`` (0-based): a ``daily_active`` share, plus each user's extra history day."""
    active = rng.random(spec.users) < spec.daily_active
    if day < spec.days - 1:  # the history days: everyone has one, so the cold night knows every user
        extra_day = np.random.default_rng([spec.seed, 991]).integers(0, spec.days - 1, spec.users)
        active |= extra_day == day
    return np.flatnonzero(active).astype(np.int64)


def session_mean(spec: EventSpec) -> float:
    """Events per active user-day so that a user has ``events_per_user`` events over all days."""
    user_days = spec.days * spec.daily_active + (1.0 if spec.days > 1 else 0.0)
    return max(spec.events_per_user / user_days, 1.0)


def day_events(spec: EventSpec, day: int, succ: np.ndarray, cdf: np.ndarray) -> dict[str, np.ndarray]:
    """The events of one day as columns, sessions of consecutive events along the item chains."""
    rng = np.random.default_rng([spec.seed, day])
    users = sessions_of_day(spec, day, rng)
    lengths = 1 + rng.poisson(session_mean(spec) - 1, len(users))
    total = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = np.arange(total) - np.repeat(starts, lengths)
    # Walk all sessions at once, one step per position: follow the chain or jump to a popular item.
    # Sessions longest first, so that those still going at a step are a prefix.
    order = np.argsort(-lengths, kind="stable")
    live_at = np.sort(lengths)[::-1]
    first = starts[order]
    items = np.empty(total, dtype=np.int64)
    current = np.minimum(np.searchsorted(cdf, rng.random(len(users))), spec.items - 1)
    for step in range(int(lengths.max(initial=0))):
        n = int(np.searchsorted(-live_at, -step, side="left"))  # sessions longer than ``step``
        current = current[:n]
        items[first[:n] + step] = current
        jump = rng.random(n) >= spec.follow
        current = succ[current]
        current[jump] = np.minimum(np.searchsorted(cdf, rng.random(int(jump.sum()))), spec.items - 1)
    day_start = int(dt.datetime.fromisoformat(spec.dates()[day]).replace(tzinfo=dt.UTC).timestamp())
    session_start = rng.integers(0, 86_400 - 3_600, len(users))
    ts = day_start + np.repeat(session_start, lengths) + position * 30
    return {
        "user_id": np.repeat(users + 1, lengths),
        "item_id": items + 1,
        "ts": ts * 1_000_000,
        "event_type": rng.choice(len(EVENT_TYPES), total, p=EVENT_P),
    }


def write_events(root: str, spec: EventSpec) -> dict[str, int]:
    """``events/dt=.../part-NNNNN.parquet`` for every day; returns events per day."""
    import pyarrow as pa

    from seqrec.storage import Storage

    storage = Storage(root)
    rng = np.random.default_rng(spec.seed)
    succ = chains(rng, spec.items)
    weights = 1.0 / np.arange(1, spec.items + 1) ** 0.8
    cdf = np.cumsum(rng.permutation(weights / weights.sum()))
    types = pa.array(EVENT_TYPES, pa.string())
    counts = {}
    for day, date in enumerate(spec.dates()):
        columns = _sorted_sessions(day_events(spec, day, succ, cdf))
        n = len(columns["user_id"])
        storage.delete_dir("events", f"dt={date}")
        for part, first in enumerate(range(0, n, ROWS_PER_FILE)):
            s = slice(first, first + ROWS_PER_FILE)
            table = pa.table(
                {
                    "user_id": pa.array(columns["user_id"][s]),
                    "item_id": pa.array(columns["item_id"][s]),
                    "ts": pa.array(columns["ts"][s], pa.timestamp("us", tz="UTC")),
                    "event_type": types.take(pa.array(columns["event_type"][s])),
                }
            )
            storage.write_table(table, "events", f"dt={date}", f"part-{part:05d}.parquet")
        counts[date] = n
    return counts


def _sorted_sessions(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in time order, as a log is written."""
    order = np.argsort(columns["ts"], kind="stable")
    return {k: v[order] for k, v in columns.items()}


# --------------------------------------------------------------------------------------------
# Memory per stage
# --------------------------------------------------------------------------------------------
class StageMemory(logging.Handler):
    """Peak memory per stage of a night: the job logs ``== <stage> ==`` as each stage begins
    (``seqrec.runtime.timed``, or the nightly module's own timer), and this handler closes the
    previous stage's peaks there."""

    def __init__(self, interval_s: float = 0.25):
        super().__init__(level=logging.INFO)
        self.tree = harness.ProcessTreeMemory(interval_s=interval_s)
        self.driver = psutil.Process()
        self.stage: str | None = None
        self.peaks: dict[str, dict[str, float]] = {}
        self._driver_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "== %s ==" and record.args:
            self.switch(str(record.args[0]))

    def switch(self, stage: str | None) -> None:
        with self._lock:
            if self.stage is not None:
                self.tree.sample(with_pss=True)
                self.peaks[self.stage] = {
                    "driver_peak_rss_gib": round(self._driver_peak / GIB, 3),
                    "peak_mem_gib": round(self.tree.peak_mem / GIB, 3),
                    # who held it: private + file PSS per process role at that peak, and the store
                    "peak_mem_gib_by_process": {
                        role: round(held / GIB, 3)
                        for role, held in sorted(self.tree.peak_by_process.items(), key=lambda kv: -kv[1])
                        if held >= GIB / 20
                    },
                }
                print(f"peak of {self.stage}: {self.peaks[self.stage]}", file=sys.stderr, flush=True)
            self.stage = stage
            self.tree.peak_mem = 0
            self.tree.peak_by_process = {}
            self._driver_peak = self.driver.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                self._driver_peak = max(self._driver_peak, self.driver.memory_info().rss)

    def __enter__(self) -> StageMemory:
        logging.getLogger("seqrec").addHandler(self)
        logging.getLogger("seqrec").setLevel(logging.INFO)
        self.tree.__enter__()
        self._thread = threading.Thread(target=self._run, name="driver-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.switch(None)
        self._stop.set()
        self._thread.join()
        self.tree.__exit__(*exc)
        logging.getLogger("seqrec").removeHandler(self)


# --------------------------------------------------------------------------------------------
# The nights
# --------------------------------------------------------------------------------------------
def night_config(args, users: int):
    from seqrec.config import TrainConfig, load_config

    overrides = [
        f"prepare.max_len={args.max_len}",
        f"model.max_len={args.max_len}",
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        "model.dropout=0.2",
        "train.loss=sampled",
        f"train.num_negatives={args.negatives}",
        f"train.batch_size={args.batch_size}",
        "train.patience=1",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.torch_threads=1",
        "eval.promote_tolerance=1.0",  # the warm night is always scored by its candidate
        f"score.num_actors={args.actors}",
        "score.cpus_per_actor=0.5",
        f"prepare.buckets={args.buckets}",
    ]
    if args.replay_ratio is not None:
        overrides.append(f"train.replay_ratio={args.replay_ratio}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "max_steps" in fields and args.max_steps:
        overrides += [f"train.max_steps={args.max_steps}", "train.epochs=1000"]
    else:
        overrides += [f"train.epochs={args.epochs}"]
    return load_config(None, overrides)


def run_night(storage, date: str, config) -> dict[str, Any]:
    from seqrec.nightly import run_nightly

    gc.collect()
    with StageMemory() as memory:
        result = run_nightly(storage, date, config)
    stages = {
        stage: {"wall_s": result.timings_s.get(stage), **memory.peaks.get(stage, {})}
        for stage in result.timings_s
    }
    return {
        "date": date,
        "stages": stages,
        "val_ndcg@10": result.metrics["val"]["model"]["ndcg@10"],
        "val_ndcg@10_stderr": result.metrics["val"]["stderr"]["model"]["ndcg@10"],
        "val_popularity_ndcg@10": result.metrics["val"]["popularity"]["ndcg@10"],
        "prepare": result.prepare.as_dict(),
        "promoted": result.promoted,
        "recommendations": result.recommendations.rows,
    }


def full_retrain(storage, date: str, config, epochs: int, warm: dict[str, Any]) -> dict[str, Any]:
    """The warm candidate's reference: training from scratch on the warm night's sequences.

    Up to ``epochs`` epochs (no early stop), validated after each on the users the warm night's gate
    judged (the same nested hash sample: its size is the gate's with the live model compared). The
    retrain reaches the warm candidate's quality at the first epoch whose validation NDCG@10 is at
    least the warm candidate's minus one standard error; its cost then is the run's wall less the
    later epochs. A retrain that never gets there gives ``to_quality_s`` None.
    """
    from seqrec.evaluate import Judged, gate_sample_size, night_users, rankings_per_user
    from seqrec.training import train

    judged = [Judged("candidate", "retrain"), Judged("live", "parent", splits=("val",))]
    users = night_users(storage, date)
    train_config = dataclasses.replace(
        config.train, warm_start=False, epochs=epochs, patience=epochs, max_steps=0
    )
    gc.collect()
    result = train(
        storage,
        date,
        model_config=config.model,
        train_config=train_config,
        prepare_config=config.prepare,
        run_name=f"retrain-{date}",
        ks=config.eval.ks,
        validation_users=gate_sample_size(config.eval, users, rankings_per_user(judged)),
    )
    val = [round(h["val_ndcg@10"], 4) for h in result.history]
    epoch_s = [round(h["epoch_s"], 2) for h in result.history]
    target = warm["val_ndcg@10"] - warm["val_ndcg@10_stderr"]
    reached = next((i for i, v in enumerate(val) if v >= target), None)
    to_quality_s = None if reached is None else round(result.wall_s - sum(epoch_s[reached + 1 :]), 2)
    return {
        "date": date,
        "wall_s": round(result.wall_s, 2),
        "val_ndcg@10_by_epoch": val,
        "epoch_s": epoch_s,
        "target_val_ndcg@10": round(target, 4),
        "epochs_to_quality": None if reached is None else reached + 1,
        "to_quality_s": to_quality_s,
    }


def measure(args, users: int) -> dict[str, Any]:
    import ray

    from seqrec.runtime import init_ray
    from seqrec.storage import Storage
    from seqrec.training.driver import worker_env_vars

    spec = EventSpec(
        users=users,
        items=args.items,
        events_per_user=args.events_per_user,
        days=args.days,
        daily_active=args.daily_active,
        seed=args.seed,
    )
    root = args.root or tempfile.mkdtemp(prefix="seqrec-bench-nightly-")
    started = time.perf_counter()
    # In a forked child: the driver, whose memory is measured, keeps no trace of the generation.
    from scoring import in_child_process

    per_day = in_child_process(write_events, root, spec)
    generate_s = round(time.perf_counter() - started, 1)
    print(
        f"{users:,} users: {sum(per_day.values()):,} events over {spec.days} days in {generate_s} s "
        f"({per_day[spec.dates()[-1]]:,} on the last day)",
        file=sys.stderr,
        flush=True,
    )
    storage = Storage(root)
    started_ray = not ray.is_initialized()
    for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s raylet start-up wait
        try:
            init_ray()
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for it
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(10)
    try:
        config = night_config(args, users)
        cold_date, warm_date = spec.dates()[-2], spec.dates()[-1]
        if args.prepare_only:
            return prepare_only(storage, spec, config, per_day, generate_s)
        cold = run_night(storage, cold_date, config)
        warm = run_night(storage, warm_date, config)
        retrain = (
            full_retrain(storage, warm_date, config, args.retrain_epochs, warm)
            if args.retrain_epochs
            else None
        )
    finally:
        if started_ray:
            ray.shutdown()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    stages = warm["stages"]
    return {
        "users": users,
        "items": args.items,
        "events": sum(per_day.values()),
        "events_last_day": per_day[warm_date],
        "users_with_sequences": warm["prepare"]["users"],
        "stage_s": {s: v["wall_s"] for s, v in stages.items()},
        "driver_peak_rss_gib": max(
            v.get("driver_peak_rss_gib", 0) for n in (cold, warm) for v in n["stages"].values()
        ),
        "peak_mem_gib": max(v.get("peak_mem_gib", 0) for n in (cold, warm) for v in n["stages"].values()),
        "cold_train_s": cold["stages"]["train"]["wall_s"],
        "warm_train_s": stages["train"]["wall_s"],
        "cold_val_ndcg@10": round(cold["val_ndcg@10"], 4),
        "warm_val_ndcg@10": round(warm["val_ndcg@10"], 4),
        "cold_val_popularity_ndcg@10": round(cold["val_popularity_ndcg@10"], 4),
        "warm_val_ndcg@10_stderr": round(warm["val_ndcg@10_stderr"], 4),
        # Equal quality: a retrain from scratch on the warm night's data, to the warm candidate's level.
        "retrain": retrain,
        "retrain_to_quality_s": retrain and retrain["to_quality_s"],
        "generate_s": generate_s,
        # the training workers' oneDNN primitive cache (seqrec.training.driver.worker_env_vars)
        "onednn_primitive_cache_capacity": int(worker_env_vars()["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]),
        "nights": {"cold": cold, "warm": warm},
    }


def prepare_only(
    storage, spec: EventSpec, config, per_day: dict[str, int], generate_s: float
) -> dict[str, Any]:
    """The prepare stage alone: a full night, then an incremental night, each with per-task peaks."""
    from seqrec.prepare import prepare

    nights = {}
    for kind, date in (("full", spec.dates()[-2]), ("incremental", spec.dates()[-1])):
        gc.collect()
        started = time.perf_counter()
        with TaskPeaks() as tasks, harness.ProcessTreeMemory() as memory:
            report = prepare(storage, date, config.prepare)
        used = memory.result()
        # CPU seconds of the stage's processes: on a shared machine a steadier measure than the wall.
        nights[kind] = {
            "wall_s": round(time.perf_counter() - started, 2),
            "mode": report.mode,
            "rows_read": report.rows_read,
            "users": report.users,
            "cpu_s": round(sum(used["cpu_s_by_process"].values()), 1),
            "cpu_s_other_processes": used["cpu_s_other_processes"],
            "peak_mem_gib": used["peak_mem_gib"],
            "driver_peak_rss_gib": round(memory.peak_driver_rss / GIB, 3),
            "max_task_rss_gib": round(tasks.peak / GIB, 3),
        }
    return {
        "users": spec.users,
        "items": spec.items,
        "events": sum(per_day.values()),
        "events_last_day": per_day[spec.dates()[-1]],
        "buckets": config.prepare.buckets,
        "generate_s": generate_s,
        "prepare": nights,
    }


class TaskPeaks:
    """The largest RSS any Ray worker process reached (a worker runs one prepare task at a time)."""

    def __init__(self, interval_s: float = 0.1):
        self.peak, self.interval_s = 0, interval_s
        self._stop = threading.Event()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            for p in me.children(recursive=True):
                try:
                    if p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()[:3]):
                        self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> TaskPeaks:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[100_000])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events-per-user", type=float, default=30)
    p.add_argument("--daily-active", type=float, default=0.15, help="share of users active on a day")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--follow", type=float, default=0.8)
    p.add_argument("--max-len", type=int, default=50, help="prepare.max_len and model.max_len")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--negatives", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=300, help="train.max_steps where the stage has it")
    p.add_argument("--epochs", type=int, default=1, help="where the train stage has no max_steps")
    p.add_argument("--actors", type=int, default=2, help="scoring actors")
    p.add_argument("--buckets", type=int, default=64, help="prepare.buckets")
    p.add_argument(
        "--replay-ratio",
        type=float,
        default=None,
        help="the warm night's train.replay_ratio (default: seqrec's)",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=0,
        help="also train from scratch on the warm night's data for up to this many epochs, to give "
        "the cost of a full retrain that reaches the warm candidate's quality (0: no retrain)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prepare-only", action="store_true", help="the prepare stage alone, full then incremental"
    )
    p.add_argument("--root", default=None, help="storage root to keep (default: a temporary directory)")
    p.add_argument("--merge", action="store_true", help="keep other user counts' rows of the results file")
    p.add_argument("--smoke", action="store_true", help="tiny and quick: for tests")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.users, args.items, args.events_per_user = [400], 60, 12
        args.max_len, args.hidden, args.negatives, args.batch_size = 20, 16, 16, 64
        args.max_steps, args.epochs, args.actors, args.buckets = 20, 1, 1, 8
        args.retrain_epochs = 1
    return args


COLUMNS = ["night", "stage", "wall_s", "driver_peak_rss_gib", "peak_mem_gib"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    name = "nightly" + ("-prepare" if args.prepare_only else "") + ("-smoke" if args.smoke else "")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "root", "merge")}
    rows = []
    for users in args.users:
        row = measure(args, users)
        rows.append(row)
        if args.prepare_only:
            print(
                harness.table(
                    [{"users": users, "night": k, **v} for k, v in row["prepare"].items()],
                    [
                        "users",
                        "night",
                        "wall_s",
                        "rows_read",
                        "driver_peak_rss_gib",
                        "peak_mem_gib",
                        "max_task_rss_gib",
                    ],
                )
            )
            continue
        print(f"\n{users:,} users, {row['events']:,} events ({row['events_last_day']:,} on the warm night)")
        nights = row["nights"].items()
        print(
            harness.table(
                [
                    {"night": night, "stage": stage, **values}
                    for night, data in nights
                    for stage, values in data["stages"].items()
                ],
                COLUMNS,
            )
        )
        print(
            f"val NDCG@10: cold {row['cold_val_ndcg@10']}, warm {row['warm_val_ndcg@10']} "
            f"± {row['warm_val_ndcg@10_stderr']} (popularity {row['cold_val_popularity_ndcg@10']})"
        )
        print(f"train s: cold night {row['cold_train_s']}, warm night {row['warm_train_s']}")
        if row["retrain"]:
            r = row["retrain"]
            print(
                f"retrain from scratch on the warm night's data: val NDCG@10 by epoch "
                f"{r['val_ndcg@10_by_epoch']} (epochs {r['epoch_s']} s, {r['wall_s']} s in all); "
                f"the warm candidate's level ({r['target_val_ndcg@10']}) after "
                f"{r['epochs_to_quality']} epoch(s), {r['to_quality_s']} s"
            )
    out = Path(args.out) if args.out else harness.RESULTS / f"{name}.json"
    if args.merge and out.exists():
        measured = {r["users"] for r in rows}
        rows = sorted(
            [r for r in json.loads(out.read_text())["rows"] if r["users"] not in measured] + rows,
            key=lambda r: r["users"],
        )
    path = harness.write_results(name, {"settings": settings, "cpu": harness.cpu(), "rows": rows}, out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
