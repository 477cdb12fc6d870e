"""seqrec.prepare: events -> sequences, bad rows -> quarantine, row accounting, incremental mode."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from seqrec.config import PrepareConfig
from seqrec.prepare import InputError, bucket_file, bucket_of, merge_bucket, prepare, read_sequences
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, generate_events, write_synthetic

UTC = dt.UTC
DAY = "2024-01-02"

# The stage runs as Ray tasks: on the session's local Ray (starting its own would clash with it).
pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


def at(day: str, hour: int = 0, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, minute=minute, second=second, tzinfo=UTC)


def epoch(day: str, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(at(day, hour, minute, second).timestamp())


def write_events(storage: Storage, table: pa.Table, date: str = DAY, name: str = "part-00000.parquet") -> str:
    storage.write_table(table, "events", f"dt={date}", name)
    return storage.path("events", f"dt={date}", name)


def events(users, items, ts, types=None, ts_type=pa.timestamp("us", tz="UTC"), **extra) -> pa.Table:
    columns = {"user_id": users, "item_id": items, "ts": pa.array(ts, ts_type)}
    if types is not None:
        columns["event_type"] = pa.array(types, pa.string())
    columns.update(extra)
    return pa.table(columns)


def by_user(storage: Storage, date: str = DAY) -> dict:
    return {row["user_id"]: row for row in read_sequences(storage, date).to_pylist()}


def quarantine(storage: Storage, date: str = DAY) -> pa.Table:
    files = storage.list_files("quarantine", f"dt={date}", suffix=".parquet")
    return pa.concat_tables([storage.read_table(f.removeprefix(storage.base + "/")) for f in files])


def check_contract(storage: Storage, date: str = DAY) -> pa.Table:
    table = read_sequences(storage, date)
    assert table.column_names == ["user_id", "item_ids", "event_types", "ts"]
    for name in ("item_ids", "event_types", "ts"):
        assert pa.types.is_list(table.schema.field(name).type) or pa.types.is_large_list(
            table.schema.field(name).type
        )
    assert pa.types.is_timestamp(table.schema.field("ts").type.value_type)
    lengths = pc.list_value_length(table["item_ids"])
    assert pc.all(pc.equal(lengths, pc.list_value_length(table["event_types"]))).as_py()
    assert pc.all(pc.equal(lengths, pc.list_value_length(table["ts"]))).as_py()
    assert pc.min(lengths).as_py() >= 1
    assert len(pc.unique(table["user_id"])) == table.num_rows  # one row per user
    for row in table.to_pylist():
        assert row["ts"] == sorted(row["ts"])  # oldest first
    return table


# --------------------------------------------------------------------------------------------
# Synthetic data: counts, planted bad rows, contract
# --------------------------------------------------------------------------------------------
SPEC = SyntheticSpec(num_users=100, num_items=50, mean_events=10, days=3, end_date="2024-01-03", bad_rows=10)


def test_synthetic_reconciles_and_quarantines_planted_rows(storage):
    counts = write_synthetic(storage, SPEC)
    report = prepare(storage, "2024-01-03", PrepareConfig(max_len=500, incremental=False))

    assert report.files_read == 3
    assert report.rows_read == counts["events"]
    assert report.reconciles()
    assert report.rows_read == report.rows_kept + report.rows_quarantined + report.duplicates_dropped
    # bad_rows=10 plants 2 of each kind: null user, null item, 1970 ts, unknown type, exact duplicate.
    assert report.rows_quarantined == 8
    assert report.duplicates_dropped == 2
    assert report.users == 100
    assert report.events_truncated == 0
    assert report.mode == "full"

    reasons = quarantine(storage, "2024-01-03")["reason"].to_pylist()
    assert sorted(set(reasons)) == sorted(
        {
            "user_id missing or empty",
            "item_id missing or empty",
            "ts out of range [2000-01-01, 2024-01-05)",
            "event_type not in configured set",
        }
    )
    assert all(reasons.count(r) == 2 for r in set(reasons))

    table = check_contract(storage, "2024-01-03")
    assert sum(pc.list_value_length(table["item_ids"]).to_pylist()) == report.rows_kept
    assert storage.read_json("sequences", "dt=2024-01-03", "_SUCCESS")["rows_kept"] == report.rows_kept


def test_a_miscount_refuses_to_finish_and_keeps_the_published_sequences(storage):
    """A row lost between reading and counting (here: one bucket's merge task drops one clean row
    without counting it) breaks rows read = kept + quarantined + duplicates: prepare raises and
    neither replaces nor removes the date's published sequences. The task runs in a Ray worker, so
    the fault is injected through prepare's ``merge`` parameter, not by patching this process."""
    write_synthetic(storage, SPEC)
    config = PrepareConfig(max_len=500, incremental=False)
    good = prepare(storage, "2024-01-03", config)
    published = read_sequences(storage, "2024-01-03")

    def loses_a_row(task):
        result = merge_bucket(task)
        if result.rows_kept:
            result.rows_kept -= 1
        return result

    with pytest.raises(Exception, match="reconcile") as refused:
        prepare(storage, "2024-01-03", config, merge=loses_a_row)
    assert str(good.rows_read) in str(refused.value)  # the message gives the counts
    assert storage.read_json("sequences", "dt=2024-01-03", "_SUCCESS") == good.as_dict()
    assert read_sequences(storage, "2024-01-03").equals(published)


def test_incremental_equals_full_rebuild(tmp_path):
    inc, full = Storage(str(tmp_path / "inc")), Storage(str(tmp_path / "full"))
    for s in (inc, full):
        write_synthetic(s, SPEC)
    config = PrepareConfig(max_len=500)
    r1 = prepare(inc, "2024-01-01", config)
    r2 = prepare(inc, "2024-01-02", config)
    r3 = prepare(inc, "2024-01-03", config)
    assert (r1.mode, r2.mode, r3.mode) == ("full", "incremental", "incremental")
    rebuilt = prepare(full, "2024-01-03", PrepareConfig(max_len=500, incremental=False))

    assert r1.rows_read + r2.rows_read + r3.rows_read == rebuilt.rows_read
    assert sum(r.rows_kept for r in (r1, r2, r3)) == rebuilt.rows_kept
    assert sum(r.duplicates_dropped for r in (r1, r2, r3)) == rebuilt.duplicates_dropped
    assert (
        read_sequences(inc, "2024-01-03")
        .sort_by("user_id")
        .equals(read_sequences(full, "2024-01-03").sort_by("user_id"))
    )


# --------------------------------------------------------------------------------------------
# Bad rows, one kind at a time
# --------------------------------------------------------------------------------------------
def test_every_bad_row_kind_is_quarantined_with_its_reason(storage):
    good = at(DAY, 10)
    rows = [
        # (user, item, ts, event_type, expected reason or None)
        ("u1", "a", good, "view", None),
        (None, "a", good, "view", "user_id missing or empty"),
        ("", "a", good, "view", "user_id missing or empty"),
        ("   ", "a", good, "view", "user_id missing or empty"),
        ("u1", None, good, "view", "item_id missing or empty"),
        ("u1", "", good, "view", "item_id missing or empty"),
        ("u1", "b", "not a time", "view", "ts unparseable"),
        ("u1", "b", "2024-13-45T99:00:00", "view", "ts unparseable"),
        ("u1", "b", None, "view", "ts missing"),
        ("u1", "c", "1970-01-02T00:00:00", "view", "ts out of range [2000-01-01, 2024-01-04)"),
        ("u1", "c", "2031-06-01T00:00:00", "view", "ts out of range [2000-01-01, 2024-01-04)"),
        ("u1", "c", "2024-01-04T00:00:00", "view", "ts out of range [2000-01-01, 2024-01-04)"),
        ("u1", "d", "2024-01-03T23:59:59", "view", None),  # the day after is still accepted
        ("u1", "d", good, "hover", "event_type not in configured set"),
        ("u1", "e", good, None, None),  # null type -> default type
        ("u2", "a", good, "click", None),
    ]
    table = pa.table(
        {
            "user_id": pa.array([r[0] for r in rows], pa.string()),
            "item_id": pa.array([r[1] for r in rows], pa.string()),
            "ts": pa.array(
                [r[2].isoformat() if isinstance(r[2], dt.datetime) else r[2] for r in rows], pa.string()
            ),
            "event_type": pa.array([r[3] for r in rows], pa.string()),
            "page": pa.array(range(len(rows)), pa.int32()),  # extra: ignored
            "tags": pa.array(
                [["x", str(i)] for i in range(len(rows))], pa.list_(pa.string())
            ),  # extra, nested
        }
    )
    path = write_events(storage, table)
    report = prepare(storage, DAY, PrepareConfig())

    expected = [r[4] for r in rows if r[4] is not None]
    assert report.rows_read == len(rows)
    assert report.rows_quarantined == len(expected)
    assert report.rows_kept == len(rows) - len(expected)
    assert report.duplicates_dropped == 0
    assert report.reconciles()

    q = quarantine(storage).to_pylist()
    assert [r["reason"] for r in q] == expected
    assert {r["source_file"] for r in q} == {path}
    # Extra columns survive in quarantine (as text), so the row can be traced.
    assert [r["page"] for r in q] == [str(i) for i, r in enumerate(rows) if r[4] is not None]
    assert all(r["tags"] is not None and "x" in r["tags"] for r in q)
    assert q[0]["user_id"] is None and q[1]["user_id"] == ""

    seqs = by_user(storage)
    assert set(seqs) == {"u1", "u2"}
    assert seqs["u1"]["item_ids"] == ["a", "e", "d"]
    assert seqs["u1"]["event_types"] == ["view", "interaction", "view"]
    assert seqs["u2"]["item_ids"] == ["a"]
    check_contract(storage)


def test_int_ids_null_and_event_type_column_missing(storage):
    table = pa.table(
        {
            "user_id": pa.array([1, None, 2, 2], pa.int64()),
            "item_id": pa.array([10, 11, None, 12], pa.int64()),
            "ts": pa.array([epoch(DAY, 1), epoch(DAY, 2), epoch(DAY, 3), epoch(DAY, 4)], pa.int64()),
        }
    )
    write_events(storage, table)
    report = prepare(storage, DAY, PrepareConfig(default_event_type="seen"))
    assert (report.rows_kept, report.rows_quarantined) == (2, 2)
    assert quarantine(storage)["reason"].to_pylist() == [
        "user_id missing or empty",
        "item_id missing or empty",
    ]
    seqs = by_user(storage)
    assert seqs[1]["item_ids"] == [10] and seqs[2]["item_ids"] == [12]
    assert seqs[1]["event_types"] == ["seen"]
    assert read_sequences(storage, DAY).schema.field("user_id").type == pa.int64()


def test_exact_duplicates_dropped_and_counted(storage):
    t = at(DAY, 8)
    table = events(
        ["u"] * 6,
        ["a", "a", "a", "a", "b", "a"],
        [t, t, t, at(DAY, 9), t, t],
        ["view", "view", "click", "view", "view", "view"],
    )
    write_events(storage, table)
    report = prepare(storage, DAY, PrepareConfig())
    # (a, t, view) three times -> two duplicates; other rows differ in type, ts or item.
    assert report.duplicates_dropped == 2
    assert report.rows_kept == 4
    assert report.reconciles()
    seq = by_user(storage)["u"]
    assert seq["item_ids"] == ["a", "a", "b", "a"]
    assert seq["event_types"] == ["view", "click", "view", "view"]


def test_duplicates_across_files_are_dropped(storage):
    t = at(DAY, 8)
    write_events(storage, events([1, 2], [5, 6], [t, t], ["view", "view"]), name="part-00000.parquet")
    write_events(storage, events([1, 3], [5, 6], [t, t], ["view", "view"]), name="part-00001.parquet")
    report = prepare(storage, DAY, PrepareConfig())
    assert (report.rows_read, report.rows_kept, report.duplicates_dropped, report.files_read) == (4, 3, 1, 2)
    assert by_user(storage)[1]["item_ids"] == [5]


def test_all_rows_bad_is_an_input_error(storage):
    write_events(
        storage,
        events(
            pa.array([None, 1], pa.int64()),
            pa.array([1, None], pa.int64()),
            [at(DAY), at(DAY)],
            ["view", "view"],
        ),
    )
    with pytest.raises(InputError, match="rejected"):
        prepare(storage, DAY, PrepareConfig())


# --------------------------------------------------------------------------------------------
# Timestamp representations
# --------------------------------------------------------------------------------------------
EXPECTED_TS = [at(DAY, 10), at(DAY, 11, 30), at(DAY, 12, 0, 1)]


@pytest.mark.parametrize(
    "ts_type,values",
    [
        (pa.int64(), [epoch(DAY, 10), epoch(DAY, 11, 30), epoch(DAY, 12, 0, 1)]),
        (pa.timestamp("s"), [epoch(DAY, 10), epoch(DAY, 11, 30), epoch(DAY, 12, 0, 1)]),
        (
            pa.timestamp("ms", tz="America/New_York"),
            [1000 * epoch(DAY, 10), 1000 * epoch(DAY, 11, 30), 1000 * epoch(DAY, 12, 0, 1)],
        ),
        (
            pa.timestamp("us", tz="UTC"),
            [10**6 * epoch(DAY, 10), 10**6 * epoch(DAY, 11, 30), 10**6 * epoch(DAY, 12, 0, 1)],
        ),
        (
            pa.timestamp("ns", tz="Asia/Kolkata"),
            [10**9 * epoch(DAY, 10), 10**9 * epoch(DAY, 11, 30), 10**9 * epoch(DAY, 12, 0, 1)],
        ),
        (pa.string(), ["2024-01-02T10:00:00Z", "2024-01-02 13:30:00+02:00", "2024-01-02T12:00:01"]),
        (
            pa.string(),
            ["2024-01-02T10:00:00.000Z", "2024-01-02T11:30:00.000000+00:00", "2024-01-02 12:00:01.0"],
        ),
    ],
    ids=["epoch-s", "ts-s-naive", "ts-ms-ny", "ts-us-utc", "ts-ns-kolkata", "iso", "iso-fraction"],
)
def test_ts_representations(storage, ts_type, values):
    write_events(
        storage,
        pa.table(
            {
                "user_id": pa.array([1, 1, 1], pa.int64()),
                "item_id": pa.array([3, 1, 2], pa.int64()),
                "ts": pa.array(values, ts_type),
                "event_type": pa.array(["view"] * 3),
            }
        ),
    )
    report = prepare(storage, DAY, PrepareConfig())
    assert (report.rows_kept, report.rows_quarantined) == (3, 0)
    seq = by_user(storage)[1]
    assert seq["item_ids"] == [3, 1, 2]
    assert [t.astimezone(UTC) for t in seq["ts"]] == EXPECTED_TS


def test_sub_microsecond_and_fractional_timestamps_keep_order(storage):
    base = 10**9 * epoch(DAY, 10)
    write_events(
        storage,
        pa.table(
            {
                "user_id": pa.array(["n", "n", "n", "s", "s"]),
                "item_id": pa.array(["late", "early", "mid", "b", "a"]),
                "ts": pa.array([base + 2_500, base + 999, base + 1_500, base, base], pa.timestamp("ns")),
            }
        ),
        name="part-00000.parquet",
    )
    write_events(
        storage,
        pa.table(
            {
                "user_id": pa.array(["i", "i"]),
                "item_id": pa.array(["second", "first"]),
                "ts": pa.array(["2024-01-02T10:00:00.250Z", "2024-01-02T10:00:00.125Z"]),
            }
        ),
        name="part-00001.parquet",
    )
    report = prepare(storage, DAY, PrepareConfig())
    assert (report.rows_kept, report.rows_quarantined) == (7, 0)
    seqs = by_user(storage)
    assert seqs["n"]["item_ids"] == ["early", "mid", "late"]
    assert seqs["s"]["item_ids"] == ["b", "a"]  # equal ts: input order
    assert seqs["i"]["item_ids"] == ["first", "second"]
    assert [t.astimezone(UTC) for t in seqs["i"]["ts"]] == [
        at(DAY, 10) + dt.timedelta(milliseconds=125),
        at(DAY, 10) + dt.timedelta(milliseconds=250),
    ]


def test_absurd_epoch_values_are_quarantined_not_fatal(storage):
    # ok, 1970, far beyond what microseconds can hold, before 1970
    write_events(
        storage,
        pa.table(
            {
                "user_id": pa.array([1, 1, 1, 1]),
                "item_id": pa.array([1, 2, 3, 4]),
                "ts": pa.array([epoch(DAY, 1), 86400, 10**17, -5], pa.int64()),
            }
        ),
        name="part-00000.parquet",
    )
    write_events(
        storage,
        pa.table(
            {
                "user_id": pa.array([2, 2]),
                "item_id": pa.array([1, 2]),
                "ts": pa.array([1000 * epoch(DAY, 1), 10**17], pa.timestamp("ms")),
            }
        ),
        name="part-00001.parquet",
    )
    report = prepare(storage, DAY, PrepareConfig())
    assert (report.rows_kept, report.rows_quarantined) == (2, 4)
    out_of_range = "ts out of range [2000-01-01, 2024-01-04)"
    assert quarantine(storage)["reason"].to_pylist() == [
        out_of_range,
        "ts unparseable",
        out_of_range,
        "ts unparseable",
    ]


# --------------------------------------------------------------------------------------------
# Input that no quarantine can fix
# --------------------------------------------------------------------------------------------
def test_missing_user_id_column_is_a_clear_error(storage):
    path = write_events(storage, pa.table({"item_id": [1], "ts": pa.array([at(DAY, 1)])}))
    with pytest.raises(InputError) as err:
        prepare(storage, DAY, PrepareConfig())
    assert path in str(err.value) and "user_id" in str(err.value)


def test_float_user_id_is_a_clear_error(storage):
    path = write_events(
        storage,
        pa.table(
            {"user_id": pa.array([1.0, None]), "item_id": [1, 2], "ts": pa.array([at(DAY, 1), at(DAY, 2)])}
        ),
    )
    with pytest.raises(InputError) as err:
        prepare(storage, DAY, PrepareConfig())
    assert path in str(err.value) and "'user_id'" in str(err.value) and "double" in str(err.value)


def test_list_ts_is_a_clear_error(storage):
    path = write_events(
        storage,
        pa.table({"user_id": [1], "item_id": [1], "ts": pa.array([[epoch(DAY, 1)]], pa.list_(pa.int64()))}),
    )
    with pytest.raises(InputError) as err:
        prepare(storage, DAY, PrepareConfig())
    assert path in str(err.value) and "'ts'" in str(err.value)


def test_bad_file_among_good_ones_is_named(storage):
    write_events(storage, events([1], [1], [at(DAY, 1)], ["view"]), name="part-00000.parquet")
    bad = write_events(
        storage, pa.table({"user_id": [1], "ts": pa.array([at(DAY, 1)])}), name="part-00001.parquet"
    )
    with pytest.raises(InputError) as err:
        prepare(storage, DAY, PrepareConfig())
    assert bad in str(err.value) and "item_id" in str(err.value)


def test_no_input_is_an_input_error(storage):
    with pytest.raises(InputError, match="no events"):
        prepare(storage, DAY, PrepareConfig())
    storage.write_bytes(b"not parquet", "events", f"dt={DAY}", "README.txt")  # a day folder, no parquet
    with pytest.raises(InputError, match="no event files"):
        prepare(storage, DAY, PrepareConfig())
    assert not storage.exists("sequences", f"dt={DAY}", "_SUCCESS")


def test_events_after_the_date_are_not_read(storage):
    write_events(storage, events([1], [1], [at(DAY, 1)], ["view"]), date=DAY)
    write_events(storage, events([1], [2], [at("2024-01-03", 1)], ["view"]), date="2024-01-03")
    report = prepare(storage, DAY, PrepareConfig())
    assert report.rows_read == 1
    assert by_user(storage)[1]["item_ids"] == [1]


def test_mixed_int_and_string_ids_become_strings(storage):
    write_events(
        storage,
        events(pa.array([1], pa.int64()), pa.array([7], pa.int64()), [at(DAY, 1)], ["view"]),
        name="part-00000.parquet",
    )
    write_events(
        storage, events(pa.array(["1"]), pa.array(["x"]), [at(DAY, 2)], ["view"]), name="part-00001.parquet"
    )
    prepare(storage, DAY, PrepareConfig())
    table = read_sequences(storage, DAY)
    assert table.schema.field("user_id").type == pa.string()
    assert by_user(storage)["1"]["item_ids"] == ["7", "x"]


# --------------------------------------------------------------------------------------------
# Sequences: order, ties, truncation
# --------------------------------------------------------------------------------------------
def test_order_ties_and_truncation(storage):
    t = at(DAY, 12)
    table = events(
        ["long"] * 5 + ["tie"] * 3 + ["rev"] * 2,
        ["e3", "e1", "e5", "e2", "e4", "x", "y", "z", "q", "p"],
        [at(DAY, 3), at(DAY, 1), at(DAY, 5), at(DAY, 2), at(DAY, 4), t, t, t, t, t],
        ["view", "click", "cart", "purchase", "view", "view", "view", "view", "view", "view"],
    )
    write_events(storage, table)
    report = prepare(storage, DAY, PrepareConfig(max_len=3))
    assert report.events_truncated == 2
    assert report.rows_kept == 10  # truncation is not rejection
    seqs = by_user(storage)
    assert seqs["long"]["item_ids"] == ["e3", "e4", "e5"]  # newest 3, oldest first
    assert seqs["long"]["event_types"] == ["view", "view", "cart"]  # aligned
    assert [x.astimezone(UTC) for x in seqs["long"]["ts"]] == [at(DAY, 3), at(DAY, 4), at(DAY, 5)]
    assert seqs["tie"]["item_ids"] == ["x", "y", "z"]  # equal ts: input order
    assert seqs["rev"]["item_ids"] == ["q", "p"]
    check_contract(storage)


# --------------------------------------------------------------------------------------------
# Incremental mode and re-runs
# --------------------------------------------------------------------------------------------
D1, D2 = "2024-01-01", "2024-01-02"


def test_incremental_extends_previous_day(storage):
    write_events(
        storage,
        events(
            ["u1", "u1", "u2"], ["a", "b", "c"], [at(D1, 1), at(D1, 2), at(D1, 3)], ["view", "view", "click"]
        ),
        date=D1,
    )
    write_events(
        storage,
        events(
            ["u1", "u2", "u3", "u1"],
            ["c", "d", "a", "b"],
            [at(D2, 1), at(D2, 2), at(D2, 3), at(D1, 2)],  # last: re-sent day-1 event
            ["view", "view", "view", "view"],
        ),
        date=D2,
    )
    config = PrepareConfig()
    first = prepare(storage, D1, config)
    assert (first.mode, first.rows_kept, first.users, first.items) == ("full", 3, 2, 3)
    assert (first.new_users, first.new_items) == (2, 3)

    second = prepare(storage, D2, config)
    assert second.mode == "incremental"
    assert second.rows_read == 4 and second.files_read == 1  # only day 2 is read
    assert second.duplicates_dropped == 1
    assert second.rows_kept == 3
    assert second.reconciles()
    assert (second.users, second.items) == (3, 4)
    assert (second.new_users, second.new_items) == (1, 1)  # u3; d
    seqs = by_user(storage, D2)
    assert seqs["u1"]["item_ids"] == ["a", "b", "c"]
    assert seqs["u2"]["item_ids"] == ["c", "d"]
    assert seqs["u2"]["event_types"] == ["click", "view"]
    assert seqs["u3"]["item_ids"] == ["a"]
    check_contract(storage, D2)
    # Day 1's partition is untouched.
    assert by_user(storage, D1)["u1"]["item_ids"] == ["a", "b"]


def test_incremental_truncates_extended_sequences(storage):
    write_events(
        storage, events(["u"] * 3, ["a", "b", "c"], [at(D1, 1), at(D1, 2), at(D1, 3)], ["view"] * 3), date=D1
    )
    write_events(storage, events(["u"] * 2, ["d", "e"], [at(D2, 1), at(D2, 2)], ["view"] * 2), date=D2)
    prepare(storage, D1, PrepareConfig(max_len=4))
    report = prepare(storage, D2, PrepareConfig(max_len=4))
    assert report.events_truncated == 1
    assert by_user(storage, D2)["u"]["item_ids"] == ["b", "c", "d", "e"]


def test_incremental_without_events_for_the_day_is_an_error(storage):
    write_events(storage, events(["u"], ["a"], [at(D1, 1)], ["view"]), date=D1)
    prepare(storage, D1, PrepareConfig())
    with pytest.raises(InputError, match=D2):
        prepare(storage, D2, PrepareConfig())


def test_rerun_replaces_the_partition(storage):
    write_events(
        storage,
        events(
            ["u1", "u1", "u2", None],
            ["a", "b", "c", "d"],
            [at(DAY, 1), at(DAY, 2), at(DAY, 3), at(DAY, 4)],
            ["view"] * 4,
        ),
    )
    first = prepare(storage, DAY, PrepareConfig())
    before = read_sequences(storage, DAY).sort_by("user_id")
    # A stale part file from an earlier, larger run must not survive.
    storage.write_table(before, "sequences", f"dt={DAY}", "part-00009.parquet")
    storage.write_table(quarantine(storage), "quarantine", f"dt={DAY}", "part-00009.parquet")

    second = prepare(storage, DAY, PrepareConfig())
    after = read_sequences(storage, DAY).sort_by("user_id")
    assert first.as_dict() == second.as_dict()
    assert after.equals(before)
    assert after.num_rows == 2
    assert quarantine(storage).num_rows == 1
    names = [f.rsplit("/", 1)[1] for f in storage.list_files("sequences", f"dt={DAY}")]
    assert "part-00009.parquet" not in names
    assert names == [bucket_file(b) for b in sorted(set(bucket_of(pa.array(["u1", "u2"]), 64)))]

    # Fixing the input and re-running clears the quarantine partition.
    write_events(
        storage,
        events(["u1", "u1", "u2"], ["a", "b", "c"], [at(DAY, 1), at(DAY, 2), at(DAY, 3)], ["view"] * 3),
    )
    third = prepare(storage, DAY, PrepareConfig())
    assert third.rows_quarantined == 0
    assert storage.list_files("quarantine", f"dt={DAY}") == []


def test_rerun_of_incremental_day_is_idempotent(storage):
    write_synthetic(
        storage, SyntheticSpec(num_users=30, num_items=20, mean_events=6, days=2, end_date=D2, bad_rows=5)
    )
    prepare(storage, D1, PrepareConfig())
    a = prepare(storage, D2, PrepareConfig())
    first = read_sequences(storage, D2)
    b = prepare(storage, D2, PrepareConfig())
    assert a.as_dict() == b.as_dict()
    assert read_sequences(storage, D2).equals(first)


def test_synthetic_generator_plants_the_documented_bad_rows():
    events_table, items = generate_events(
        SyntheticSpec(num_users=20, num_items=30, mean_events=6, days=2, end_date=D2, bad_rows=10)
    )
    assert pc.sum(pc.is_null(events_table["user_id"])).as_py() == 2
    assert pc.sum(pc.is_null(events_table["item_id"])).as_py() == 2
    assert items.num_rows == 30


# --------------------------------------------------------------------------------------------
# Buckets, tasks and layouts
# --------------------------------------------------------------------------------------------
def test_bucket_of_is_stable_and_spreads_users():
    # Pinned: yesterday's files are read bucket by bucket, so the hash must never change silently.
    assert bucket_of(pa.array([1, 2, 3, 10**12], pa.int64()), 64).tolist() == [1, 14, 45, 56]
    assert bucket_of(pa.array(["u1", "u2", "", "ünï"]), 64).tolist() == [31, 59, 48, 41]
    spread = np.bincount(bucket_of(pa.array(np.arange(64_000)), 64), minlength=64)
    assert spread.min() > 800 and spread.max() < 1200
    chunked = pa.chunked_array([pa.array(["a", "b"]), pa.array(["a"])])
    assert bucket_of(chunked, 8)[0] == bucket_of(chunked, 8)[2]


def _result(storage: Storage, date: str) -> tuple[pa.Table, pa.Table | None]:
    q = storage.list_files("quarantine", f"dt={date}", suffix=".parquet")
    return read_sequences(storage, date).sort_by("user_id"), quarantine(storage, date) if q else None


def test_small_tasks_and_bucket_counts_give_the_same_result(tmp_path):
    """Row groups split over many phase-1 tasks, and any bucket count, give the same sequences,
    quarantine (in input order) and counts."""
    table, _ = generate_events(
        SyntheticSpec(num_users=60, num_items=40, mean_events=8, days=1, end_date=DAY, bad_rows=12)
    )
    results = []
    for i, (buckets, rows_per_task) in enumerate([(1, 1_000_000), (5, 25), (64, 100)]):
        storage = Storage(str(tmp_path / f"r{i}"))
        storage.filesystem.create_dir(storage.path("events", f"dt={DAY}"), recursive=True)
        pq.write_table(
            table.drop_columns(["dt"]) if "dt" in table.column_names else table,
            storage.path("events", f"dt={DAY}", "part-00000.parquet"),
            row_group_size=20,
        )
        report = prepare(storage, DAY, PrepareConfig(buckets=buckets, rows_per_task=rows_per_task))
        assert report.reconciles() and report.buckets == buckets and report.nodes == 1
        results.append((report, *_result(storage, DAY)))
        users = read_sequences(storage, DAY)["user_id"]
        assert len(storage.list_files("sequences", f"dt={DAY}")) == len(set(bucket_of(users, buckets)))
    for report, sequences, quarantined in results[1:]:
        assert {k: v for k, v in report.as_dict().items() if k != "buckets"} == {
            k: v for k, v in results[0][0].as_dict().items() if k != "buckets"
        }
        assert sequences.equals(results[0][1])
        assert quarantined.drop_columns(["source_file"]).equals(results[0][2].drop_columns(["source_file"]))


def test_previous_day_in_another_layout_is_rebucketed(tmp_path):
    """Yesterday written unbucketed (the old layout) or with another bucket count: re-bucketed in
    phase 1, then written in the new layout; the result equals a full rebuild."""
    full = Storage(str(tmp_path / "full"))
    write_synthetic(full, SPEC)
    prepare(full, "2024-01-03", PrepareConfig(max_len=500, incremental=False, buckets=8))
    expected = read_sequences(full, "2024-01-03").sort_by("user_id")
    for name, first_buckets, old_layout in (("old", 8, True), ("other", 3, False)):
        storage = Storage(str(tmp_path / name))
        write_synthetic(storage, SPEC)
        prepare(storage, "2024-01-01", PrepareConfig(max_len=500, buckets=first_buckets))
        prepare(storage, "2024-01-02", PrepareConfig(max_len=500, buckets=first_buckets))
        if old_layout:  # as seqrec wrote it before buckets: part files and a manifest without a layout
            old = read_sequences(storage, "2024-01-02")
            manifest = storage.read_json("sequences", "dt=2024-01-02", "_SUCCESS")
            storage.delete_dir("sequences", "dt=2024-01-02")
            storage.write_table(
                old.slice(0, 40), "sequences", "dt=2024-01-02", "part-00000.parquet", row_group_size=16
            )
            storage.write_table(old.slice(40), "sequences", "dt=2024-01-02", "part-00001.parquet")
            storage.write_json(
                {k: v for k, v in manifest.items() if k not in ("layout", "buckets")},
                "sequences",
                "dt=2024-01-02",
                "_SUCCESS",
            )
        report = prepare(storage, "2024-01-03", PrepareConfig(max_len=500, buckets=8))
        assert report.mode == "incremental" and report.reconciles()
        assert read_sequences(storage, "2024-01-03").sort_by("user_id").equals(expected)
        names = {f.rsplit("/", 1)[1] for f in storage.list_files("sequences", "dt=2024-01-03")}
        assert names <= {bucket_file(b) for b in range(8)} and len(names) == 8
        assert storage.read_json("sequences", "dt=2024-01-03", "_SUCCESS")["buckets"] == 8


def test_reconciliation_refuses_to_finish(storage):
    """A task that miscounts: the stage raises and the date's earlier partition stays as it was."""
    write_events(
        storage,
        events(["u1", "u2", "u2"], ["a", "b", "b"], [at(DAY, 1), at(DAY, 2), at(DAY, 2)], ["view"] * 3),
    )
    prepare(storage, DAY, PrepareConfig())
    before = read_sequences(storage, DAY).sort_by("user_id")

    def miscount(task):
        result = merge_bucket(task)
        result.rows_kept += 1
        return result

    with pytest.raises(AssertionError, match="does not reconcile"):
        prepare(storage, DAY, PrepareConfig(), merge=miscount)
    assert storage.exists("sequences", f"dt={DAY}", "_SUCCESS")
    assert read_sequences(storage, DAY).sort_by("user_id").equals(before)
    assert not storage.list_dirs("sequences", "_staging", f"dt={DAY}")  # staged outputs cleaned up


# --------------------------------------------------------------------------------------------
# Unreadable files (issue 18)
# --------------------------------------------------------------------------------------------
def _truncated(storage: Storage, name: str) -> str:
    good = write_events(
        storage, events([7, 8], [1, 2], [at(DAY, 1), at(DAY, 2)], ["view", "view"]), name=name
    )
    data = storage.read_bytes("events", f"dt={DAY}", name)
    storage.write_bytes(data[: len(data) // 2], "events", f"dt={DAY}", name)  # an upload cut short
    return good


def test_truncated_file_fails_naming_it(storage):
    write_events(storage, events([1], [1], [at(DAY, 1)], ["view"]), name="part-00000.parquet")
    bad = _truncated(storage, "part-00001.parquet")
    with pytest.raises(InputError) as err:
        prepare(storage, DAY, PrepareConfig())
    assert bad in str(err.value) and "bad_files=quarantine" in str(err.value)
    assert not storage.exists("sequences", f"dt={DAY}", "_SUCCESS")


def test_truncated_file_is_quarantined_when_configured(storage):
    write_events(
        storage,
        events([1, None], [1, 2], [at(DAY, 1), at(DAY, 2)], ["view", "view"]),
        name="part-00000.parquet",
    )
    bad = _truncated(storage, "part-00001.parquet")
    report = prepare(storage, DAY, PrepareConfig(bad_files="quarantine"))
    assert (report.files_read, report.files_quarantined) == (1, 1)
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (2, 1, 1)
    assert report.reconciles()
    assert set(by_user(storage)) == {1}
    assert not storage.exists("events", f"dt={DAY}", "part-00001.parquet")  # moved aside
    assert storage.exists("quarantine", f"dt={DAY}", "_files", DAY, "part-00001.parquet")
    reason = storage.read_json("quarantine", f"dt={DAY}", "_files", DAY, "part-00001.parquet.reason.json")
    assert reason["file"] == bad and "magic bytes" in reason["reason"]
    assert quarantine(storage)["reason"].to_pylist() == ["user_id missing or empty"]  # row tables still read
    assert storage.read_json("sequences", f"dt={DAY}", "_SUCCESS")["files_quarantined"] == 1
    # The next run no longer sees the file, and keeps what was moved aside.
    again = prepare(storage, DAY, PrepareConfig(bad_files="quarantine"))
    assert again.files_quarantined == 0 and again.rows_read == 2
    assert storage.exists("quarantine", f"dt={DAY}", "_files", DAY, "part-00001.parquet")


def test_corrupt_pages_behind_a_valid_footer(storage):
    write_events(storage, events([1], [1], [at(DAY, 1)], ["view"]), name="part-00000.parquet")
    name = "part-00001.parquet"
    write_events(
        storage, events(list(range(500)), list(range(500)), [at(DAY, 3)] * 500, ["view"] * 500), name=name
    )
    data = bytearray(storage.read_bytes("events", f"dt={DAY}", name))
    data[4 : len(data) // 2] = b"\xff" * (len(data) // 2 - 4)  # pages garbled, footer intact
    storage.write_bytes(bytes(data), "events", f"dt={DAY}", name)
    with pytest.raises(InputError, match=name):
        prepare(storage, DAY, PrepareConfig())
    report = prepare(storage, DAY, PrepareConfig(bad_files="quarantine"))
    assert (report.files_quarantined, report.rows_read, report.rows_kept) == (1, 1, 1)
