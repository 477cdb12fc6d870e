"""seqrec.storage.Storage on a local directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from seqrec.storage import Storage, retry, s3_endpoint
from seqrec.testing.s3server import S3Server


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


@pytest.fixture
def storage(root) -> Storage:
    return Storage(root)


def _table(n: int = 10) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(range(n), pa.int64()),
            "items": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
            "date": pa.array(["2026-01-01" if i % 2 else "2026-01-02" for i in range(n)]),
        }
    )


def test_kind_and_uri(storage, root):
    assert storage.is_s3 == root.startswith("s3://")
    uri = storage.uri("a", "b.json")
    assert uri.endswith("/a/b.json")
    assert uri.startswith("s3://") == storage.is_s3
    if storage.is_s3:
        assert storage.path("x") == root[len("s3://") :] + "/x"


def test_json_round_trip(storage):
    obj = {"b": [1, 2, 3], "a": {"nested": True}, "s": "ü"}
    storage.write_json(obj, "meta", "run.json")
    assert storage.read_json("meta", "run.json") == obj
    storage.write_json({"v": 2}, "meta", "run.json")  # overwrite
    assert storage.read_json("meta/run.json") == {"v": 2}


def test_bytes_round_trip_and_exists(storage):
    assert not storage.exists("blob.bin")
    storage.write_bytes(b"\x00\x01payload", "blob.bin")
    assert storage.exists("blob.bin")
    assert storage.read_bytes("blob.bin") == b"\x00\x01payload"
    storage.delete_file("blob.bin")
    assert not storage.exists("blob.bin")


def test_read_missing_raises_file_not_found_without_retrying(storage):
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("does", "not", "exist.json")
    assert time.monotonic() - t0 < 2.0, "a missing object must not be retried with backoff"


def test_parquet_round_trip(storage):
    table = _table()
    storage.write_table(table, "tables", "seq.parquet")
    assert storage.read_table("tables", "seq.parquet").equals(table)
    cols = storage.read_table("tables", "seq.parquet", columns=["user_id"])
    assert cols.column_names == ["user_id"]
    assert cols.num_rows == 10


def test_list_files_ignores_markers_and_hidden(storage):
    for name in [
        "part-0.parquet",
        "part-1.parquet",
        "_SUCCESS",
        ".hidden",
        "sub/part-2.parquet",
        "notes.txt",
    ]:
        storage.write_bytes(b"x", "out", name)
    files = storage.list_files("out")
    base = storage.path("out")
    assert files == sorted(
        f"{base}/{n}" for n in ["notes.txt", "part-0.parquet", "part-1.parquet", "sub/part-2.parquet"]
    )
    assert storage.list_files("out", suffix=".parquet") == [f for f in files if f.endswith(".parquet")]
    assert storage.list_files("nothing-here") == []
    assert storage.list_dirs("out") == ["sub"]


def test_delete_dir(storage):
    storage.write_bytes(b"1", "d", "a.bin")
    storage.write_bytes(b"2", "d", "deep", "b.bin")
    storage.write_bytes(b"3", "keep", "c.bin")
    assert storage.exists("d")
    storage.delete_dir("d")
    assert not storage.exists("d")
    assert storage.list_files("d") == []
    assert storage.read_bytes("keep", "c.bin") == b"3"
    storage.delete_dir("d")  # deleting what is gone is not an error


def test_upload_download_round_trip(storage, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"d": 8}')
    (src / "weights.bin").write_bytes(bytes(range(256)) * 100)
    (src / "sub" / "vocab.txt").write_text("a\nb\n")

    storage.upload_dir(src, "artifacts/model")
    listed = storage.list_files("artifacts/model")
    assert [p.rsplit("/model/", 1)[1] for p in listed] == ["config.json", "sub/vocab.txt", "weights.bin"]

    got = storage.download_dir("artifacts/model", tmp_path / "download")
    for rel in ["config.json", "weights.bin", "sub/vocab.txt"]:
        assert (got / rel).read_bytes() == (src / rel).read_bytes(), rel


def test_hive_partitioned_dataset(storage):
    table = _table(20)
    base = storage.path("events")
    pads.write_dataset(
        table,
        base,
        filesystem=storage.filesystem,
        format="parquet",
        partitioning=["date"],
        partitioning_flavor="hive",
        existing_data_behavior="overwrite_or_ignore",
    )
    assert storage.list_dirs("events") == ["date=2026-01-01", "date=2026-01-02"]
    assert len(storage.list_files("events", suffix=".parquet")) == 2

    dataset = pads.dataset(base, filesystem=storage.filesystem, format="parquet", partitioning="hive")
    got = dataset.to_table().sort_by("user_id")
    assert got.num_rows == 20
    assert got.column("user_id").to_pylist() == list(range(20))
    assert set(got.column("date").to_pylist()) == {"2026-01-01", "2026-01-02"}
    one_day = dataset.to_table(filter=pads.field("date") == "2026-01-01")
    assert one_day.num_rows == 10

    via_pq = pq.read_table(base, filesystem=storage.filesystem, partitioning="hive")
    assert via_pq.num_rows == 20
    assert via_pq.select(["user_id", "items"]).sort_by("user_id").equals(table.select(["user_id", "items"]))


def test_pickles_by_root(storage):
    import pickle

    storage.write_json({"k": 1}, "p.json")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.root == storage.root
    assert clone.read_json("p.json") == {"k": 1}


# -- roots that must be refused --------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, hint",
    [
        ("ftp://x", "s3://bucket/prefix"),
        ("gs://bucket/prefix", "s3://bucket/prefix"),
        ("s3://", "names no bucket"),
        ("s3:///prefix-only", "names no bucket"),
    ],
)
def test_bad_roots_raise_value_error(bad, hint):
    with pytest.raises(ValueError, match=hint) as info:
        Storage(bad)
    assert bad in str(info.value)


def test_s3_endpoint_from_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    assert s3_endpoint() == "http://a:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://b:2")
    assert s3_endpoint() == "http://b:2"


def test_retry_gives_up_with_context_and_does_not_retry_missing_files():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, first_delay_s=0.01) == "ok" and len(calls) == 3

    with pytest.raises(OSError, match="'thing' failed after 2 attempts"):
        retry(
            lambda: (_ for _ in ()).throw(TimeoutError("slow")), attempts=2, first_delay_s=0.01, what="thing"
        )

    missing = []
    with pytest.raises(FileNotFoundError):
        retry(lambda: missing.append(1) or (_ for _ in ()).throw(FileNotFoundError("x")), first_delay_s=0.01)
    assert len(missing) == 1


# -- the S3 server fails under a running job ---------------------------------------------------


@pytest.fixture(scope="module")
def fault_server():
    """A server of its own: restarting it must not disturb the session-wide one."""
    with S3Server() as server:
        yield server


@pytest.fixture
def fault_storage(fault_server, monkeypatch) -> Storage:
    for key, value in fault_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = fault_server.create_bucket(f"fault-{time.monotonic_ns() % 10**12}")
    return Storage(f"s3://{bucket}/run")


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_survives_server_restart(fault_server, fault_storage, kill):
    fault_storage.write_json({"epoch": 1}, "state.json")
    fault_storage.write_table(_table(), "t.parquet")
    port = fault_server.port
    fault_server.restart(kill=kill)
    assert fault_server.port == port, "restart must keep the endpoint"
    # Same Storage object, same pyarrow S3FileSystem (its connections died with the server).
    assert fault_storage.read_json("state.json") == {"epoch": 1}
    assert fault_storage.read_table("t.parquet").equals(_table())
    fault_storage.write_json({"epoch": 2}, "state.json")
    assert fault_storage.read_json("state.json") == {"epoch": 2}


def test_survives_server_down_during_calls(fault_server, fault_storage):
    """The server is down when the call starts and comes back ~2 s later: retries bridge the gap."""
    fault_storage.write_json({"ok": True}, "before.json")
    fault_server.stop()
    errors: list[BaseException] = []

    def bring_back():
        try:
            time.sleep(2.0)
            fault_server.start()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=bring_back)
    thread.start()
    try:
        t0 = time.monotonic()
        assert fault_storage.read_json("before.json") == {"ok": True}
        fault_storage.write_json({"after": True}, "after.json")
        waited = time.monotonic() - t0
    finally:
        thread.join()
    assert not errors, errors
    assert fault_storage.read_json("after.json") == {"after": True}
    assert waited >= 1.0  # the first call really did wait for the server


def test_server_rejects_wrong_credentials(fault_server):
    bucket = fault_server.create_bucket("creds-check")
    bad = pafs.S3FileSystem(
        access_key=fault_server.access_key,
        secret_key="wrong-secret",
        endpoint_override=f"127.0.0.1:{fault_server.port}",
        scheme="http",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(OSError):
        with bad.open_output_stream(f"{bucket}/x") as f:
            f.write(b"nope")
    anonymous = pafs.S3FileSystem(
        anonymous=True,
        endpoint_override=f"127.0.0.1:{fault_server.port}",
        scheme="http",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(OSError):
        anonymous.get_file_info(pafs.FileSelector(bucket))


def test_scoring_reader_projects_and_slices(tmp_path):
    """The scoring reader decodes only the columns it is given, ``rows`` users at a time."""
    import pyarrow as pa

    from seqrec.storage import Storage, read_parquet_batches

    storage = Storage(str(tmp_path))
    table = pa.table(
        {
            "user_id": pa.array(range(10), pa.int64()),
            "item_ids": pa.array([[1, 2]] * 10, pa.list_(pa.int64())),
            "event_types": pa.array([["view", "cart"]] * 10, pa.list_(pa.string())),
            "extra": pa.array(["x"] * 10),
        }
    )
    storage.write_table(table, "sequences", "dt=2024-01-01", "part-0.parquet", row_group_size=3)
    paths = pa.table({"path": storage.list_files("sequences", "dt=2024-01-01", suffix=".parquet")})
    import pyarrow.parquet as pq

    assert pq.read_metadata(paths["path"][0].as_py(), filesystem=storage.filesystem).num_row_groups == 4
    slices = list(read_parquet_batches(paths, storage.root, rows=4, columns=["user_id", "item_ids"]))
    assert [s.num_rows for s in slices] == [4, 4, 2]
    assert all(s.column_names == ["user_id", "item_ids"] for s in slices)
    assert pa.concat_tables(slices)["user_id"].to_pylist() == list(range(10))


def test_scoring_reader_module_needs_no_torch():
    """Ray imports a task function's module in each worker that runs it: the scoring reader's must
    not pull in torch and transformers (seconds of CPU per read worker, taken from the actors)."""
    import subprocess
    import sys

    code = (
        "import sys, seqrec.storage; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
