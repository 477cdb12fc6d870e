"""seqrec.publish: the Delta table (one commit per night, read by DuckDB, Polars and pyarrow, locally
and on S3; history, rollback, crash clean-up) and the plain-Parquet format (_SUCCESS last)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.config import PublishConfig
from seqrec.publish import (
    SUCCESS,
    PublishError,
    history,
    open_table,
    publish_partition,
    publish_recommendations,
    published_dates,
    read_partition,
    read_recommendations,
    rollback,
)
from seqrec.storage import Storage
from seqrec.testing.readers import duckdb_connection, duckdb_count, polars_frame

DATE = "2024-01-02"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path) -> Storage:
    """The same tests on a local root and on the SeaweedFS S3 server."""
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    return Storage(request.getfixturevalue("s3_root"))


def rows(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(range(start, start + n), pa.int64()),
            "items": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64())),
        }
    )


def writer(storage: Storage, parts: list[pa.Table], crash_after: int | None = None):
    """A write callback that checks _SUCCESS is absent while it writes; optionally crashes midway."""
    calls = []

    def write(directory: str) -> None:
        calls.append(directory)
        assert directory == storage.path("recommendations", f"dt={DATE}")
        for i, part in enumerate(parts):
            assert not os.path.exists(os.path.join(directory, SUCCESS)), "_SUCCESS present while writing"
            os.makedirs(directory, exist_ok=True)
            pq.write_table(part, os.path.join(directory, f"part-{i:05d}.parquet"))
            if crash_after is not None and i + 1 == crash_after:
                raise RuntimeError("worker died")

    write.calls = calls
    return write


def test_publish_writes_success_last_with_manifest(storage):
    parts = [rows(0, 3), rows(3, 4), rows(7, 0)]
    write = writer(storage, parts)
    manifest = publish_partition(storage, "recommendations", DATE, write, {"model_version": "v1", "k": 10})
    assert len(write.calls) == 1
    assert manifest["rows"] == 7
    assert manifest["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["model_version"] == "v1" and manifest["k"] == 10
    assert "finished_at" in manifest
    assert storage.read_json("recommendations", f"dt={DATE}", SUCCESS) == manifest

    table = read_partition(storage, "recommendations", DATE)
    assert table.num_rows == 7
    assert table["user_id"].to_pylist() == list(range(7))
    assert published_dates(storage, "recommendations") == [DATE]


def test_crashed_writer_leaves_no_success_and_readers_see_nothing(storage):
    publish_partition(
        storage, "recommendations", DATE, writer(storage, [rows(0, 5)]), {"model_version": "v1"}
    )
    assert read_partition(storage, "recommendations", DATE).num_rows == 5

    with pytest.raises(RuntimeError, match="worker died"):
        publish_partition(
            storage,
            "recommendations",
            DATE,
            writer(storage, [rows(0, 2), rows(2, 2), rows(4, 2)], crash_after=2),
            {"model_version": "v2"},
        )
    assert not storage.exists("recommendations", f"dt={DATE}", SUCCESS)
    assert (
        len(storage.list_files("recommendations", f"dt={DATE}", suffix=".parquet")) == 2
    )  # half a night on disk
    assert read_partition(storage, "recommendations", DATE) is None  # ... that nobody reads
    assert published_dates(storage, "recommendations") == []


def test_partition_without_success_reads_as_absent(storage):
    assert read_partition(storage, "recommendations", DATE) is None
    storage.write_table(rows(0, 3), "recommendations", f"dt={DATE}", "part-00000.parquet")
    assert read_partition(storage, "recommendations", DATE) is None
    assert published_dates(storage, "recommendations") == []


def test_republish_replaces_the_whole_partition(storage):
    publish_partition(
        storage, "recommendations", DATE, writer(storage, [rows(0, 3), rows(3, 3), rows(6, 3)]), {}
    )
    second = publish_partition(storage, "recommendations", DATE, writer(storage, [rows(100, 2)]), {"run": 2})
    files = storage.list_files("recommendations", f"dt={DATE}")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet"]
    assert second["rows"] == 2 and second["files"] == ["part-00000.parquet"] and second["run"] == 2
    assert read_partition(storage, "recommendations", DATE)["user_id"].to_pylist() == [100, 101]


def test_republish_yields_the_same_rows(storage):
    first = publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 4)]), {"v": 1})
    a = read_partition(storage, "recommendations", DATE)
    second = publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 4)]), {"v": 1})
    assert read_partition(storage, "recommendations", DATE).equals(a)
    assert {k: v for k, v in first.items() if k != "finished_at"} == {
        k: v for k, v in second.items() if k != "finished_at"
    }


def test_readers_use_only_the_files_in_the_manifest(storage):
    publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 3)]), {})
    storage.write_table(rows(50, 9), "recommendations", f"dt={DATE}", "part-00099.parquet")  # a straggler
    assert read_partition(storage, "recommendations", DATE).num_rows == 3


def test_published_dates_lists_only_complete_partitions(storage):
    for date in ("2024-01-01", "2024-01-03"):
        publish_partition(
            storage,
            "recommendations",
            date,
            lambda d: (
                os.makedirs(d, exist_ok=True),
                pq.write_table(rows(0, 1), os.path.join(d, "part-00000.parquet")),
            ),
            {},
        )
    storage.write_table(rows(0, 1), "recommendations", "dt=2024-01-02", "part-00000.parquet")  # no _SUCCESS
    storage.write_bytes(b"{}", "recommendations", "notes", SUCCESS)  # not a dt= folder
    assert published_dates(storage, "recommendations") == ["2024-01-01", "2024-01-03"]
    assert published_dates(storage, "nothing-here") == []


def test_empty_partition_publishes_zero_rows(storage):
    manifest = publish_partition(storage, "recommendations", DATE, lambda d: None, {})
    assert manifest["rows"] == 0 and manifest["files"] == []
    assert storage.exists("recommendations", f"dt={DATE}", SUCCESS)
    assert published_dates(storage, "recommendations") == [DATE]


# =============================================================================================
# The Delta table
# =============================================================================================
def night(start: int, n: int, tag: str) -> pa.Table:
    """Rows with the published columns (without dt), every row tagged with ``tag`` as model version."""
    return pa.table(
        {
            "user_id": pa.array(range(start, start + n), pa.int64()),
            "items": pa.array([[start + i, start + i + 1] for i in range(n)], pa.list_(pa.int64())),
            "scores": pa.array([[1.0, 0.5]] * n, pa.list_(pa.float32())),
            "source": pa.array(["model"] * n, pa.string()),
            "model_version": pa.array([tag] * n, pa.string()),
            "generated_at": pa.array([1_700_000_000_000_000] * n, pa.timestamp("us", tz="UTC")),
        }
    )


def files_writer(storage: Storage, parts: list[pa.Table]):
    """A write callback like Ray Data's write_parquet: one uniquely named file per part."""

    def write(directory: str) -> None:
        storage.filesystem.create_dir(directory, recursive=True)
        for part in parts:
            pq.write_table(part, f"{directory}/{uuid.uuid4().hex}.parquet", filesystem=storage.filesystem)

    return write


def publish(storage: Storage, date: str, parts: list[pa.Table], tag: str) -> object:
    return publish_recommendations(storage, date, files_writer(storage, parts), {"model_version": tag})


def test_delta_table_reads_the_same_in_duckdb_polars_and_pyarrow(any_storage):
    storage = any_storage
    storage.ensure_bucket()
    publish(storage, "2024-01-01", [night(0, 3, "v1")], "v1")
    publish(storage, DATE, [night(0, 4, "v1"), night(4, 2, "v1")], "v1")
    snapshot = publish(storage, DATE, [night(100, 5, "v2")], "v2")
    assert snapshot.version == 2 and snapshot.rows == 5

    ours = read_recommendations(storage, DATE)
    assert ours.column_names == ["user_id", "items", "scores", "source", "model_version", "generated_at"]
    assert ours.sort_by("user_id")["user_id"].to_pylist() == list(range(100, 105))
    con = duckdb_connection(storage)
    assert duckdb_count(con, storage, DATE) == (5, ["v2"])
    assert duckdb_count(con, storage, "2024-01-01") == (3, ["v1"])
    duck = con.execute(
        f"SELECT user_id, items FROM delta_scan('{storage.uri('recommendations')}') "
        f"WHERE dt = '{DATE}' ORDER BY user_id"
    ).fetchall()
    assert duck == list(
        zip(ours.sort_by("user_id")["user_id"].to_pylist(), ours.sort_by("user_id")["items"].to_pylist())
    )
    frame = polars_frame(storage, DATE)
    assert sorted(frame["user_id"].to_list()) == list(range(100, 105))
    dataset = open_table(storage).to_pyarrow_dataset()
    assert dataset.to_table(filter=pa.compute.field("dt") == "2024-01-01").num_rows == 3
    assert published_dates(storage) == ["2024-01-01", DATE]
    # The files of the replaced night are still there (history) but no reader counts them.
    assert len(storage.list_files("recommendations", f"dt={DATE}", suffix=".parquet")) == 3


def test_commit_records_model_input_rows_and_timings(storage):
    publish_recommendations(
        storage,
        DATE,
        files_writer(storage, [night(0, 4, "v1")]),
        {
            "model_version": "v1",
            "input": "sequences/dt=2024-01-02",
            "input_snapshot": {"users": 4},
            "started_at": "2024-01-03T02:30:00+00:00",
        },
    )
    (commit,) = history(storage, DATE)
    assert commit["version"] == 0 and commit["operation"] == "publish"
    assert commit["model_version"] == "v1" and commit["rows"] == 4 and commit["files"] == 1
    assert commit["input_snapshot"] == {"users": 4} and commit["started_at"].startswith("2024-01-03")
    assert commit["write_s"] >= 0 and "committed_at" in commit
    # Spark's DESCRIBE HISTORY shows userMetadata: the same record as JSON.
    raw = open_table(storage).history()[0]
    assert raw["userMetadata"] and '"model_version": "v1"' in raw["userMetadata"]


def test_as_of_reads_an_earlier_snapshot_by_version_and_time(storage):
    publish(storage, DATE, [night(0, 3, "v1")], "v1")
    first_time = open_table(storage).history()[0]["timestamp"]
    time.sleep(0.05)
    publish(storage, DATE, [night(10, 4, "v2")], "v2")
    assert read_recommendations(storage, DATE)["model_version"].unique().to_pylist() == ["v2"]
    assert read_recommendations(storage, DATE, as_of=0)["model_version"].unique().to_pylist() == ["v1"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(first_time / 1000)) + f".{first_time % 1000:03d}Z"
    assert read_recommendations(storage, DATE, as_of=stamp).num_rows == 3


def test_rollback_restores_the_previous_rows_exactly(any_storage):
    storage = any_storage
    publish(storage, "2024-01-01", [night(0, 2, "v1")], "v1")
    publish(storage, DATE, [night(0, 3, "v1"), night(3, 3, "v1")], "v1")
    good = read_recommendations(storage, DATE).sort_by("user_id")
    publish(storage, DATE, [night(50, 9, "bad")], "bad")
    publish(storage, "2024-01-01", [night(0, 7, "v3")], "v3")  # another date moves on meanwhile
    restored = rollback(storage, DATE)
    assert restored.rows == 6 and restored.metadata["restored_version"] == 1
    assert read_recommendations(storage, DATE).sort_by("user_id").equals(good)
    assert read_recommendations(storage, "2024-01-01").num_rows == 7  # untouched
    assert duckdb_count(duckdb_connection(storage), storage, DATE) == (6, ["v1"])
    assert [c["operation"] for c in history(storage, DATE)] == ["rollback", "publish", "publish"]
    rollback(storage, DATE)  # a second rollback undoes the first
    assert read_recommendations(storage, DATE)["model_version"].unique().to_pylist() == ["bad"]


def test_rollback_of_a_first_night_empties_it_and_nothing_to_roll_back_is_an_error(storage):
    with pytest.raises(PublishError, match="nothing to roll back"):
        rollback(storage, DATE)
    publish(storage, DATE, [night(0, 3, "v1")], "v1")
    assert rollback(storage, DATE).rows == 0
    assert read_recommendations(storage, DATE) is None


def test_reader_polling_during_republish_sees_old_or_new_never_mix_or_nothing(any_storage):
    """DuckDB polls the date while it is re-published again and again: each look sees one whole night."""
    storage = any_storage
    old, new = [night(0, 100, "old"), night(100, 100, "old"), night(200, 100, "old")], [night(0, 250, "new")]
    publish(storage, DATE, old, "old")
    publish(storage, "2024-01-01", [night(0, 5, "other")], "other")
    done = threading.Event()
    seen: list[tuple[int, list[str]]] = []

    def poll() -> None:
        con = duckdb_connection(storage)
        while not done.is_set():
            seen.append(duckdb_count(con, storage, DATE))

    reader = threading.Thread(target=poll)
    reader.start()
    publishes = 0
    try:
        while publishes < 6 or (len(seen) < 30 and publishes < 40):
            publish(storage, DATE, new if publishes % 2 == 0 else old, "new" if publishes % 2 == 0 else "old")
            publishes += 1
    finally:
        done.set()
        reader.join(timeout=60)
    print(f"{len(seen)} reads during {publishes} re-publishes: {sorted(set(map(str, seen)))}")
    assert len(seen) >= 6
    assert set(map(tuple, [(n, tuple(v)) for n, v in seen])) <= {(300, ("old",)), (250, ("new",))}
    assert {n for n, _ in seen} == {300, 250}, "the reader should have seen both nights"


_KILLED_PUBLISH = textwrap.dedent("""
    import os, signal, sys, uuid
    import pyarrow as pa, pyarrow.parquet as pq
    from seqrec.publish import publish_recommendations
    from seqrec.storage import Storage

    storage = Storage(sys.argv[1])
    def write_then_die(directory):
        storage.filesystem.create_dir(directory, recursive=True)
        for start in (0, 1000):
            table = pa.table({"user_id": pa.array(range(start, start + 10), pa.int64())})
            pq.write_table(table, f"{directory}/{uuid.uuid4().hex}.parquet", filesystem=storage.filesystem)
        os.kill(os.getpid(), signal.SIGKILL)     # the files are written; the commit never happens
    publish_recommendations(storage, sys.argv[2], write_then_die, {"model_version": "crashed"})
""")


def test_publish_killed_before_commit_keeps_the_previous_snapshot_and_next_run_cleans_up(any_storage):
    storage = any_storage
    publish(storage, DATE, [night(0, 4, "v1")], "v1")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_PUBLISH, storage.root, DATE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    files = storage.list_files("recommendations", f"dt={DATE}", suffix=".parquet")
    assert len(files) == 3  # 1 committed + 2 orphans
    assert duckdb_count(duckdb_connection(storage), storage, DATE) == (4, ["v1"])
    shown = subprocess.run(
        [sys.executable, "-m", "seqrec.cli", "show", "--root", storage.root, "--date", DATE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and f"recommendations for {DATE}: 4 users" in shown.stdout, shown.stderr[
        -2000:
    ]

    publish(storage, DATE, [night(10, 6, "v2")], "v2")  # the next run
    assert duckdb_count(duckdb_connection(storage), storage, DATE) == (6, ["v2"])
    left = {
        f.rsplit("/", 1)[1] for f in storage.list_files("recommendations", f"dt={DATE}", suffix=".parquet")
    }
    committed = {p.rsplit("/", 1)[1] for p in open_table(storage).file_uris()}
    assert len(left) == 2 and committed <= left  # orphans gone, v1's file kept as history
    assert read_recommendations(storage, DATE, as_of=0)["model_version"].unique().to_pylist() == ["v1"]


def test_parquet_format_keeps_the_plain_layout_and_formats_do_not_mix(tmp_path):
    plain = Storage(str(tmp_path / "plain"))
    config = PublishConfig(format="parquet")
    snapshot = publish_recommendations(
        plain, DATE, files_writer(plain, [night(0, 3, "v1")]), {"model_version": "v1"}, config
    )
    assert snapshot.version is None and snapshot.rows == 3
    assert plain.exists("recommendations", f"dt={DATE}", SUCCESS)
    assert read_recommendations(plain, DATE).num_rows == 3
    with pytest.raises(PublishError, match="plain-Parquet"):
        publish(plain, DATE, [night(0, 3, "v1")], "v1")
    with pytest.raises(PublishError, match="needs a Delta table"):
        read_recommendations(plain, DATE, as_of=0)

    delta = Storage(str(tmp_path / "delta"))
    publish(delta, DATE, [night(0, 3, "v1")], "v1")
    with pytest.raises(PublishError, match="is a Delta table"):
        publish_recommendations(delta, DATE, files_writer(delta, [night(0, 3, "v1")]), {}, config)


def test_cli_show_as_of_history_and_rollback(storage, capsys):
    from seqrec.cli import main

    publish(storage, DATE, [night(0, 3, "v1")], "v1")
    publish(storage, DATE, [night(0, 5, "v2")], "v2")
    assert main(["show", "--root", storage.root, "--date", DATE, "--history", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        f"recommendations for {DATE}: 5 users" in out and "version 1: publish" in out and "version 0" in out
    )
    assert main(["show", "--root", storage.root, "--date", DATE, "--as-of", "0"]) == 0
    assert f"recommendations for {DATE}: 3 users" in capsys.readouterr().out
    assert main(["rollback", "--root", storage.root, "--date", DATE]) == 0
    assert "rolled 2024-01-02 back to the rows of version 0: 3 rows, now version 2" in capsys.readouterr().out
    assert read_recommendations(storage, DATE)["model_version"].unique().to_pylist() == ["v1"]
    assert main(["rollback", "--root", storage.root, "--date", "2030-01-01"]) == 2
    assert capsys.readouterr().err.strip().endswith("nothing to roll back")
