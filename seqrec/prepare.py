"""Stage 1: behaviour events -> per-user sequences, bad rows to quarantine, as Ray tasks.

For one date ``D`` the stage reads the events of ``events/dt=D`` (incremental mode, extending the
sequences of ``D-1``) or of every day up to ``D`` (full mode), and writes:

* ``sequences/dt=D/part-bNNNNN.parquet``  one file per user bucket, one row per user: ``user_id``,
  ``item_ids``, ``event_types``, ``ts`` (lists, oldest first, the newest ``max_len`` events);
* ``quarantine/dt=D/part-NNNNN.parquet``  every rejected row, its columns rendered as strings, plus
  ``reason``; with ``prepare.bad_files=quarantine``, unreadable files under ``_files/``.

Users are hashed into ``prepare.buckets`` buckets (:func:`bucket_of`). Phase 1, one task per chunk
of an events file: validate, split the rejected rows off, stage the clean rows bucket by bucket.
Phase 2, one task per bucket: that bucket's sequences of ``D-1`` plus its staged events -> dedupe,
stable time order, truncation -> the bucket's file. So a night costs what its new events and their
users' histories cost, and no task holds more than a bucket. The driver holds file lists, schemas
and counts only. Yesterday's sequences in another layout (unbucketed, another bucket count) are
exploded and re-bucketed in phase 1 too.

Nothing valid is lost silently: the returned :class:`PrepareReport`, summed over the tasks,
satisfies ``rows_read == rows_kept + rows_quarantined + duplicates_dropped`` and the stage refuses
to finish otherwise (outputs are staged and moved into place only after the check). All work is
columnar (pyarrow compute); no row is touched from Python.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from seqrec.config import PrepareConfig, check_choices
from seqrec.errors import InputError
from seqrec.storage import ROW_GROUP_ROWS, Storage, retry

log = logging.getLogger("seqrec.prepare")

REQUIRED = ("user_id", "item_id", "ts")
TS_TYPE = pa.timestamp("us", tz="UTC")
ROWS_PER_FILE = 200_000


@dataclass
class PrepareReport:
    date: str
    rows_read: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    duplicates_dropped: int = 0
    events_truncated: int = 0
    users: int = 0
    items: int = 0
    new_users: int = 0
    new_items: int = 0
    files_read: int = 0
    files_quarantined: int = 0  # unreadable files moved aside (prepare.bad_files=quarantine)
    mode: str = "full"
    buckets: int = 0
    nodes: int = 0  # Ray nodes the stage's tasks ran on
    layout: str = ""  # how sequences/dt=D is split into files (LAYOUT)

    def reconciles(self) -> bool:
        return self.rows_read == self.rows_kept + self.rows_quarantined + self.duplicates_dropped

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Reading and validating events
# --------------------------------------------------------------------------------------------
def event_dates(storage: Storage) -> list[str]:
    return [d.removeprefix("dt=") for d in storage.list_dirs("events") if d.startswith("dt=")]


def _id_type(field: pa.Field, path: str) -> pa.DataType:
    t = field.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string()
    raise InputError(
        f"{path}: column {field.name!r} has type {field.type}; seqrec needs int64 or string ids. "
        f"Cast it before writing (floats usually mean a null slipped in upstream)."
    )


def _check_schema(schema: pa.Schema, path: str) -> None:
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise InputError(
            f"{path}: missing required column(s) {missing}; found {schema.names}. "
            f"Events need user_id, item_id, ts (timestamp or epoch seconds) and optionally event_type."
        )
    for name in ("user_id", "item_id"):
        _id_type(schema.field(name), path)
    ts = schema.field("ts").type
    if not (
        pa.types.is_timestamp(ts)
        or pa.types.is_integer(ts)
        or pa.types.is_floating(ts)
        or pa.types.is_string(ts)
        or pa.types.is_large_string(ts)
        or pa.types.is_date(ts)
    ):
        raise InputError(
            f"{path}: column 'ts' has type {ts}; use a timestamp, int64 epoch seconds or ISO-8601 text."
        )
    if "event_type" in schema.names:
        et = schema.field("event_type").type
        if pa.types.is_dictionary(et):
            et = et.value_type
        if not (pa.types.is_string(et) or pa.types.is_large_string(et)):
            raise InputError(f"{path}: column 'event_type' has type {et}; it must be text (e.g. 'view').")


def _parse_ts(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any accepted ts representation -> timestamp[us, UTC]; unparseable values -> null."""
    t = col.type
    if pa.types.is_timestamp(t):
        # Via the raw epoch values (UTC; a naive timestamp is read as UTC): a plain cast would fail
        # the whole file on one nanosecond remainder or one value that overflows microseconds.
        raw = col.cast(pa.int64())
        if t.unit == "ns":
            return pc.divide(raw, 1000).cast(TS_TYPE)
        per_unit = {"s": 1_000_000, "ms": 1_000, "us": 1}[t.unit]
        in_range = pc.less(pc.abs(raw), 9_000_000_000_000_000_000 // per_unit)
        return pc.multiply(pc.if_else(in_range, raw, None), per_unit).cast(TS_TYPE)
    if pa.types.is_date(t):
        return col.cast(pa.timestamp("s")).cast(pa.timestamp("s", tz="UTC")).cast(TS_TYPE)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        micros = pc.multiply(col.cast(pa.float64(), safe=False), 1e6)  # huge values: caught just below
        finite = pc.and_(pc.is_finite(micros), pc.less(pc.abs(micros), 9e18))
        micros = pc.if_else(finite, micros, None)
        return pc.round(micros).cast(pa.int64()).cast(TS_TYPE)
    # Text: ISO-8601 with or without zone. strptime has no %f, so a fraction of a second
    # ("...T10:00:00.123Z", as JavaScript writes it) is cut out first and added back after parsing.
    text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    parts = pc.extract_regex(
        text, r"^(?P<head>.*\d:\d\d)[.,](?P<fraction>\d{1,9})(?P<tail>(?:Z|[+-]\d\d:?\d\d)?)$"
    )
    head, digits, tail = (pc.struct_field(parts, name) for name in ("head", "fraction", "tail"))
    text = pc.coalesce(pc.binary_join_element_wise(head, tail, ""), text)
    fraction = pc.utf8_slice_codeunits(pc.utf8_rpad(pc.coalesce(digits, "0"), 6, "0"), 0, 6)  # microseconds
    parsed = None
    for fmt in (
        "%Y-%m-%dT%H:%M:%S%z",
        "%Y-%m-%d %H:%M:%S%z",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d",
    ):
        attempt = pc.strptime(text, format=fmt, unit="us", error_is_null=True)
        attempt = attempt.cast(pa.timestamp("us")) if attempt.type.tz is None else attempt
        attempt = pc.assume_timezone(attempt, "UTC") if attempt.type.tz is None else attempt.cast(TS_TYPE)
        parsed = attempt if parsed is None else pc.coalesce(parsed, attempt)
    return pc.add(parsed.cast(TS_TYPE), fraction.cast(pa.int64()).cast(pa.duration("us")))


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string())


def _first_reason(conditions: list[tuple[pa.ChunkedArray, str]], n: int) -> pa.Array:
    """The first failing rule of each row as text (null where the row is valid)."""
    reason = pa.nulls(n, pa.string())
    for failed, text in reversed(conditions):  # earlier rules win
        reason = pc.if_else(pc.fill_null(failed, True), pa.scalar(text), reason)
    return reason


def validate(
    table: pa.Table, config: PrepareConfig, date: str, id_type: pa.DataType, source: str
) -> tuple[pa.Table, pa.Table]:
    """Split one file's rows into (clean events, quarantined rows with ``reason``)."""
    n = table.num_rows
    user = _as_text(table["user_id"]) if id_type == pa.string() else table["user_id"].cast(pa.int64())
    item = _as_text(table["item_id"]) if id_type == pa.string() else table["item_id"].cast(pa.int64())
    ts = _parse_ts(table["ts"])
    if "event_type" in table.column_names:
        etype = pc.fill_null(_as_text(table["event_type"]), config.default_event_type)
    else:
        etype = pa.chunked_array([pa.array([config.default_event_type] * n, pa.string())])

    lo = pa.scalar(dt.datetime.fromisoformat(config.min_ts).replace(tzinfo=dt.UTC), TS_TYPE)
    hi_day = dt.date.fromisoformat(date) + dt.timedelta(days=1 + config.max_future_days)
    hi = pa.scalar(dt.datetime.combine(hi_day, dt.time(), dt.UTC), TS_TYPE)
    allowed = pa.array(sorted({*config.event_types, config.default_event_type}))

    def empty(col: pa.ChunkedArray) -> pa.ChunkedArray:
        if pa.types.is_string(col.type):
            return pc.or_(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
        return pc.is_null(col)

    conditions = [
        (empty(user), "user_id missing or empty"),
        (empty(item), "item_id missing or empty"),
        (pc.is_null(table["ts"]), "ts missing"),
        (pc.is_null(ts), "ts unparseable"),
        (
            pc.or_(pc.less(ts, lo), pc.greater_equal(ts, hi)),
            f"ts out of range [{config.min_ts}, {hi_day.isoformat()})",
        ),
        (pc.invert(pc.is_in(etype, value_set=allowed)), "event_type not in configured set"),
    ]
    reason = _first_reason(conditions, n)
    bad = pc.is_valid(reason)
    clean = pa.table({"user_id": user, "item_id": item, "ts": ts, "event_type": etype}).filter(pc.invert(bad))

    quarantined = table.filter(bad)
    columns = {
        name: _as_text(quarantined[name])
        if not pa.types.is_nested(quarantined[name].type)
        else pa.array([str(v) for v in quarantined[name].to_pylist()], pa.string())
        for name in quarantined.column_names
    }
    columns["reason"] = pc.filter(reason, bad)
    columns["source_file"] = pa.array([source] * quarantined.num_rows, pa.string())
    return clean, pa.table(columns)


# --------------------------------------------------------------------------------------------
# Building sequences
# --------------------------------------------------------------------------------------------
def explode(sequences: pa.Table) -> pa.Table:
    """Sequences -> one row per event (the inverse of :func:`build_sequences`)."""
    lengths = pc.list_value_length(sequences["item_ids"]).to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "user_id": pc.take(sequences["user_id"], pa.array(np.repeat(np.arange(len(lengths)), lengths))),
            "item_id": pc.list_flatten(sequences["item_ids"]),
            "ts": pc.list_flatten(sequences["ts"]).cast(TS_TYPE),
            "event_type": pc.list_flatten(sequences["event_types"]),
        }
    )


def tail_lists(values: pa.Array, offsets: np.ndarray, max_len: int) -> pa.ListArray:
    """Keep the last ``max_len`` values of each list given by ``offsets`` (vectorised)."""
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_len)
    new_offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
    starts = offsets[1:] - keep
    index = np.repeat(starts - new_offsets[:-1], keep) + np.arange(new_offsets[-1])
    return pa.ListArray.from_arrays(pa.array(new_offsets), pc.take(values, pa.array(index)))


def build_sequences(events: pa.Table, max_len: int) -> tuple[pa.Table, int]:
    """Events (any order) -> one row per user, events oldest first, the newest ``max_len`` kept.

    Ties in ``ts`` keep input order (the sort is stable), so callers feed older data first.
    Returns (sequences, events truncated away).
    """
    events = events.append_column("_row", pa.array(np.arange(events.num_rows)))
    events = events.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("_row", "ascending")])
    user = events["user_id"].combine_chunks()
    boundaries = np.flatnonzero(pc.not_equal(user[1:], user[:-1]).to_numpy(zero_copy_only=False)) + 1
    offsets = np.concatenate([[0], boundaries, [events.num_rows]]).astype(np.int64)
    users = pc.take(user, pa.array(offsets[:-1])) if events.num_rows else user
    columns = {"user_id": users}
    for name, out in (("item_id", "item_ids"), ("event_type", "event_types"), ("ts", "ts")):
        columns[out] = tail_lists(events[name].combine_chunks(), offsets, max_len)
    truncated = int(np.maximum(np.diff(offsets) - max_len, 0).sum())
    return pa.table(columns), truncated


def dedupe(events: pa.Table) -> tuple[pa.Table, int]:
    """Drop exact duplicate events (same user, item, ts, event type), keeping the first."""
    keys = ["user_id", "item_id", "ts", "event_type"]
    indexed = events.append_column("_row", pa.array(np.arange(events.num_rows)))
    first = indexed.group_by(keys, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    keep = np.sort(first.to_numpy())
    return events.take(pa.array(keep)), events.num_rows - len(keep)


# --------------------------------------------------------------------------------------------
# Buckets: users hashed so that a bucket's history is always in the same file
# --------------------------------------------------------------------------------------------
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads sequential ids evenly over buckets."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_text(values: pa.Array) -> np.ndarray:
    """FNV-1a of each string's UTF-8 bytes, vectorised over strings (one pass per byte position)."""
    values = values.cast(pa.large_string())
    offsets = np.frombuffer(values.buffers()[1], np.int64)[values.offset : values.offset + len(values) + 1]
    data = values.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(values), _FNV_OFFSET, np.uint64)
    for j in range(int(lengths.max(initial=0))):
        live = np.flatnonzero(lengths > j)
        h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
    return h


def bucket_of(user_ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The bucket (0 .. buckets-1) of each user id: the same on every machine and every day.

    Ints hash their value, strings their UTF-8 bytes; each distinct id is hashed once.
    """
    if isinstance(user_ids, pa.ChunkedArray):
        user_ids = user_ids.combine_chunks()
    encoded = user_ids.dictionary_encode()
    distinct = encoded.dictionary
    if pa.types.is_integer(distinct.type):
        h = _mix(distinct.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64))
    else:
        h = _mix(_hash_text(distinct))
    per_distinct = (h % np.uint64(buckets)).astype(np.int32)
    return per_distinct[encoded.indices.to_numpy(zero_copy_only=False)]


def split_by_bucket(table: pa.Table, buckets: int) -> Iterator[tuple[int, pa.Table]]:
    """(bucket, its rows in input order) for every non-empty bucket of ``table``."""
    of = bucket_of(table["user_id"], buckets)
    order = np.argsort(of, kind="stable")  # stable: rows keep their order within a bucket
    counts = np.bincount(of, minlength=buckets)
    table = table.take(pa.array(order))
    start = 0
    for b in np.flatnonzero(counts):
        yield int(b), table.slice(start, int(counts[b]))
        start += int(counts[b])


# --------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------
LAYOUT = "buckets-v1"  # written to _SUCCESS: tomorrow's run reads yesterday bucket by bucket


def bucket_file(bucket: int) -> str:
    return f"part-b{bucket:05d}.parquet"


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _events_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [("user_id", user_type), ("item_id", item_type), ("ts", TS_TYPE), ("event_type", pa.string())]
    )


@dataclass
class Chunk:
    """Whole row groups of one Parquet file: the unit of work of phase 1."""

    path: str
    row_groups: list[int]
    index: int  # position in input order: staged pieces sort by it


@dataclass
class StageResult:
    """What a phase-1 task read and where it staged it (no rows)."""

    path: str
    rows_read: int = 0
    rows_quarantined: int = 0
    staged: dict[int, list[str]] = field(default_factory=dict)  # bucket -> staged files
    quarantine: str | None = None
    bad: str | None = None  # why the file could not be read
    node: str = ""


def _write_buckets(
    root: str, table: pa.Table, buckets: int, folder: str, name: str, staged: dict[int, list[str]]
) -> None:
    storage = Storage(root)
    for b, rows in split_by_bucket(table, buckets):
        path = f"{folder}/b{b:05d}/{name}"
        storage.write_table(rows, path.removeprefix(storage.base + "/"))
        staged.setdefault(b, []).append(path)


def stage_events(
    root: str,
    chunk: Chunk,
    config: PrepareConfig,
    date: str,
    id_type: pa.DataType,
    schema: pa.Schema,
    staging: str,
) -> StageResult:
    """Phase 1: validate one chunk of an events file, stage its clean rows by bucket and its
    rejected rows (all columns, with ``reason``) for the quarantine."""
    storage = Storage(root)
    result = StageResult(path=chunk.path, node=_node())
    clean_parts, bad_parts = [], []
    try:
        parquet = retry(
            lambda: pq.ParquetFile(storage.filesystem.open_input_file(chunk.path)), what=f"open {chunk.path}"
        )
        columns = [c for c in (*REQUIRED, "event_type") if c in parquet.schema_arrow.names]
        for rg in chunk.row_groups:
            table = parquet.read_row_group(rg, columns=columns)
            result.rows_read += table.num_rows
            clean, bad = validate(table, config, date, id_type, chunk.path)
            clean_parts.append(clean)
            if bad.num_rows:
                # Quarantine keeps the row as it was: re-read with every column for the (rare) bad rows.
                _, bad = validate(parquet.read_row_group(rg), config, date, id_type, chunk.path)
                bad_parts.append(bad)
    except (pa.ArrowInvalid, OSError) as error:  # a corrupt page or footer: the file, not a row, is bad
        return StageResult(path=chunk.path, bad=f"unreadable Parquet ({error})", node=result.node)
    try:
        clean_parts = [c.cast(schema) for c in clean_parts]
    except pa.ArrowInvalid as error:
        raise InputError(
            f"{chunk.path}: its ids do not match yesterday's sequences "
            f"({schema.field('user_id')}, {schema.field('item_id')}): {error}"
        ) from error
    name = f"c{chunk.index:06d}.parquet"
    clean = pa.concat_tables(clean_parts) if clean_parts else schema.empty_table()
    _write_buckets(root, clean, config.buckets, f"{staging}/events", name, result.staged)
    if bad_parts:
        result.quarantine = f"{staging}/quarantine/{name}"
        bad = pa.concat_tables(bad_parts, promote_options="permissive")
        result.rows_quarantined = bad.num_rows
        storage.write_table(bad, result.quarantine.removeprefix(storage.base + "/"))
    return result


def stage_prior(
    root: str, chunk: Chunk, buckets: int, schema: pa.Schema, staging: str, users_per_batch: int
) -> StageResult:
    """Phase 1 for yesterday's sequences in another layout (unbucketed, or another bucket count):
    explode them back into events, staged by bucket in the new layout."""
    storage = Storage(root)
    result = StageResult(path=chunk.path, node=_node())
    parquet = retry(
        lambda: pq.ParquetFile(storage.filesystem.open_input_file(chunk.path)), what=f"open {chunk.path}"
    )
    for i, batch in enumerate(
        parquet.iter_batches(
            batch_size=users_per_batch,
            row_groups=chunk.row_groups,
            columns=["user_id", "item_ids", "event_types", "ts"],
        )
    ):
        events = explode(pa.Table.from_batches([batch])).cast(schema)
        result.rows_read += events.num_rows
        _write_buckets(
            root, events, buckets, f"{staging}/prior", f"c{chunk.index:06d}-{i:05d}.parquet", result.staged
        )
    return result


@dataclass
class BucketTask:
    """Phase 2: everything one bucket's merge reads, and where it writes."""

    root: str
    bucket: int
    schema: pa.Schema
    max_len: int
    prior_sequences: list[str]  # yesterday's file of this bucket (same layout)
    prior_events: list[str]  # or yesterday's events of this bucket, re-bucketed in phase 1
    events: list[str]  # today's staged clean events of this bucket, in input order
    out: str  # the bucket's sequences file (staged until the stage finishes)
    items: str  # the bucket's distinct items, flagged if yesterday had them


@dataclass
class BucketResult:
    bucket: int
    prior_events: int = 0  # events of yesterday's sequences
    rows_kept: int = 0  # today's rows kept: merged - prior
    duplicates_dropped: int = 0
    events_truncated: int = 0
    users: int = 0
    new_users: int = 0
    node: str = ""


def merge_bucket(task: BucketTask) -> BucketResult:
    """Phase 2: yesterday's sequences of one bucket + today's clean events -> that bucket's sequences.

    The rules are the single-table ones applied to the bucket: older events first (a tie in ts keeps
    yesterday's order, a re-sent old event is a duplicate), exact duplicates dropped, stable time
    order, the newest ``max_len`` kept. A module-level function, so that a test can wrap it.
    """
    storage = Storage(task.root)
    read = lambda path, columns=None: retry(  # noqa: E731
        lambda: pq.read_table(path, filesystem=storage.filesystem, columns=columns), what=f"read {path}"
    )
    prior = [explode(read(p)).cast(task.schema) for p in task.prior_sequences]
    prior += [read(p).cast(task.schema) for p in task.prior_events]
    prior_events = pa.concat_tables(prior) if prior else task.schema.empty_table()
    today = [read(p).cast(task.schema) for p in task.events]
    merged, duplicates = dedupe(pa.concat_tables([prior_events, *today]))
    sequences, truncated = build_sequences(merged, task.max_len)
    prior_users = pc.unique(prior_events["user_id"])
    new_users = int(pc.sum(pc.invert(pc.is_in(sequences["user_id"], value_set=prior_users))).as_py() or 0)
    items = pc.unique(merged["item_id"])
    storage.write_table(
        pa.table(
            {"item_id": items, "in_prior": pc.is_in(items, value_set=pc.unique(prior_events["item_id"]))}
        ),
        task.items.removeprefix(storage.base + "/"),
    )
    if sequences.num_rows:
        storage.write_table(sequences, task.out.removeprefix(storage.base + "/"))
    return BucketResult(
        bucket=task.bucket,
        prior_events=prior_events.num_rows,
        rows_kept=merged.num_rows - prior_events.num_rows,
        duplicates_dropped=duplicates,
        events_truncated=truncated,
        users=sequences.num_rows,
        new_users=new_users,
        node=_node(),
    )


def count_items(root: str, paths: list[str]) -> tuple[int, int]:
    """(distinct items, items no bucket of yesterday had) over every bucket's item file."""
    storage = Storage(root)
    tables = [
        retry(lambda p=p: pq.read_table(p, filesystem=storage.filesystem), what=f"read {p}") for p in paths
    ]
    if not tables:
        return 0, 0
    seen = pa.concat_tables(tables).group_by("item_id", use_threads=False).aggregate([("in_prior", "any")])
    return seen.num_rows, int(pc.sum(pc.invert(seen["in_prior_any"])).as_py() or 0)


def write_quarantine(root: str, pieces: list[str], folder: str) -> list[str]:
    """The staged rejected rows, in input order, as ``part-NNNNN.parquet`` files of at most
    ``ROWS_PER_FILE`` rows under ``folder``; streamed piece by piece (files differ in extra columns)."""
    storage = Storage(root)
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=storage.filesystem) for p in pieces])
    written: list[str] = []
    writer, rows = None, 0
    try:
        for piece in pieces:
            table = pq.read_table(piece, filesystem=storage.filesystem)
            table = pa.table(
                {
                    f.name: table[f.name]
                    if f.name in table.column_names
                    else pa.nulls(table.num_rows, f.type)
                    for f in schema
                },
                schema=schema,
            )
            while table.num_rows:
                if writer is None or rows >= ROWS_PER_FILE:
                    if writer is not None:
                        writer.close()
                    written.append(f"{folder}/part-{len(written):05d}.parquet")
                    if not storage.is_s3:
                        storage.filesystem.create_dir(folder, recursive=True)
                    writer, rows = pq.ParquetWriter(written[-1], schema, filesystem=storage.filesystem), 0
                take = table.slice(0, ROWS_PER_FILE - rows)
                writer.write_table(take, row_group_size=ROW_GROUP_ROWS)
                rows += take.num_rows
                table = table.slice(take.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return written


# --------------------------------------------------------------------------------------------
# The stage (the driver: file lists, schemas and counts; every row is handled in a task)
# --------------------------------------------------------------------------------------------
def _previous_day(date: str) -> str:
    return (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()


def read_sequences(storage: Storage, date: str, columns: list[str] | None = None) -> pa.Table:
    files = storage.list_files("sequences", f"dt={date}", suffix=".parquet")
    if not files:
        raise InputError(
            f"no sequences for {date} under {storage.uri('sequences')}; run `seqrec prepare --date {date}`"
        )
    return pa.concat_tables(
        [
            retry(
                lambda f=f: pq.read_table(f, filesystem=storage.filesystem, columns=columns), what=f"read {f}"
            )
            for f in files
        ]
    )


def _metadata(storage: Storage, path: str) -> pq.FileMetaData | str:
    """A file's footer, or why it cannot be read (a truncated upload: 'magic bytes not found')."""
    try:
        return retry(lambda: pq.read_metadata(path, filesystem=storage.filesystem), what=f"schema {path}")
    except (pa.ArrowInvalid, OSError) as error:
        return f"unreadable Parquet ({error})"


def _chunks(files: dict[str, pq.FileMetaData], rows_per_task: int, first: int = 0) -> list[Chunk]:
    """Whole row groups of each file, about ``rows_per_task`` rows per chunk, in input order."""
    chunks: list[Chunk] = []
    for path, meta in files.items():
        group: list[int] = []
        rows = 0
        for rg in range(meta.num_row_groups):
            if group and rows + meta.row_group(rg).num_rows > rows_per_task:
                chunks.append(Chunk(path, group, first + len(chunks)))
                group, rows = [], 0
            group.append(rg)
            rows += meta.row_group(rg).num_rows
        if group:
            chunks.append(Chunk(path, group, first + len(chunks)))
    return chunks


def _bad_file_error(path: str, reason: str) -> InputError:
    return InputError(
        f"{path}: {reason}; re-write or remove that file, or set prepare.bad_files=quarantine "
        f"to move it aside and go on"
    )


def _ray():
    import ray

    if not ray.is_initialized():
        from seqrec.runtime import init_ray

        init_ray()
    return ray


def prepare(
    storage: Storage,
    date: str,
    config: PrepareConfig,
    *,
    merge: Callable[[BucketTask], BucketResult] = merge_bucket,
) -> PrepareReport:
    """Run the prepare stage for ``date``; see the module docstring. ``merge`` is the phase-2 task
    (a test may wrap :func:`merge_bucket`)."""
    dt.date.fromisoformat(date)  # a clear error for a malformed date
    check_choices(config, "prepare")
    if config.buckets < 1 or config.rows_per_task < 1:
        raise ValueError(
            f"prepare.buckets and prepare.rows_per_task must be >= 1, got {config.buckets}, "
            f"{config.rows_per_task}"
        )
    report = PrepareReport(date=date, buckets=config.buckets, layout=LAYOUT)
    previous, have_previous, dates = _dates_to_read(storage, date, config)
    report.mode = "incremental" if have_previous else "full"

    files = [f for d in dates for f in storage.list_files("events", f"dt={d}", suffix=".parquet")]
    if not files:
        raise InputError(
            f"no event files under {storage.uri('events')} for dates {dates[:1]}..{dates[-1:]}; "
            f"expected events/dt=YYYY-MM-DD/*.parquet"
        )
    metadata, bad_files, id_type = _readable_files(storage, files, config, dates)

    schema, manifest, direct, rebucket = _previous_day_layout(
        storage, config, date, previous, have_previous, id_type
    )

    ray = _ray()
    run = uuid.uuid4().hex[:12]
    staging_parts = ("sequences", "_staging", f"dt={date}", f"run-{run}")
    staging = storage.path(*staging_parts)
    task = dict(num_cpus=config.cpus_per_task, scheduling_strategy="SPREAD")
    try:
        # Phase 1: one task per chunk of an events file (and of yesterday's files to re-bucket).
        chunks = _chunks(metadata, config.rows_per_task)
        prior_chunks = [
            Chunk(f, [rg], len(chunks) + i)
            for i, (f, rg) in enumerate(
                (f, rg) for f, m in rebucket.items() for rg in range(m.num_row_groups)
            )
        ]
        users_per_batch = max(1, config.rows_per_task // config.max_len)
        staged = ray.get(
            [
                ray.remote(stage_events)
                .options(**task)
                .remote(storage.root, c, config, date, id_type, schema, staging)
                for c in chunks
            ]
            + [
                ray.remote(stage_prior)
                .options(**task)
                .remote(storage.root, c, config.buckets, schema, staging, users_per_batch)
                for c in prior_chunks
            ]
        )
        events_results, prior_results = staged[: len(chunks)], staged[len(chunks) :]
        events_results = _tally_staged(report, events_results, metadata, bad_files, config)

        # Phase 2: one task per bucket merges yesterday's and today's events of its users.
        by_bucket: dict[int, dict[str, list[str]]] = {}
        for kind, results in (("events", events_results), ("prior_events", prior_results)):
            for r in results:
                for b, paths in r.staged.items():
                    by_bucket.setdefault(b, {}).setdefault(kind, []).extend(paths)
        for b in direct:
            by_bucket.setdefault(b, {})
        tasks = [
            BucketTask(
                root=storage.root,
                bucket=b,
                schema=schema,
                max_len=config.max_len,
                prior_sequences=[direct[b]] if b in direct else [],
                prior_events=by_bucket[b].get("prior_events", []),
                events=by_bucket[b].get("events", []),
                out=f"{staging}/out/{bucket_file(b)}",
                items=f"{staging}/items/b{b:05d}.parquet",
            )
            for b in sorted(by_bucket)
        ]
        merged = ray.get([ray.remote(merge).options(**task).remote(t) for t in tasks])
        report.rows_kept = sum(r.rows_kept for r in merged)
        report.duplicates_dropped = sum(r.duplicates_dropped for r in merged)
        report.events_truncated = sum(r.events_truncated for r in merged)
        report.users = sum(r.users for r in merged)
        report.new_users = sum(r.new_users for r in merged)
        report.nodes = len({r.node for r in (*staged, *merged)} - {""})
        _check_counts(report, merged, prior_results, manifest)

        quarantine_pieces = [r.quarantine for r in events_results if r.quarantine]
        quarantined = (
            ray.get(
                ray.remote(write_quarantine)
                .options(**task)
                .remote(storage.root, quarantine_pieces, f"{staging}/quarantine-out")
            )
            if quarantine_pieces
            else []
        )
        if report.rows_kept == 0 and not have_previous:
            _publish_quarantine(storage, date, quarantined, bad_files)
            raise InputError(
                f"every one of the {report.rows_read} event rows up to {date} was rejected; "
                f"see {storage.uri('quarantine', f'dt={date}')}"
            )
        report.items, report.new_items = ray.get(
            ray.remote(count_items).options(**task).remote(storage.root, [t.items for t in tasks])
        )

        storage.delete_file("sequences", f"dt={date}", "_SUCCESS")
        storage.delete_dir("sequences", f"dt={date}")
        for t, r in zip(tasks, merged):
            if r.users:
                storage.move_file(t.out, "sequences", f"dt={date}", bucket_file(t.bucket))
        _publish_quarantine(storage, date, quarantined, bad_files)
        storage.write_json(report.as_dict(), "sequences", f"dt={date}", "_SUCCESS")
    finally:
        storage.delete_dir(*staging_parts)
    log.info(
        "prepare %s (%s): read %d = kept %d + quarantined %d + duplicates %d; %d users, %d items, "
        "%d events truncated, %d files quarantined; %d buckets on %d nodes -> %s",
        date,
        report.mode,
        report.rows_read,
        report.rows_kept,
        report.rows_quarantined,
        report.duplicates_dropped,
        report.users,
        report.items,
        report.events_truncated,
        report.files_quarantined,
        report.buckets,
        report.nodes,
        storage.uri("sequences", f"dt={date}"),
    )
    return report


def _dates_to_read(storage: Storage, date: str, config: PrepareConfig) -> tuple[str, bool, list[str]]:
    """(previous day, whether its sequences are extended, the event dates to read)."""
    previous = _previous_day(date)
    have_previous = config.incremental and storage.exists("sequences", f"dt={previous}", "_SUCCESS")
    if have_previous:
        dates = [date] if date in event_dates(storage) else []
        if not dates:
            raise InputError(
                f"no events for {date} under {storage.uri('events')} (incremental mode extends "
                f"sequences of {previous} with events/dt={date})"
            )
    else:
        dates = [d for d in event_dates(storage) if d <= date]
        if config.lookback_days:
            first = (dt.date.fromisoformat(date) - dt.timedelta(days=config.lookback_days - 1)).isoformat()
            dates = [d for d in dates if d >= first]
        if not dates:
            raise InputError(f"no events on or before {date} under {storage.uri('events')}")
    return previous, have_previous, dates


def _readable_files(
    storage: Storage, files: list[str], config: PrepareConfig, dates: list[str]
) -> tuple[dict[str, pq.FileMetaData], dict[str, str], pa.DataType]:
    """Footers of the readable event files, the unreadable ones with their reason, and the id type.

    An unreadable file fails the stage, or is set aside when ``prepare.bad_files=quarantine``."""
    metadata: dict[str, pq.FileMetaData] = {}
    bad_files: dict[str, str] = {}
    for f in files:
        meta = _metadata(storage, f)
        if isinstance(meta, str) and config.bad_files == "fail":
            raise _bad_file_error(f, meta)
        if isinstance(meta, str):
            bad_files[f] = meta
        else:
            metadata[f] = meta
    schemas = {f: m.schema.to_arrow_schema() for f, m in metadata.items()}
    for f, s in schemas.items():
        _check_schema(s, f)
    if not metadata:
        raise InputError(
            f"none of the {len(files)} event files for {dates[0]}..{dates[-1]} is readable; "
            f"first: {files[0]}: {bad_files[files[0]]}"
        )
    id_types = {_id_type(s.field(c), f) for f, s in schemas.items() for c in ("user_id", "item_id")}
    id_type = pa.string() if pa.string() in id_types else pa.int64()
    return metadata, bad_files, id_type


def _previous_day_layout(
    storage: Storage,
    config: PrepareConfig,
    date: str,
    previous: str,
    have_previous: bool,
    id_type: pa.DataType,
) -> tuple[pa.Schema, dict, dict[int, str], dict[str, pq.FileMetaData]]:
    """The events schema, yesterday's manifest, its bucket files usable as they are, and the files
    that must be re-bucketed first (another layout or bucket count)."""
    prior_files = (
        storage.list_files("sequences", f"dt={previous}", suffix=".parquet") if have_previous else []
    )
    schema = _events_schema(id_type, id_type)
    if prior_files:
        # Events take yesterday's id types, so that a bucket's two halves concatenate.
        prior_schema = pq.read_schema(prior_files[0], filesystem=storage.filesystem)
        schema = _events_schema(
            prior_schema.field("user_id").type, prior_schema.field("item_ids").type.value_type
        )
    manifest = storage.read_json("sequences", f"dt={previous}", "_SUCCESS") if have_previous else {}
    same_layout = manifest.get("layout") == LAYOUT and manifest.get("buckets") == config.buckets
    direct = {int(f.rsplit("-b", 1)[1].split(".")[0]): f for f in prior_files} if same_layout else {}
    rebucket = (
        {}
        if same_layout
        else {
            f: retry(lambda f=f: pq.read_metadata(f, filesystem=storage.filesystem), what=f"schema {f}")
            for f in prior_files
        }
    )
    if rebucket:
        log.info(
            "prepare %s: re-bucketing %d sequence files of %s into %d buckets",
            date,
            len(rebucket),
            previous,
            config.buckets,
        )
    return schema, manifest, direct, rebucket


def _tally_staged(
    report: PrepareReport,
    events_results: list,
    metadata: dict,
    bad_files: dict[str, str],
    config: PrepareConfig,
) -> list:
    """Add phase 1's counts to ``report``; files found corrupt while reading drop out whole."""
    for r in events_results:
        if r.bad and config.bad_files == "fail":
            raise _bad_file_error(r.path, r.bad)
        if r.bad:
            bad_files.setdefault(r.path, r.bad)
    events_results = [r for r in events_results if r.path not in bad_files]  # all chunks of a bad file
    report.files_read = len(metadata) - len(bad_files.keys() & metadata.keys())
    report.files_quarantined = len(bad_files)
    report.rows_read = sum(r.rows_read for r in events_results)
    report.rows_quarantined = sum(r.rows_quarantined for r in events_results)
    return events_results


def _check_counts(
    report: PrepareReport, merged: list[BucketResult], prior: list[StageResult], manifest: dict
) -> None:
    """Refuse to finish when the tasks' counts do not add up: no row may be lost silently."""
    problems = []
    if not report.reconciles():
        problems.append(
            f"rows read {report.rows_read} != kept {report.rows_kept} + quarantined "
            f"{report.rows_quarantined} + duplicates {report.duplicates_dropped}"
        )
    if prior and sum(r.rows_read for r in prior) != sum(r.prior_events for r in merged):
        problems.append(
            f"yesterday's events re-bucketed {sum(r.rows_read for r in prior)} != merged "
            f"{sum(r.prior_events for r in merged)}"
        )
    carried = report.users - report.new_users
    if isinstance(manifest.get("users"), int) and carried != manifest["users"]:
        problems.append(f"yesterday had {manifest['users']} users, {carried} carried over")
    if problems:
        raise AssertionError(f"row accounting does not reconcile ({'; '.join(problems)}): {report}")


def _publish_quarantine(storage: Storage, date: str, parts: list[str], bad_files: dict[str, str]) -> None:
    """Replace this stage's quarantine files of ``date`` (not the importer's), then move unreadable
    files aside under ``_files/`` (an underscore: readers of the row tables skip it)."""
    folder = storage.path("quarantine", f"dt={date}")
    listing = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
    for info in retry(lambda: storage.filesystem.get_file_info(listing), what="list"):
        if info.type == pafs.FileType.File and info.base_name.startswith("part-"):
            retry(lambda p=info.path: storage.filesystem.delete_file(p), what=f"delete {info.path}")
    for part in parts:
        storage.move_file(part, "quarantine", f"dt={date}", part.rsplit("/", 1)[1])
    for path, reason in bad_files.items():
        day, name = path.rsplit("/", 2)[-2:]
        day = day.removeprefix("dt=")
        storage.move_file(path, "quarantine", f"dt={date}", "_files", day, name)
        storage.write_json(
            {"file": path, "reason": reason}, "quarantine", f"dt={date}", "_files", day, f"{name}.reason.json"
        )
        log.warning(
            "prepare %s: moved unreadable %s to %s: %s",
            date,
            path,
            storage.uri("quarantine", f"dt={date}", "_files", day, name),
            reason,
        )
