"""seqrec.publish: _SUCCESS last, whole-partition replacement, readers never see half a night."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.publish import SUCCESS, publish_partition, published_dates, read_partition
from seqrec.storage import Storage

DATE = "2024-01-02"


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


def rows(start: int, n: int) -> pa.Table:
    return pa.table({"user_id": pa.array(range(start, start + n), pa.int64()),
                     "items": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64()))})


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
    publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 5)]), {"model_version": "v1"})
    assert read_partition(storage, "recommendations", DATE).num_rows == 5

    with pytest.raises(RuntimeError, match="worker died"):
        publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 2), rows(2, 2), rows(4, 2)],
                                                                   crash_after=2), {"model_version": "v2"})
    assert not storage.exists("recommendations", f"dt={DATE}", SUCCESS)
    assert len(storage.list_files("recommendations", f"dt={DATE}", suffix=".parquet")) == 2  # half a night on disk
    assert read_partition(storage, "recommendations", DATE) is None                        # ... that nobody reads
    assert published_dates(storage, "recommendations") == []


def test_partition_without_success_reads_as_absent(storage):
    assert read_partition(storage, "recommendations", DATE) is None
    storage.write_table(rows(0, 3), "recommendations", f"dt={DATE}", "part-00000.parquet")
    assert read_partition(storage, "recommendations", DATE) is None
    assert published_dates(storage, "recommendations") == []


def test_republish_replaces_the_whole_partition(storage):
    publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 3), rows(3, 3), rows(6, 3)]), {})
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
    assert {k: v for k, v in first.items() if k != "finished_at"} == \
           {k: v for k, v in second.items() if k != "finished_at"}


def test_readers_use_only_the_files_in_the_manifest(storage):
    publish_partition(storage, "recommendations", DATE, writer(storage, [rows(0, 3)]), {})
    storage.write_table(rows(50, 9), "recommendations", f"dt={DATE}", "part-00099.parquet")  # a straggler
    assert read_partition(storage, "recommendations", DATE).num_rows == 3


def test_published_dates_lists_only_complete_partitions(storage):
    for date in ("2024-01-01", "2024-01-03"):
        publish_partition(storage, "recommendations", date, lambda d: (os.makedirs(d, exist_ok=True),
                          pq.write_table(rows(0, 1), os.path.join(d, "part-00000.parquet"))), {})
    storage.write_table(rows(0, 1), "recommendations", "dt=2024-01-02", "part-00000.parquet")  # no _SUCCESS
    storage.write_bytes(b"{}", "recommendations", "notes", SUCCESS)                              # not a dt= folder
    assert published_dates(storage, "recommendations") == ["2024-01-01", "2024-01-03"]
    assert published_dates(storage, "nothing-here") == []


def test_empty_partition_publishes_zero_rows(storage):
    manifest = publish_partition(storage, "recommendations", DATE, lambda d: None, {})
    assert manifest["rows"] == 0 and manifest["files"] == []
    assert storage.exists("recommendations", f"dt={DATE}", SUCCESS)
    assert published_dates(storage, "recommendations") == [DATE]
