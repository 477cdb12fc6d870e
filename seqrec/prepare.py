"""Stage 1: behaviour events -> per-user sequences, bad rows to quarantine.

For one date ``D`` the stage reads the events of ``events/dt=D`` (incremental mode, extending the
sequences of ``D-1``) or of every day up to ``D`` (full mode), and writes:

* ``sequences/dt=D/``   one row per user: ``user_id``, ``item_ids``, ``event_types``, ``ts``
  (lists, oldest first, the newest ``max_len`` events);
* ``quarantine/dt=D/``  every rejected row, its columns rendered as strings, plus ``reason``.

Nothing valid is lost silently: the returned :class:`PrepareReport` satisfies
``rows_read == rows_kept + rows_quarantined + duplicates_dropped`` and the stage refuses to finish
otherwise. All work is columnar (pyarrow compute); no row is touched from Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seqrec.config import PrepareConfig
from seqrec.errors import InputError
from seqrec.storage import Storage, retry

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
    mode: str = "full"

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
    raise InputError(f"{path}: column {field.name!r} has type {field.type}; seqrec needs int64 or string ids. "
                     f"Cast it before writing (floats usually mean a null slipped in upstream).")


def _check_schema(schema: pa.Schema, path: str) -> None:
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; found {schema.names}. "
                         f"Events need user_id, item_id, ts (timestamp or epoch seconds) and optionally event_type.")
    for name in ("user_id", "item_id"):
        _id_type(schema.field(name), path)
    ts = schema.field("ts").type
    if not (pa.types.is_timestamp(ts) or pa.types.is_integer(ts) or pa.types.is_floating(ts)
            or pa.types.is_string(ts) or pa.types.is_large_string(ts) or pa.types.is_date(ts)):
        raise InputError(f"{path}: column 'ts' has type {ts}; use a timestamp, int64 epoch seconds or ISO-8601 text.")
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
        text, r"^(?P<head>.*\d:\d\d)[.,](?P<fraction>\d{1,9})(?P<tail>(?:Z|[+-]\d\d:?\d\d)?)$")
    head, digits, tail = (pc.struct_field(parts, name) for name in ("head", "fraction", "tail"))
    text = pc.coalesce(pc.binary_join_element_wise(head, tail, ""), text)
    fraction = pc.utf8_slice_codeunits(pc.utf8_rpad(pc.coalesce(digits, "0"), 6, "0"), 0, 6)  # microseconds
    parsed = None
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
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


def validate(table: pa.Table, config: PrepareConfig, date: str, id_type: pa.DataType,
             source: str) -> tuple[pa.Table, pa.Table]:
    """Split one file's rows into (clean events, quarantined rows with ``reason``)."""
    n = table.num_rows
    user = _as_text(table["user_id"]) if id_type == pa.string() else table["user_id"].cast(pa.int64())
    item = _as_text(table["item_id"]) if id_type == pa.string() else table["item_id"].cast(pa.int64())
    ts = _parse_ts(table["ts"])
    if "event_type" in table.column_names:
        etype = pc.fill_null(_as_text(table["event_type"]), config.default_event_type)
    else:
        etype = pa.chunked_array([pa.array([config.default_event_type] * n, pa.string())])

    lo = pa.scalar(dt.datetime.fromisoformat(config.min_ts).replace(tzinfo=dt.timezone.utc), TS_TYPE)
    hi_day = dt.date.fromisoformat(date) + dt.timedelta(days=1 + config.max_future_days)
    hi = pa.scalar(dt.datetime.combine(hi_day, dt.time(), dt.timezone.utc), TS_TYPE)
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
        (pc.or_(pc.less(ts, lo), pc.greater_equal(ts, hi)),
         f"ts out of range [{config.min_ts}, {hi_day.isoformat()})"),
        (pc.invert(pc.is_in(etype, value_set=allowed)), "event_type not in configured set"),
    ]
    reason = _first_reason(conditions, n)
    bad = pc.is_valid(reason)
    clean = pa.table({"user_id": user, "item_id": item, "ts": ts, "event_type": etype}).filter(pc.invert(bad))

    quarantined = table.filter(bad)
    columns = {name: _as_text(quarantined[name]) if not pa.types.is_nested(quarantined[name].type)
               else pa.array([str(v) for v in quarantined[name].to_pylist()], pa.string())
               for name in quarantined.column_names}
    columns["reason"] = pc.filter(reason, bad)
    columns["source_file"] = pa.array([source] * quarantined.num_rows, pa.string())
    return clean, pa.table(columns)


def _read_events(storage: Storage, dates: list[str], config: PrepareConfig, date: str,
                 report: PrepareReport) -> tuple[pa.Table, list[pa.Table]]:
    files = [f for d in dates for f in storage.list_files("events", f"dt={d}", suffix=".parquet")]
    if not files:
        raise InputError(f"no event files under {storage.uri('events')} for dates {dates[:1]}..{dates[-1:]}; "
                         f"expected events/dt=YYYY-MM-DD/*.parquet")
    schemas = [retry(lambda f=f: pq.read_schema(f, filesystem=storage.filesystem), what=f"schema {f}") for f in files]
    for f, s in zip(files, schemas):
        _check_schema(s, f)
    id_types = {_id_type(s.field(c), f) for f, s in zip(files, schemas) for c in ("user_id", "item_id")}
    id_type = pa.string() if pa.string() in id_types else pa.int64()

    clean_parts, quarantine_parts = [], []
    for f, s in zip(files, schemas):
        columns = [c for c in (*REQUIRED, "event_type") if c in s.names]
        table = retry(lambda f=f: pq.read_table(f, filesystem=storage.filesystem, columns=columns), what=f"read {f}")
        # Quarantine keeps the row as it was: re-read with every column for the (rare) bad rows.
        report.rows_read += table.num_rows
        report.files_read += 1
        clean, bad = validate(table, config, date, id_type, f)
        clean_parts.append(clean)
        if bad.num_rows:
            full = pq.read_table(f, filesystem=storage.filesystem)
            _, bad = validate(full, config, date, id_type, f)
            quarantine_parts.append(bad)
    return pa.concat_tables(clean_parts), quarantine_parts


# --------------------------------------------------------------------------------------------
# Building sequences
# --------------------------------------------------------------------------------------------
def explode(sequences: pa.Table) -> pa.Table:
    """Sequences -> one row per event (the inverse of :func:`build_sequences`)."""
    lengths = pc.list_value_length(sequences["item_ids"]).to_numpy(zero_copy_only=False)
    return pa.table({
        "user_id": pc.take(sequences["user_id"], pa.array(np.repeat(np.arange(len(lengths)), lengths))),
        "item_id": pc.list_flatten(sequences["item_ids"]),
        "ts": pc.list_flatten(sequences["ts"]).cast(TS_TYPE),
        "event_type": pc.list_flatten(sequences["event_types"]),
    })


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
# The stage
# --------------------------------------------------------------------------------------------
def _previous_day(date: str) -> str:
    return (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()


def read_sequences(storage: Storage, date: str, columns: list[str] | None = None) -> pa.Table:
    files = storage.list_files("sequences", f"dt={date}", suffix=".parquet")
    if not files:
        raise InputError(f"no sequences for {date} under {storage.uri('sequences')}; run `seqrec prepare --date {date}`")
    return pa.concat_tables([retry(lambda f=f: pq.read_table(f, filesystem=storage.filesystem, columns=columns),
                                   what=f"read {f}") for f in files])


def _write_partition(storage: Storage, table: pa.Table, *parts: str) -> None:
    storage.delete_dir(*parts)
    for i, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_FILE)):
        storage.write_table(table.slice(start, ROWS_PER_FILE), *parts, f"part-{i:05d}.parquet")


def prepare(storage: Storage, date: str, config: PrepareConfig) -> PrepareReport:
    """Run the prepare stage for ``date``; see the module docstring."""
    dt.date.fromisoformat(date)  # a clear error for a malformed date
    report = PrepareReport(date=date)
    previous = _previous_day(date)
    have_previous = config.incremental and storage.exists("sequences", f"dt={previous}", "_SUCCESS")
    if have_previous:
        report.mode = "incremental"
        dates = [date] if date in event_dates(storage) else []
        if not dates:
            raise InputError(f"no events for {date} under {storage.uri('events')} (incremental mode extends "
                             f"sequences of {previous} with events/dt={date})")
    else:
        dates = [d for d in event_dates(storage) if d <= date]
        if config.lookback_days:
            first = (dt.date.fromisoformat(date) - dt.timedelta(days=config.lookback_days - 1)).isoformat()
            dates = [d for d in dates if d >= first]
        if not dates:
            raise InputError(f"no events on or before {date} under {storage.uri('events')}")

    events, quarantined = _read_events(storage, dates, config, date, report)
    report.rows_quarantined = sum(q.num_rows for q in quarantined)
    if have_previous:
        prior = read_sequences(storage, previous)
        prior_events = explode(prior)
        if prior_events["user_id"].type != events["user_id"].type:
            events = events.cast(prior_events.schema)
        prior_users, prior_items = prior["user_id"], pc.unique(prior_events["item_id"])
        # Older events first: ties in ts keep yesterday's order, and a re-sent old event is a duplicate.
        merged, report.duplicates_dropped = dedupe(pa.concat_tables([prior_events, events]))
        report.rows_kept = merged.num_rows - prior_events.num_rows
        events = merged
    else:
        events, report.duplicates_dropped = dedupe(events)
        report.rows_kept = events.num_rows
    if not report.reconciles():
        raise AssertionError(f"row accounting does not reconcile: {report}")
    if report.rows_kept == 0 and not have_previous:
        raise InputError(f"every one of the {report.rows_read} event rows up to {date} was rejected; "
                         f"see {storage.uri('quarantine', f'dt={date}')}")

    sequences, report.events_truncated = build_sequences(events, config.max_len)
    report.users = sequences.num_rows
    report.items = len(pc.unique(events["item_id"]))
    if have_previous:
        report.new_users = int(pc.sum(pc.invert(pc.is_in(sequences["user_id"], value_set=prior_users))).as_py() or 0)
        report.new_items = int(pc.sum(pc.invert(pc.is_in(pc.unique(events["item_id"]), value_set=prior_items))).as_py() or 0)
    else:
        report.new_users, report.new_items = report.users, report.items

    storage.delete_file("sequences", f"dt={date}", "_SUCCESS")
    _write_partition(storage, sequences, "sequences", f"dt={date}")
    if quarantined:
        _write_partition(storage, pa.concat_tables(quarantined, promote_options="permissive"), "quarantine", f"dt={date}")
    else:
        storage.delete_dir("quarantine", f"dt={date}")
    storage.write_json(report.as_dict(), "sequences", f"dt={date}", "_SUCCESS")
    log.info("prepare %s (%s): read %d = kept %d + quarantined %d + duplicates %d; %d users, %d items, "
             "%d events truncated -> %s", date, report.mode, report.rows_read, report.rows_kept,
             report.rows_quarantined, report.duplicates_dropped, report.users, report.items,
             report.events_truncated, storage.uri("sequences", f"dt={date}"))
    return report
