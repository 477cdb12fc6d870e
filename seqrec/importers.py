"""Import public sequential-recommendation benchmarks into the storage layout of the contract.

Each importer reads one benchmark file (or MovieLens directory) and writes below a :class:`Storage`:

```
events/dt=YYYY-MM-DD/part-00000.parquet   user_id int64, item_id int64, ts timestamp[s, UTC],
                                          event_type string ("interaction")
items/items.parquet                       item_id int64, text string, available bool (when titles are known)
quarantine/dt=<date>/import-00000.parquet line_no int64, raw string, reason string, source string
```

Formats (see ``../shared/data/README.md``):

* ``sasrec``: ``user item`` per line, time-ordered within each user (SASRec / BERT4Rec ml-1m.txt,
  beauty.txt).
* ``s3rec``: ``user i1 i2 ... in`` per line, chronological (S3-Rec / ICLRec Beauty.txt).
* ``movielens``: a raw GroupLens directory with real timestamps: ``u.data`` + ``u.item`` (ML-100K)
  or ``ratings.dat`` + ``movies.dat`` (ML-1M).

Malformed lines (empty, wrong number of fields, ids that are not non-negative integers) never stop an
import and are never dropped silently: they are counted in the :class:`ImportReport` and written to
the quarantine file with their 1-based line number in the file they came from and the reason.

Lines are split with ``pyarrow.compute`` rather than ``pyarrow.csv``: the CSV reader fails a whole
file on one bad line and does not say which line it was, whereas splitting each line ourselves keeps
every line number, so bad lines can be quarantined while the good ones stay vectorised (ML-1M's
million lines import in about a second).

Re-importing into the same root replaces what an import writes: each ``events/dt=`` partition it
writes is deleted first, ``items/items.parquet`` is rewritten (or deleted when the new import has no
titles, so a stale catalogue never describes another dataset) and so is the quarantine file. Other
days under ``events/`` are left alone: they may hold real events.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from datetime import date as Date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqrec.errors import ConfigError, InputError, NotFoundError
from seqrec.storage import Storage

log = logging.getLogger(__name__)

FORMATS = ("sasrec", "s3rec", "movielens")
DEFAULT_DATE = "2024-01-01"
EVENT_TYPE = "interaction"
ITEMS_FILE = ("items", "items.parquet")
QUARANTINE_FILE = "import-00000.parquet"

# Digits only, and at most 18 of them, so that the cast to int64 can neither fail nor overflow.
_INTEGER = r"^[0-9]{1,18}$"
# 9999-12-31T23:59:59Z: a later timestamp has no YYYY-MM-DD day to be partitioned under.
_MAX_TS = 253_402_300_799
_SECONDS_PER_DAY = 86_400

# The 19 genre flags at the end of each ML-100K u.item line, in file order (as listed in u.genre).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass
class ImportReport:
    """What one import read and wrote. For ``sasrec`` (one event per line) and ``movielens``,
    ``lines_read == events_written + lines_quarantined``; an ``s3rec`` line holds many events."""

    lines_read: int  # lines of the event file, malformed ones included
    events_written: int
    lines_quarantined: int  # malformed lines of the event file
    users: int
    items: int  # distinct items in the events
    partitions: list[str] = field(default_factory=list)  # the dt=YYYY-MM-DD values written
    items_with_text: int = 0  # rows of items/items.parquet that have a text
    catalogue_lines_quarantined: int = 0  # malformed lines of the titles / u.item / movies.dat file


# -- reading lines ---------------------------------------------------------------------------------


@dataclass
class _Lines:
    """Lines of one input file, each split into fields; ``line_no`` is 1-based within the file."""

    source: str  # file name, so a quarantined line can be found again
    line_no: np.ndarray  # int64
    raw: pa.Array  # the line as read (without its line end)
    fields: pa.ListArray

    def __len__(self) -> int:
        return len(self.raw)

    def filter(self, keep: np.ndarray) -> _Lines:
        mask = pa.array(keep, pa.bool_())
        return _Lines(self.source, self.line_no[keep], self.raw.filter(mask), self.fields.filter(mask))

    def integers(self, index: int) -> np.ndarray:
        """Field ``index`` of every line as int64 (lines must have passed :func:`_check`)."""
        return pc.list_element(self.fields, index).cast(pa.int64()).to_numpy()


def _read_text(path: Path, encoding: str) -> str:
    """The whole file as text; gzip when the name ends in ``.gz``. Undecodable bytes become U+FFFD
    so that such a line is quarantined as malformed instead of failing the import."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read().decode(encoding, errors="replace")


def _read_lines(path: Path, sep: str | None, *, encoding: str = "utf-8") -> _Lines:
    """Every line of ``path`` split at ``sep`` (``None``: at runs of whitespace, ignoring leading and
    trailing whitespace, so a stray trailing space or a tab does not make a line malformed)."""
    text = _read_text(path, encoding)
    raw = pc.list_flatten(pc.split_pattern(pa.array([text], pa.large_string()), "\n"))
    if len(raw) and raw[-1].as_py() == "":
        raw = raw.slice(0, len(raw) - 1)  # the file's last newline ends a line; it does not start one
    raw = pc.utf8_rtrim(raw, characters="\r")  # Windows line ends
    if sep is None:
        fields = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(raw))
    else:
        fields = pc.split_pattern(raw, sep)
    return _Lines(path.name, np.arange(1, len(raw) + 1, dtype=np.int64), raw, fields)


# -- quarantine ------------------------------------------------------------------------------------


class _Quarantine:
    """Malformed lines of every input file of one import, each kept with the reason it was rejected."""

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._counts: Counter[str] = Counter()

    def reject(self, lines: _Lines, mask: np.ndarray, reason: str | Sequence[str]) -> _Lines:
        """Quarantine the lines where ``mask`` is true; return the others."""
        if not mask.any():
            return lines
        bad = lines.filter(mask)
        reasons = [reason] * len(bad) if isinstance(reason, str) else list(reason)
        self._parts.append(
            pa.table(
                {
                    "line_no": pa.array(bad.line_no, pa.int64()),
                    "raw": bad.raw.cast(pa.string()),
                    "reason": pa.array(reasons, pa.string()),
                    "source": pa.array([bad.source] * len(bad), pa.string()),
                }
            )
        )
        self._counts[lines.source] += len(bad)
        return lines.filter(~mask)

    def count(self, source: str) -> int:
        return self._counts[source]

    def write(self, storage: Storage, date: str) -> None:
        """Replace ``quarantine/dt=<date>/import-00000.parquet``; only that file, because other
        stages (prepare) write their own quarantine files into the same day."""
        storage.delete_file("quarantine", f"dt={date}", QUARANTINE_FILE)
        if self._parts:
            storage.write_table(pa.concat_tables(self._parts), "quarantine", f"dt={date}", QUARANTINE_FILE)


def _field_count_reason(count: int, min_fields: int, max_fields: int | None) -> str:
    if max_fields == min_fields:
        return f"expected {min_fields} fields, got {count}"
    if max_fields is None:
        return f"expected at least {min_fields} fields, got {count}"
    return f"expected {min_fields} to {max_fields} fields, got {count}"


def _non_integer(fields: pa.ListArray, positions: Sequence[int] | None) -> np.ndarray:
    """Per line: does a field at one of ``positions`` (``None``: any field) fail to be an integer?"""
    flat = pc.list_flatten(fields)
    parents = pc.list_parent_indices(fields).to_numpy()
    bad = ~pc.match_substring_regex(flat, _INTEGER).to_numpy(zero_copy_only=False)
    if positions is not None:
        offsets = fields.offsets.to_numpy()
        starts = offsets[:-1] - offsets[0]  # offsets of a filtered array need not start at 0
        bad &= np.isin(np.arange(len(flat)) - starts[parents], positions)
    mask = np.zeros(len(fields), dtype=bool)
    mask[parents[bad]] = True
    return mask


def _check(
    lines: _Lines,
    quarantine: _Quarantine,
    *,
    min_fields: int,
    max_fields: int | None,
    integer_fields: Sequence[int] | None = None,
) -> _Lines:
    """Quarantine empty lines, lines with the wrong number of fields, and lines whose
    ``integer_fields`` (``None``: all fields) are not non-negative integers; return the rest."""
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(lines.raw)), 0).to_numpy(zero_copy_only=False)
    lines = quarantine.reject(lines, empty, "empty line")

    counts = pc.list_value_length(lines.fields).to_numpy()
    wrong = counts < min_fields
    if max_fields is not None:
        wrong |= counts > max_fields
    reasons = [_field_count_reason(int(c), min_fields, max_fields) for c in counts[wrong]]
    lines = quarantine.reject(lines, wrong, reasons)

    return quarantine.reject(lines, _non_integer(lines.fields, integer_fields), "non-integer id field")


# -- events ----------------------------------------------------------------------------------------


def _midnight(date: str) -> int:
    """Unix seconds of 00:00 UTC on ``date`` (YYYY-MM-DD); a malformed date is an error."""
    return int(datetime.combine(Date.fromisoformat(date), time(), UTC).timestamp())


def _position_within_user(users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... along each user's events in file order (a user's lines need not be contiguous)."""
    n = len(users)
    order = np.argsort(users, kind="stable")  # stable: file order survives within a user
    sorted_users = users[order]
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = sorted_users[1:] != sorted_users[:-1]
    start_index = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))
    positions = np.empty(n, dtype=np.int64)
    positions[order] = np.arange(n) - start_index
    return positions


def _synthetic_ts(users: np.ndarray, date: str) -> np.ndarray:
    """Midnight of ``date`` (UTC) plus each event's position within its user, in seconds.

    The benchmark files carry order but no time. One second per step makes ``ts`` strictly increase
    along each user's history, so sorting by ``ts`` (as prepare does) gives back the file order, and
    every event lands in ``dt=date`` unless a user has more than 86,400 events (none of the public
    benchmarks comes close; such a user would continue into the next day's partition).
    """
    return _midnight(date) + _position_within_user(users)


def _events(users: np.ndarray, items: np.ndarray, ts: np.ndarray, **extra: np.ndarray) -> pa.Table:
    """The events table of the contract; ``extra`` columns are allowed and ignored by prepare."""
    columns = {
        "user_id": pa.array(users, pa.int64()),
        "item_id": pa.array(items, pa.int64()),
        "ts": pa.array(ts, pa.timestamp("s", tz="UTC")),
        "event_type": pa.repeat(EVENT_TYPE, len(users)),
    }
    columns.update({name: pa.array(values, pa.int64()) for name, values in extra.items()})
    return pa.table(columns)


def _write_events(storage: Storage, events: pa.Table) -> list[str]:
    """Write one ``events/dt=YYYY-MM-DD/part-00000.parquet`` per UTC day of ``ts``, replacing the
    partition, rows in file order within each day. Returns the days written."""
    days = events["ts"].cast(pa.int64()).to_numpy() // _SECONDS_PER_DAY
    order = np.argsort(days, kind="stable")
    unique_days, starts = np.unique(days[order], return_index=True)
    bounds = np.append(starts, len(order))
    partitions = []
    for day, lo, hi in zip(unique_days, bounds[:-1], bounds[1:]):
        dt = str(np.datetime64(int(day), "D"))
        storage.delete_dir("events", f"dt={dt}")
        storage.write_table(events.take(pa.array(order[lo:hi])), "events", f"dt={dt}", "part-00000.parquet")
        partitions.append(dt)
    return partitions


# -- item catalogue --------------------------------------------------------------------------------


def _item_text(title: str, genres: Sequence[str]) -> str:
    """``"Toy Story (1995). genres: Animation, Children's, Comedy"``: the text a language model sees."""
    genres = [g for g in genres if g]
    return f"{title}. genres: {', '.join(genres)}" if genres else title


def _catalogue(
    lines: _Lines, quarantine: _Quarantine, n_fields: int, text_of: Callable[[list[str]], str]
) -> pa.Table:
    """``item_id, text`` from catalogue lines whose first field is the item id. Malformed lines and
    repeated ids (all but the first) are quarantined, so the catalogue has one row per item."""
    lines = _check(lines, quarantine, min_fields=n_fields, max_fields=n_fields, integer_fields=[0])
    ids = lines.integers(0)
    repeated = np.ones(len(ids), dtype=bool)
    repeated[np.unique(ids, return_index=True)[1]] = False
    lines = quarantine.reject(lines, repeated, "repeated item id")
    texts = [text_of(row) for row in lines.fields.to_pylist()]
    return pa.table(
        {"item_id": pa.array(lines.integers(0), pa.int64()), "text": pa.array(texts, pa.string())}
    )


def _read_titles(path: str | Path, quarantine: _Quarantine) -> pa.Table:
    """``item_id, text`` from a UTF-8 TSV with a header whose first column is the item id as used in
    the event file and which has ``title`` and ``genres`` (``|``-separated) columns, such as
    ``ml-1m/sas_item_titles.tsv`` (``sas_item_id, movielens_movie_id, title, genres``)."""
    lines = _read_lines(Path(path), "\t")
    if not len(lines):
        raise InputError(f"titles file {path} is empty; expected a header row")
    header = lines.fields[0].as_py()
    missing = {"title", "genres"} - set(header)
    if missing:
        raise InputError(f"titles file {path} has no {sorted(missing)} column; header: {header}")
    title, genres = header.index("title"), header.index("genres")
    rows = lines.filter(lines.line_no > 1)
    return _catalogue(rows, quarantine, len(header), lambda f: _item_text(f[title], f[genres].split("|")))


def _read_u_item(path: Path, quarantine: _Quarantine) -> pa.Table:
    """ML-100K ``u.item``: ``id|title|release date|video release date|IMDb URL|19 genre flags``."""
    lines = _read_lines(path, "|", encoding="iso-8859-1")

    def text_of(f: list[str]) -> str:
        return _item_text(f[1], [g for g, flag in zip(ML100K_GENRES, f[5:]) if flag == "1"])

    return _catalogue(lines, quarantine, 5 + len(ML100K_GENRES), text_of)


def _read_movies_dat(path: Path, quarantine: _Quarantine) -> pa.Table:
    """ML-1M ``movies.dat``: ``id::title::genre|genre``."""
    lines = _read_lines(path, "::", encoding="iso-8859-1")
    return _catalogue(lines, quarantine, 3, lambda f: _item_text(f[1], f[2].split("|")))


def _items_table(event_items: np.ndarray, catalogue: pa.Table) -> pa.Table:
    """Every item of the events or the catalogue, with its text where the catalogue has one. All
    are available: the benchmarks say nothing about availability."""
    catalogue = catalogue.sort_by("item_id")
    known = catalogue["item_id"].to_numpy()
    ids = np.union1d(event_items, known)
    at = np.searchsorted(known, ids)
    found = at < len(known)
    found[found] = known[at[found]] == ids[found]
    text = catalogue["text"].take(pa.array(np.where(found, at, 0), pa.int64(), mask=~found))
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "text": text.combine_chunks().cast(pa.string()),
            "available": pa.array(np.ones(len(ids), dtype=bool)),
        }
    )


def _write_items(storage: Storage, event_items: np.ndarray, catalogue: pa.Table | None) -> int:
    """Write ``items/items.parquet``, or delete a previous import's one when there are no titles.
    Returns the number of items with a text."""
    if catalogue is None:
        storage.delete_file(*ITEMS_FILE)
        return 0
    items = _items_table(event_items, catalogue)
    storage.write_table(items, *ITEMS_FILE)
    return len(items) - items["text"].null_count


# -- one import, written ---------------------------------------------------------------------------


def _write_import(
    fmt: str,
    source: str,
    storage: Storage,
    date: str,
    *,
    events: pa.Table,
    lines_read: int,
    quarantine: _Quarantine,
    catalogue: pa.Table | None,
    catalogue_source: str | None,
) -> ImportReport:
    """Write events, items and quarantine below ``storage``, then report and log what was done."""
    partitions = _write_events(storage, events)
    event_items = np.unique(events["item_id"].to_numpy())
    items_with_text = _write_items(storage, event_items, catalogue)
    quarantine.write(storage, date)
    report = ImportReport(
        lines_read=lines_read,
        events_written=events.num_rows,
        lines_quarantined=quarantine.count(source),
        users=len(np.unique(events["user_id"].to_numpy())),
        items=len(event_items),
        partitions=partitions,
        items_with_text=items_with_text,
        catalogue_lines_quarantined=quarantine.count(catalogue_source) if catalogue_source else 0,
    )
    log.info(
        "imported %s %s into %s: %d lines read, %d events written, %d lines quarantined, "
        "%d users, %d items, %d partitions, %d items with text",
        fmt,
        source,
        storage.uri(),
        report.lines_read,
        report.events_written,
        report.lines_quarantined,
        report.users,
        report.items,
        len(report.partitions),
        report.items_with_text,
    )
    return report


# -- formats ---------------------------------------------------------------------------------------


def import_sasrec(
    path: str | Path, storage: Storage, *, titles: str | Path | None = None, date: str = DEFAULT_DATE
) -> ImportReport:
    """Import a SASRec/BERT4Rec ``user item`` file (time-ordered within each user; ``.gz`` or plain).

    All events go to ``events/dt=date`` with synthetic timestamps that keep the file order (see
    :func:`_synthetic_ts`). ``titles`` (e.g. ``ml-1m/sas_item_titles.tsv``) fills ``items/``.
    """
    path = Path(path)
    _midnight(date)  # a malformed date fails before anything is read
    quarantine = _Quarantine()
    lines = _read_lines(path, None)
    good = _check(lines, quarantine, min_fields=2, max_fields=2)
    users, items = good.integers(0), good.integers(1)
    events = _events(users, items, _synthetic_ts(users, date))
    catalogue = _read_titles(titles, quarantine) if titles else None
    return _write_import(
        "sasrec",
        path.name,
        storage,
        date,
        events=events,
        lines_read=len(lines),
        quarantine=quarantine,
        catalogue=catalogue,
        catalogue_source=Path(titles).name if titles else None,
    )


def import_s3rec(
    path: str | Path, storage: Storage, *, titles: str | Path | None = None, date: str = DEFAULT_DATE
) -> ImportReport:
    """Import an S3-Rec ``user i1 i2 ... in`` file (one chronological line per user; ``.gz`` or plain).

    Timestamps are synthesised as for :func:`import_sasrec`; a user repeated on a later line
    continues where the earlier line stopped. A line with a user but no item is quarantined.
    """
    path = Path(path)
    _midnight(date)
    quarantine = _Quarantine()
    lines = _read_lines(path, None)
    good = _check(lines, quarantine, min_fields=2, max_fields=None)
    item_lists = pc.list_slice(good.fields, 1)
    items = pc.list_flatten(item_lists).cast(pa.int64()).to_numpy()
    users = good.integers(0)[pc.list_parent_indices(item_lists).to_numpy()]
    events = _events(users, items, _synthetic_ts(users, date))
    catalogue = _read_titles(titles, quarantine) if titles else None
    return _write_import(
        "s3rec",
        path.name,
        storage,
        date,
        events=events,
        lines_read=len(lines),
        quarantine=quarantine,
        catalogue=catalogue,
        catalogue_source=Path(titles).name if titles else None,
    )


def _movielens_files(path: Path) -> tuple[Path, str | None, Path, Callable[[Path, _Quarantine], pa.Table]]:
    """(ratings file, its separator, catalogue file, catalogue reader) of a MovieLens directory."""
    root = path.parent if path.is_file() else path
    if (root / "u.data").exists():
        return root / "u.data", None, root / "u.item", _read_u_item
    if (root / "ratings.dat").exists():
        return root / "ratings.dat", "::", root / "movies.dat", _read_movies_dat
    raise NotFoundError(f"{root} holds neither u.data (ML-100K) nor ratings.dat (ML-1M)")


def import_movielens(path: str | Path, storage: Storage, *, date: str = DEFAULT_DATE) -> ImportReport:
    """Import a raw MovieLens directory (ML-100K ``u.data``/``u.item`` or ML-1M ``ratings.dat``/
    ``movies.dat``) with its real timestamps.

    Events are partitioned by the UTC day of their timestamp. Ratings are not kept: the events are
    implicit feedback. Many events of a user share a timestamp (75,772 of ML-100K's 100,000), and
    prepare sorts stably by ``ts``, so rows stay in file order within each partition, and an extra
    int64 column ``seq`` (0-based line index in the ratings file) makes the order explicit for any
    reader that sorts differently; the contract allows (and prepare ignores) other columns.
    Quarantined lines go to ``quarantine/dt=date``; titles and genres go to ``items/items.parquet``.
    """
    ratings_file, sep, catalogue_file, read_catalogue = _movielens_files(Path(path))
    _midnight(date)
    quarantine = _Quarantine()
    lines = _read_lines(ratings_file, sep)
    # user item rating ts: the rating is dropped, so only the ids and ts must be integers.
    good = _check(lines, quarantine, min_fields=4, max_fields=4, integer_fields=[0, 1, 3])
    good = quarantine.reject(good, good.integers(3) > _MAX_TS, "timestamp out of range")
    events = _events(good.integers(0), good.integers(1), good.integers(3), seq=good.line_no - 1)
    catalogue = read_catalogue(catalogue_file, quarantine) if catalogue_file.exists() else None
    if catalogue is None:
        log.warning("%s not found: importing %s without titles", catalogue_file, ratings_file)
    return _write_import(
        "movielens",
        ratings_file.name,
        storage,
        date,
        events=events,
        lines_read=len(lines),
        quarantine=quarantine,
        catalogue=catalogue,
        catalogue_source=catalogue_file.name,
    )


def import_dataset(
    fmt: str, path: str, storage: Storage, *, titles: str | None = None, date: str = DEFAULT_DATE
) -> ImportReport:
    """Import ``path`` in format ``fmt`` (one of :data:`FORMATS`) below ``storage``."""
    for name in (path, titles):
        if name and not Path(name).exists():
            raise NotFoundError(f"{name} does not exist; give the benchmark file (or MovieLens directory)")
    if fmt == "sasrec":
        return import_sasrec(path, storage, titles=titles, date=date)
    if fmt == "s3rec":
        return import_s3rec(path, storage, titles=titles, date=date)
    if fmt == "movielens":
        if titles:
            raise ConfigError("movielens takes its titles from u.item / movies.dat; do not pass titles")
        return import_movielens(path, storage, date=date)
    raise ConfigError(f"unknown import format {fmt!r}; expected one of {FORMATS}")
