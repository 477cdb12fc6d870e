"""The embedded default dataset: deterministic synthetic behaviour events.

Items are arranged in hidden *chains* inside categories: after item ``i`` a user most often goes on
to ``successor[i]``. Popularity is Zipf-skewed but independent of the chains, so a popularity model
ranks the next item poorly while a sequence model can learn the transitions. Every item has a text
title naming its category and its chain neighbourhood, so text-aware models have something to use.

The generator writes ``events/dt=YYYY-MM-DD/part-00000.parquet`` for each day and
``items/items.parquet``, and can plant a known number of bad rows of every kind so that the
quarantine path is exercised by the quick start too.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from seqrec.storage import Storage

log = logging.getLogger("seqrec.synthetic")

EVENT_TYPES = ("view", "click", "cart", "purchase")
_EVENT_P = (0.6, 0.25, 0.1, 0.05)
_CATEGORIES = ("books", "music", "garden", "kitchen", "toys", "sports", "beauty", "games")
_WORDS = ("red", "blue", "tiny", "grand", "classic", "smart", "eco", "pro", "urban", "wild", "soft", "bold")


@dataclass
class SyntheticSpec:
    num_users: int = 2000
    num_items: int = 400
    mean_events: int = 30  # per user, over all days
    days: int = 7
    end_date: str = "2024-01-07"  # last day generated
    follow_prob: float = 0.8  # probability of stepping to the chain successor
    bad_rows: int = 40  # planted bad rows (null ids, bad ts, unknown types, duplicates)
    seed: int = 7


def _successors(rng: np.random.Generator, num_items: int) -> np.ndarray:
    """A random cyclic chain through the items of each category."""
    succ = np.empty(num_items, dtype=np.int64)
    category = np.arange(num_items) % len(_CATEGORIES)
    for c in range(len(_CATEGORIES)):
        members = rng.permutation(np.flatnonzero(category == c))
        succ[members] = np.roll(members, -1)
    return succ


def item_titles(num_items: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    words = rng.choice(len(_WORDS), size=(num_items, 2))
    return [
        f"{_WORDS[a]} {_WORDS[b]} {_CATEGORIES[i % len(_CATEGORIES)]} item {i}"
        for i, (a, b) in enumerate(words)
    ]


def generate_events(spec: SyntheticSpec) -> tuple[pa.Table, pa.Table]:
    """Return (events, items) tables; events carry a ``dt`` column for partitioning."""
    rng = np.random.default_rng(spec.seed)
    succ = _successors(rng, spec.num_items)
    popularity = 1.0 / np.arange(1, spec.num_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    end = dt.datetime.fromisoformat(spec.end_date).replace(tzinfo=dt.UTC)
    start_s = int((end - dt.timedelta(days=spec.days - 1)).timestamp())
    span_s = spec.days * 86400 - 1

    users, items, stamps = [], [], []
    lengths = np.clip(rng.poisson(spec.mean_events, spec.num_users), 5, None)
    for u, n in enumerate(lengths):
        seen: set[int] = set()
        current = int(rng.choice(spec.num_items, p=popularity))
        seq = []
        while len(seq) < n:
            if current not in seen:
                seq.append(current)
                seen.add(current)
            if rng.random() < spec.follow_prob:
                current = int(succ[current])
            else:
                current = int(rng.choice(spec.num_items, p=popularity))
            if len(seen) >= spec.num_items - 1:
                break
        ts = np.sort(start_s + rng.choice(span_s, size=len(seq), replace=False))
        users.append(np.full(len(seq), u))
        items.append(np.asarray(seq))
        stamps.append(ts)

    user = np.concatenate(users)
    item = np.concatenate(items)
    ts = np.concatenate(stamps)
    event_type = rng.choice(len(EVENT_TYPES), size=len(user), p=_EVENT_P)
    events = pa.table(
        {
            "user_id": pa.array(user + 1, pa.int64()),
            "item_id": pa.array(item + 1, pa.int64()),
            "ts": pa.array(ts * 1_000_000, pa.timestamp("us", tz="UTC")),
            "event_type": pa.array([EVENT_TYPES[e] for e in event_type], pa.string()),
            "page": pa.array(rng.integers(0, 5, len(user)), pa.int32()),  # an extra column: ignored
        }
    )
    events = _plant_bad_rows(events, rng, spec.bad_rows, start_s)
    titles = item_titles(spec.num_items, spec.seed)
    items_table = pa.table(
        {
            "item_id": pa.array(np.arange(1, spec.num_items + 1), pa.int64()),
            "text": pa.array(titles, pa.string()),
            "available": pa.array(np.ones(spec.num_items, dtype=bool)),
        }
    )
    return events, items_table


def _plant_bad_rows(events: pa.Table, rng: np.random.Generator, count: int, start_s: int) -> pa.Table:
    """Append rows that prepare must quarantine (or drop as duplicates), a few of each kind."""
    if count <= 0:
        return events
    per_kind = max(1, count // 5)
    picks = rng.choice(events.num_rows, size=per_kind * 5, replace=False)
    bad = events.take(pa.array(picks)).to_pylist()
    for i, row in enumerate(bad):
        kind = i // per_kind
        if kind == 0:
            row["user_id"] = None
        elif kind == 1:
            row["item_id"] = None
        elif kind == 2:
            row["ts"] = dt.datetime(1970, 1, 2, tzinfo=dt.UTC)  # absurd: before min_ts
        elif kind == 3:
            row["event_type"] = "hover"  # not a configured type
        # kind 4: an exact duplicate of an existing event
    return pa.concat_tables([events, pa.Table.from_pylist(bad, schema=events.schema)])


def write_synthetic(storage: Storage, spec: SyntheticSpec | None = None) -> dict[str, int]:
    """Write the dataset under ``storage`` (events by day, item catalogue); returns counts."""
    spec = spec or SyntheticSpec()
    events, items = generate_events(spec)
    end = dt.date.fromisoformat(spec.end_date)
    start_s = int(dt.datetime.combine(end - dt.timedelta(days=spec.days - 1), dt.time(), dt.UTC).timestamp())
    ts_s = events["ts"].cast(pa.int64()).to_numpy(zero_copy_only=False) // 1_000_000
    # Bad timestamps fall outside the window: they are filed with the first day, as late data would be.
    day = np.clip((ts_s - start_s) // 86400, 0, spec.days - 1)
    for d in range(spec.days):
        date = (end - dt.timedelta(days=spec.days - 1 - d)).isoformat()
        storage.delete_dir("events", f"dt={date}")
        part = events.filter(pa.array(day == d))
        storage.write_table(part, "events", f"dt={date}", "part-00000.parquet")
    storage.write_table(items, "items", "items.parquet")
    log.info(
        "synthetic data: %d events (%d planted bad rows) over %d days, %d items -> %s",
        events.num_rows,
        spec.bad_rows,
        spec.days,
        items.num_rows,
        storage.uri("events"),
    )
    return {"events": events.num_rows, "items": items.num_rows, "days": spec.days}
