"""seqrec.importers on small synthetic benchmark files (plus one check on the real ML-1M, if present)."""

from __future__ import annotations

import gzip
import logging
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from seqrec.importers import FORMATS, ImportReport, import_dataset
from seqrec.storage import Storage

REAL_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m" / "ml-1m.txt.gz"
MIDNIGHT = datetime(2024, 1, 1, tzinfo=UTC)

# The importer builds ts as timestamp[s, UTC]; Parquet has no seconds unit, so it is stored (and read
# back) as milliseconds, which the contract allows ("timestamp, any unit"). Values stay whole seconds.
EVENTS_SCHEMA = {
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "ts": pa.timestamp("ms", tz="UTC"),
    "event_type": pa.string(),
}


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` into ``path``, gzip-compressed when the name ends in ``.gz``."""
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _events(storage: Storage, dt: str = "2024-01-01") -> list[dict]:
    return storage.read_table("events", f"dt={dt}", "part-00000.parquet").to_pylist()


def _quarantine(storage: Storage, dt: str = "2024-01-01") -> list[dict]:
    return storage.read_table("quarantine", f"dt={dt}", "import-00000.parquet").to_pylist()


def _assert_ts_strictly_increase_per_user(rows: list[dict]) -> None:
    last: dict[int, datetime] = {}
    for row in rows:
        assert row["user_id"] not in last or row["ts"] > last[row["user_id"]]
        last[row["user_id"]] = row["ts"]


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


# -- sasrec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.txt", "data.txt.gz"])
def test_sasrec_keeps_file_order_with_synthetic_seconds(tmp_path, storage, name):
    path = _write(tmp_path / name, "1 10\n1 11\n1 10\n2 12\n2 10\n")
    report = import_dataset("sasrec", str(path), storage)

    assert report == ImportReport(
        lines_read=5,
        events_written=5,
        lines_quarantined=0,
        users=2,
        items=3,
        partitions=["2024-01-01"],
        items_with_text=0,
    )
    table = storage.read_table("events", "dt=2024-01-01", "part-00000.parquet")
    assert {f.name: f.type for f in table.schema} == EVENTS_SCHEMA
    rows = table.to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in rows] == [(1, 10), (1, 11), (1, 10), (2, 12), (2, 10)]
    assert [int((r["ts"] - MIDNIGHT).total_seconds()) for r in rows] == [0, 1, 2, 0, 1]
    assert {r["event_type"] for r in rows} == {"interaction"}
    assert not storage.exists("items", "items.parquet")
    assert not storage.exists("quarantine")


def test_sasrec_user_on_separate_runs_of_lines_continues_its_order(tmp_path, storage):
    path = _write(tmp_path / "data.txt", "1 10\n2 20\n1 11\n2 21\n1 12\n")
    import_dataset("sasrec", str(path), storage, date="2023-05-06")

    rows = _events(storage, "2023-05-06")
    assert [r["item_id"] for r in rows] == [10, 20, 11, 21, 12]  # file order kept in the part file
    _assert_ts_strictly_increase_per_user(rows)
    start = datetime(2023, 5, 6, tzinfo=UTC)
    assert [int((r["ts"] - start).total_seconds()) for r in rows if r["user_id"] == 1] == [0, 1, 2]


def test_sasrec_tolerates_extra_whitespace_and_windows_line_ends(tmp_path, storage):
    path = _write(tmp_path / "data.txt", "1 10\r\n 1\t11 \r\n1  12")  # no final newline either
    report = import_dataset("sasrec", str(path), storage)
    assert (report.events_written, report.lines_quarantined) == (3, 0)
    assert [r["item_id"] for r in _events(storage)] == [10, 11, 12]


def test_sasrec_quarantines_malformed_lines_with_reasons(tmp_path, storage):
    lines = ["1 10", "", "1 11 5", "7", "a 12", "2 -3", "2 99999999999999999999", "2 13", "   ", "2 1.5"]
    path = _write(tmp_path / "data.txt.gz", "\n".join(lines) + "\n")
    report = import_dataset("sasrec", str(path), storage)

    assert report.lines_read == len(lines) == report.events_written + report.lines_quarantined
    assert (report.events_written, report.lines_quarantined) == (2, 8)
    assert [(r["user_id"], r["item_id"]) for r in _events(storage)] == [(1, 10), (2, 13)]
    quarantined = sorted(_quarantine(storage), key=lambda r: r["line_no"])
    assert [(r["line_no"], r["raw"], r["reason"]) for r in quarantined] == [
        (2, "", "empty line"),
        (3, "1 11 5", "expected 2 fields, got 3"),
        (4, "7", "expected 2 fields, got 1"),
        (5, "a 12", "non-integer id field"),
        (6, "2 -3", "non-integer id field"),
        (7, "2 99999999999999999999", "non-integer id field"),
        (9, "   ", "empty line"),
        (10, "2 1.5", "non-integer id field"),
    ]
    assert {r["source"] for r in quarantined} == {"data.txt.gz"}
    schema = storage.read_table("quarantine", "dt=2024-01-01", "import-00000.parquet").schema
    assert (schema.field("line_no").type, schema.field("raw").type, schema.field("reason").type) == (
        pa.int64(),
        pa.string(),
        pa.string(),
    )


def test_sasrec_undecodable_bytes_are_quarantined_not_fatal(tmp_path, storage):
    path = tmp_path / "data.txt"
    path.write_bytes(b"1 10\n1 \xff\xfe\n1 11\n")
    report = import_dataset("sasrec", str(path), storage)
    assert (report.events_written, report.lines_quarantined) == (2, 1)
    assert _quarantine(storage)[0]["line_no"] == 2


def test_sasrec_titles_join(tmp_path, storage):
    events = _write(tmp_path / "ml.txt", "1 1\n1 2\n2 3\n2 4\n")
    titles = _write(
        tmp_path / "titles.tsv",
        "\n".join(
            [
                "sas_item_id\tmovielens_movie_id\ttitle\tgenres",
                "1\t1198\tRaiders of the Lost Ark (1981)\tAction|Adventure",
                "2\t3552\tCaddyshack (1980)\tComedy",
                "3\t1\tAmélie (2001)\t",  # no genres: the title alone
                "5\t7\tNever Watched (1999)\tDrama",  # in the catalogue only
                "x\t8\tBroken Row\tDrama",
                "2\t9\tSecond Caddyshack\tComedy",
            ]
        )
        + "\n",
    )
    report = import_dataset("sasrec", str(events), storage, titles=str(titles))

    items = {r["item_id"]: r for r in storage.read_table("items", "items.parquet").to_pylist()}
    assert items[1]["text"] == "Raiders of the Lost Ark (1981). genres: Action, Adventure"
    assert items[2]["text"] == "Caddyshack (1980). genres: Comedy"
    assert items[3]["text"] == "Amélie (2001)"
    assert items[4]["text"] is None  # seen in the events, absent from the titles
    assert items[5]["text"] == "Never Watched (1999). genres: Drama"
    assert all(r["available"] for r in items.values())
    assert (report.items, report.items_with_text, report.catalogue_lines_quarantined) == (4, 4, 2)
    assert report.lines_quarantined == 0  # event-file count only
    reasons = {(r["source"], r["line_no"], r["reason"]) for r in _quarantine(storage)}
    assert reasons == {("titles.tsv", 6, "non-integer id field"), ("titles.tsv", 7, "repeated item id")}


def test_titles_without_title_column_is_an_error(tmp_path, storage):
    events = _write(tmp_path / "ml.txt", "1 1\n")
    titles = _write(tmp_path / "titles.tsv", "id\tname\n1\tx\n")
    with pytest.raises(ValueError, match="title"):
        import_dataset("sasrec", str(events), storage, titles=str(titles))


# -- s3rec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Beauty.txt", "Beauty.txt.gz"])
def test_s3rec_expands_lines_in_order(tmp_path, storage, name):
    path = _write(tmp_path / name, "1 1 2 3 4\n2 5 1 6\n")
    report = import_dataset("s3rec", str(path), storage)

    assert (report.lines_read, report.events_written, report.users, report.items) == (2, 7, 2, 6)
    rows = _events(storage)
    assert [(r["user_id"], r["item_id"]) for r in rows] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 5),
        (2, 1),
        (2, 6),
    ]
    assert [int((r["ts"] - MIDNIGHT).total_seconds()) for r in rows] == [0, 1, 2, 3, 0, 1, 2]
    _assert_ts_strictly_increase_per_user(rows)


def test_s3rec_quarantines_whole_malformed_lines(tmp_path, storage):
    path = _write(tmp_path / "Beauty.txt", "1 1 2\n2\n\n3 4 x 5\n1 3\n")
    report = import_dataset("s3rec", str(path), storage)

    assert (report.lines_read, report.events_written, report.lines_quarantined) == (5, 3, 3)
    rows = _events(storage)
    assert [(r["user_id"], r["item_id"]) for r in rows] == [(1, 1), (1, 2), (1, 3)]
    _assert_ts_strictly_increase_per_user(rows)  # user 1's second line continues after its first
    assert {(r["line_no"], r["reason"]) for r in _quarantine(storage)} == {
        (2, "expected at least 2 fields, got 1"),
        (3, "empty line"),
        (4, "non-integer id field"),
    }


# -- movielens -------------------------------------------------------------------------------------


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def _ml100k(directory: Path, data_lines: list[str]) -> Path:
    directory.mkdir()
    _write(directory / "u.data", "\n".join(data_lines) + "\n")
    flags = ["0"] * 19
    comedy = list(flags)
    comedy[5] = "1"  # Comedy
    animation_comedy = list(comedy)
    animation_comedy[3] = "1"  # Animation
    _write(
        directory / "u.item",
        "\n".join(
            [
                "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *animation_comedy]),
                "|".join(["2", "Café au lait (1993)", "01-Jan-1993", "", "http://y", *comedy]),
                "|".join(["3", "unknown", "", "", "", *flags]),
            ]
        )
        + "\n",
        encoding="iso-8859-1",
    )
    return directory


def test_movielens_100k_partitions_by_utc_day_and_keeps_ties_in_file_order(tmp_path, storage):
    day1, day1_late, day2 = _ts("1997-09-20T10:00:00"), _ts("1997-09-20T23:59:59"), _ts("1997-09-21T00:00:00")
    directory = _ml100k(
        tmp_path / "ml-100k",
        [
            f"5\t2\t3\t{day2}",
            f"5\t1\t4\t{day1}",
            f"7\t3\t5\t{day1_late}",
            f"5\t3\t1\t{day1}",  # same second as user 5's line 2: file order decides
        ],
    )
    report = import_dataset("movielens", str(directory), storage)

    assert report.partitions == ["1997-09-20", "1997-09-21"]
    assert (report.lines_read, report.events_written, report.users, report.items) == (4, 4, 2, 3)
    first = _events(storage, "1997-09-20")
    assert [(r["user_id"], r["item_id"], r["seq"]) for r in first] == [(5, 1, 1), (7, 3, 2), (5, 3, 3)]
    assert first[0]["ts"] == first[2]["ts"] == datetime.fromtimestamp(day1, UTC)
    assert [(r["user_id"], r["item_id"], r["seq"]) for r in _events(storage, "1997-09-21")] == [(5, 2, 0)]
    schema = storage.read_table("events", "dt=1997-09-20", "part-00000.parquet").schema
    assert {f.name: f.type for f in schema} == {**EVENTS_SCHEMA, "seq": pa.int64()}

    items = {r["item_id"]: r["text"] for r in storage.read_table("items", "items.parquet").to_pylist()}
    assert items == {
        1: "Toy Story (1995). genres: Animation, Comedy",
        2: "Café au lait (1993). genres: Comedy",
        3: "unknown",
    }
    assert report.items_with_text == 3


def test_movielens_1m_layout(tmp_path, storage):
    directory = tmp_path / "ml-1m"
    directory.mkdir()
    _write(
        directory / "ratings.dat",
        f"1::10::5::{_ts('2000-12-31T22:00:00')}\n1::20::3::{_ts('2001-01-01T01:00:00')}\n",
    )
    _write(
        directory / "movies.dat",
        "10::Amélie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n",
        encoding="iso-8859-1",
    )
    report = import_dataset("movielens", str(directory / "ratings.dat"), storage)  # a file inside works too

    assert report.partitions == ["2000-12-31", "2001-01-01"]
    items = {r["item_id"]: r["text"] for r in storage.read_table("items", "items.parquet").to_pylist()}
    assert items == {10: "Amélie (2001). genres: Comedy, Romance", 20: "Heat (1995). genres: Action"}


def test_movielens_quarantines_malformed_lines(tmp_path, storage):
    good = _ts("1998-01-01T00:00:00")
    directory = _ml100k(
        tmp_path / "ml-100k",
        [
            f"1\t1\t5\t{good}",
            "1\t2\t5",
            f"x\t2\t5\t{good}",
            f"1\t2\tfive\t{good}",  # the rating is not kept, so it need not be a number
            "1\t3\t5\t999999999999999",
        ],
    )
    report = import_dataset("movielens", str(directory), storage, date="2024-02-03")

    assert report.lines_read == report.events_written + report.lines_quarantined == 5
    assert report.lines_quarantined == 3
    assert {(r["line_no"], r["reason"]) for r in _quarantine(storage, "2024-02-03")} == {
        (2, "expected 4 fields, got 3"),
        (3, "non-integer id field"),
        (5, "timestamp out of range"),
    }


def test_movielens_directory_without_ratings_is_an_error(tmp_path, storage):
    with pytest.raises(FileNotFoundError):
        import_dataset("movielens", str(tmp_path), storage)


# -- re-import, dispatcher, logging ----------------------------------------------------------------


def test_reimport_replaces_partition_items_and_quarantine(tmp_path, storage):
    first = _write(tmp_path / "first.txt", "1 1\n1 2\n2 3\nbad\n")
    titles = _write(tmp_path / "titles.tsv", "id\ttitle\tgenres\n1\tOne\tDrama\n")
    import_dataset("sasrec", str(first), storage, titles=str(titles))
    storage.write_bytes(b"stale", "events", "dt=2024-01-01", "part-00001.parquet")
    storage.write_bytes(b"{}", "quarantine", "dt=2024-01-01", "prepare-00000.parquet")
    assert storage.exists("items", "items.parquet")

    second = _write(tmp_path / "second.txt", "9 9\n")
    report = import_dataset("sasrec", str(second), storage)

    assert report.events_written == 1
    assert storage.list_files("events") == [storage.path("events", "dt=2024-01-01", "part-00000.parquet")]
    assert [(r["user_id"], r["item_id"]) for r in _events(storage)] == [(9, 9)]
    assert not storage.exists("items", "items.parquet")  # no titles this time: no stale catalogue
    assert not storage.exists("quarantine", "dt=2024-01-01", "import-00000.parquet")
    assert storage.exists("quarantine", "dt=2024-01-01", "prepare-00000.parquet")  # not the importer's


def test_dispatcher_rejects_unknown_format_titles_for_movielens_and_bad_dates(tmp_path, storage):
    path = _write(tmp_path / "data.txt", "1 1\n")
    assert FORMATS == ("sasrec", "s3rec", "movielens")
    with pytest.raises(ValueError, match="unknown import format"):
        import_dataset("csv", str(path), storage)
    with pytest.raises(ValueError, match="movielens"):
        import_dataset("movielens", str(tmp_path), storage, titles=str(path))
    with pytest.raises(ValueError):
        import_dataset("sasrec", str(path), storage, date="2024-13-01")


def test_logs_one_line_summary(tmp_path, storage, caplog):
    path = _write(tmp_path / "data.txt", "1 1\n1 2\noops\n")
    with caplog.at_level(logging.INFO, logger="seqrec.importers"):
        import_dataset("sasrec", str(path), storage)
    [record] = [r for r in caplog.records if r.name == "seqrec.importers"]
    assert "3 lines read, 2 events written, 1 lines quarantined" in record.getMessage()


def test_import_into_s3(tmp_path, s3_root):
    storage = Storage(s3_root)
    path = _write(tmp_path / "data.txt", "1 1\n1 2\nbad\n")
    import_dataset("sasrec", str(path), storage)
    report = import_dataset("sasrec", str(path), storage)  # again: replaces on S3 too

    assert (report.events_written, report.lines_quarantined) == (2, 1)
    assert [(r["user_id"], r["item_id"]) for r in _events(storage)] == [(1, 1), (1, 2)]
    assert len(storage.list_files("events")) == 1
    assert [r["line_no"] for r in _quarantine(storage)] == [3]


# -- the real file, when the shared data is there --------------------------------------------------


@pytest.mark.skipif(not REAL_ML1M.exists(), reason=f"{REAL_ML1M} not present")
def test_real_ml1m(storage):
    titles = REAL_ML1M.parent / "sas_item_titles.tsv"
    report = import_dataset(
        "sasrec", str(REAL_ML1M), storage, titles=str(titles) if titles.exists() else None
    )

    assert (report.users, report.items, report.events_written) == (6040, 3416, 999_611)
    assert (report.lines_read, report.lines_quarantined, report.partitions) == (999_611, 0, ["2024-01-01"])
    if titles.exists():
        assert report.items_with_text == 3416
