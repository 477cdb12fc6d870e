"""Stage 5: the recommendation table, one atomic commit per night.

``recommendations/`` is a Delta Lake table partitioned by ``dt`` (``publish.format: delta``, the
default). Scoring writes the night's Parquet files into ``dt=YYYY-MM-DD/`` (Ray Data, in parallel,
memory flat in users); files that no commit names are invisible to every Delta reader. The driver
then commits them in one transaction that removes every file the date had and adds the new ones
(:func:`publish_recommendations`): readers see the previous rows until that commit and the new rows
after it, never a mix and never an empty date. Each commit is a snapshot (a table version) whose
commit info carries the model version, input snapshot, row count and timings, so
:func:`read_recommendations` can read any snapshot (``as_of``) and :func:`rollback` can restore the
snapshot of a date before its latest commit. Files of a run that died before committing are deleted
by the next publish of that date (found with Delta's own vacuum); snapshots older than
``publish.history_days`` are vacuumed.

``publish.format: parquet`` keeps the plain Hive layout for readers without Delta:
:func:`publish_partition` deletes the date, writes the parts and writes a ``_SUCCESS`` manifest
last, and :func:`read_partition` reads only what ``_SUCCESS`` names. That is atomic only for seqrec's
own reader: a foreign reader globbing ``dt=*/*.parquet`` sees an empty or half-written date while a
re-run is under way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from seqrec.config import PublishConfig
from seqrec.errors import UserError
from seqrec.lease import current_lease
from seqrec.storage import Storage, retry, s3_endpoint

log = logging.getLogger("seqrec.publish")

TABLE = "recommendations"
SUCCESS = "_SUCCESS"
DELTA_LOG = "_delta_log"


class PublishError(UserError, ValueError):
    """A publish, read or rollback the table's state does not allow: a one-line message saying why."""


@dataclass
class Snapshot:
    """One published state of a date: the Delta version (None in the plain-Parquet format)."""

    date: str
    version: int | None
    rows: int
    files: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    commit_s: float = 0.0


# -- the Delta table -------------------------------------------------------------------------------
def delta_storage_options(storage: Storage) -> dict[str, str] | None:
    """Options for delta-rs's object store: the same endpoint and credentials as every other client."""
    if not storage.is_s3:
        return None
    options = {
        "AWS_REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Commits are a PUT with If-None-Match on the next log entry: no external lock needed.
        "conditional_put": "etag",
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(key):
            options[key] = os.environ[key]
    if endpoint := s3_endpoint():
        options["AWS_ENDPOINT_URL"] = endpoint
        options["AWS_ALLOW_HTTP"] = "true" if endpoint.startswith("http://") else "false"
        options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
    return options


def table_uri(storage: Storage) -> str:
    return storage.uri(TABLE)


def is_delta(storage: Storage) -> bool:
    return storage.exists(TABLE, DELTA_LOG)


def open_table(storage: Storage, as_of: int | str | None = None):
    """The Delta table at its latest version, or at ``as_of`` (a version number or an ISO timestamp)."""
    from deltalake import DeltaTable

    table = DeltaTable(table_uri(storage), storage_options=delta_storage_options(storage))
    if as_of is not None:
        table.load_as_version(int(as_of) if str(as_of).isdigit() else str(as_of))
    return table


def _add_action(storage: Storage, relative: str, date: str, rows: int):
    from deltalake.transaction import AddAction

    info = retry(
        lambda: storage.filesystem.get_file_info(storage.path(TABLE, relative)), what=f"stat {relative}"
    )
    return AddAction(
        path=relative,
        size=info.size,
        partition_values={"dt": date},
        modification_time=int((info.mtime_ns or time.time_ns()) // 1_000_000),
        data_change=True,
        stats=json.dumps({"numRecords": rows}),
    )


def _commit(
    storage: Storage,
    date: str,
    actions: list,
    file_schema: pa.Schema,
    metadata: dict[str, Any],
    config: PublishConfig,
) -> int:
    """Replace the rows of ``dt = date`` with ``actions``' files in one transaction; the new version."""
    from deltalake import CommitProperties, DeltaTable, Schema
    from deltalake.transaction import create_table_with_add_actions

    schema = pa.schema(
        [f for f in file_schema.remove_metadata() if f.name != "dt"] + [pa.field("dt", pa.string())]
    )
    # userMetadata is what Spark's DESCRIBE HISTORY shows; "seqrec" is the same, structured.
    properties = CommitProperties(custom_metadata={"seqrec": metadata, "userMetadata": json.dumps(metadata)})
    options = delta_storage_options(storage)
    if not is_delta(storage):
        retention = f"interval {max(int(config.history_days * 24), 1)} hours"
        try:
            create_table_with_add_actions(
                table_uri(storage),
                Schema.from_arrow(schema),
                actions,
                mode="error",
                partition_by=["dt"],
                name="recommendations",
                storage_options=options,
                commit_properties=properties,
                configuration={
                    "delta.deletedFileRetentionDuration": retention,
                    "delta.logRetentionDuration": retention,
                },
            )
            return 0
        except Exception as error:  # another date's first night created it meanwhile: commit into it
            if not is_delta(storage):
                raise
            log.info("table created concurrently (%s); committing into it", error)
    table = DeltaTable(table_uri(storage), storage_options=options)
    table.create_write_transaction(
        actions,
        "overwrite",
        schema,
        partition_by=["dt"],
        partition_filters=[("dt", "=", date)],
        commit_properties=properties,
    )
    table.update_incremental()
    return table.version()


def _refuse_mixed_formats(storage: Storage, config: PublishConfig) -> None:
    delta = is_delta(storage)
    if config.format == "parquet" and delta:
        raise PublishError(
            f"{table_uri(storage)} is a Delta table; publish.format=parquet needs another storage root "
            "(or set publish.format=delta)"
        )
    if config.format == "delta" and not delta and published_dates(storage):
        raise PublishError(
            f"{table_uri(storage)} holds plain-Parquet nights (publish.format=parquet); move them away "
            "(e.g. to recommendations-parquet/) before publishing it as a Delta table, or set "
            "publish.format=parquet"
        )


def publish_recommendations(
    storage: Storage,
    date: str,
    write: Callable[[str], None],
    metadata: dict[str, Any],
    config: PublishConfig | None = None,
) -> Snapshot:
    """Publish what ``write(directory)`` produces as the rows of ``date``, atomically for every reader.

    ``write`` puts Parquet files (the table's columns, without ``dt``) into the directory it gets.
    """
    config = config or PublishConfig()
    _refuse_mixed_formats(storage, config)
    if config.format == "parquet":
        manifest = publish_partition(storage, TABLE, date, write, metadata)
        return Snapshot(
            date=date, version=None, rows=manifest["rows"], files=manifest["files"], metadata=manifest
        )

    partition = f"dt={date}"
    before = set(storage.list_files(TABLE, partition, suffix=".parquet"))
    started = time.perf_counter()
    write(storage.path(TABLE, partition))
    written_s = time.perf_counter() - started
    files = [f for f in storage.list_files(TABLE, partition, suffix=".parquet") if f not in before]
    rows = [
        retry(lambda f=f: pq.read_metadata(f, filesystem=storage.filesystem).num_rows, what=f"stat {f}")
        for f in files
    ]
    if files:
        file_schema = retry(lambda: pq.read_schema(files[0], filesystem=storage.filesystem), what="schema")
    elif is_delta(storage):
        file_schema = pa.schema(open_table(storage).schema().to_arrow())
    else:
        raise PublishError(
            f"nothing to publish for {date}: the first night of {table_uri(storage)} wrote no rows"
        )
    relative = [f"{partition}/{f.rsplit('/', 1)[1]}" for f in files]
    actions = [_add_action(storage, r, date, n) for r, n in zip(relative, rows)]
    metadata = {
        **metadata,
        "operation": "publish",
        "date": date,
        "rows": sum(rows),
        "files": len(files),
        "write_s": round(written_s, 3),
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    lease = current_lease(storage, date)
    if lease is not None:
        lease.check()  # a run whose lease was taken over while it was paused must not commit
    started = time.perf_counter()
    version = _commit(storage, date, actions, file_schema, metadata, config)
    commit_s = time.perf_counter() - started
    log.info(
        "committed %s version %d: %d rows of %s in %d files (commit %.3f s)",
        table_uri(storage),
        version,
        sum(rows),
        date,
        len(files),
        commit_s,
    )
    clean_up(storage, date, config)
    return Snapshot(
        date=date, version=version, rows=sum(rows), files=relative, metadata=metadata, commit_s=commit_s
    )


def clean_up(storage: Storage, date: str, config: PublishConfig) -> list[str]:
    """Delete files under ``dt=date`` that no kept snapshot names (a crashed run's), then vacuum
    snapshots older than ``history_days``. Only ``date``'s folder is swept for orphans: another
    date's run may be writing its own not-yet-committed files right now."""
    table = open_table(storage)
    versions = [h["version"] for h in table.history()]
    unreferenced = table.vacuum(
        retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True, keep_versions=versions
    )
    orphans = [p for p in unreferenced if p.startswith(f"dt={date}/") and p.endswith(".parquet")]
    for path in orphans:
        retry(lambda p=path: storage.filesystem.delete_file(storage.path(TABLE, p)), what=f"delete {path}")
    if orphans:
        log.info(
            "deleted %d files of %s that no commit names (a run that died before committing)",
            len(orphans),
            date,
        )
    expired = table.vacuum(
        retention_hours=max(int(config.history_days * 24), 1), enforce_retention_duration=False, dry_run=True
    )
    if expired:
        table.vacuum(
            retention_hours=max(int(config.history_days * 24), 1),
            enforce_retention_duration=False,
            dry_run=False,
        )
        log.info("vacuumed %d files of snapshots older than %s days", len(expired), config.history_days)
    return orphans


def read_recommendations(storage: Storage, date: str, as_of: int | str | None = None) -> pa.Table | None:
    """The rows of ``date`` (without ``dt``) at the latest snapshot or ``as_of``; None when absent."""
    if not is_delta(storage):
        if as_of is not None:
            raise PublishError(
                f"--as-of needs a Delta table; {table_uri(storage)} is plain Parquet (publish.format)"
            )
        return read_partition(storage, TABLE, date)
    dataset = open_table(storage, as_of).to_pyarrow_dataset()
    table = dataset.to_table(filter=pads.field("dt") == date)
    return table.drop_columns(["dt"]) if table.num_rows else None


def history(storage: Storage, date: str | None = None) -> list[dict[str, Any]]:
    """seqrec's commits (newest first), each ``{"version", "timestamp", **metadata}``; one date's if given."""
    if not is_delta(storage):
        return []
    commits = []
    for commit in open_table(storage).history():
        meta = commit.get("seqrec")
        if isinstance(meta, dict) and (date is None or meta.get("date") == date):
            commits.append({"version": commit["version"], "timestamp": commit.get("timestamp"), **meta})
    return commits


def rollback(storage: Storage, date: str, config: PublishConfig | None = None) -> Snapshot:
    """Restore the rows ``date`` had before its latest commit, as a new commit (history is kept, so a
    second rollback undoes the first)."""
    config = config or PublishConfig()
    commits = history(storage, date)
    if not commits:
        raise PublishError(f"no commit of {date} in {table_uri(storage)}: nothing to roll back")
    latest = commits[0]["version"]
    actions, rows = [], 0
    if latest > 0:
        before = pa.table(open_table(storage, latest - 1).get_add_actions(flatten=True))
        before = before.filter(pads.field("partition.dt") == date)
        for row in before.select(["path", "num_records"]).to_pylist():
            actions.append(_add_action(storage, row["path"], date, row["num_records"] or 0))
            rows += row["num_records"] or 0
    lease = current_lease(storage, date)
    if lease is not None:
        lease.check()
    previous = next((c for c in commits if c["version"] < latest), None)
    metadata = {
        "operation": "rollback",
        "date": date,
        "rows": rows,
        "files": len(actions),
        "restored_version": latest - 1,
        "undone_version": latest,
        "model_version": previous.get("model_version") if previous else None,
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    file_schema = pa.schema(open_table(storage).schema().to_arrow())
    started = time.perf_counter()
    version = _commit(storage, date, actions, file_schema, metadata, config)
    log.info(
        "rolled %s back to its rows of version %d (%d rows) as version %d", date, latest - 1, rows, version
    )
    return Snapshot(
        date=date,
        version=version,
        rows=rows,
        files=[a.path for a in actions],
        metadata=metadata,
        commit_s=time.perf_counter() - started,
    )


# -- the plain-Parquet format ----------------------------------------------------------------------
def publish_partition(
    storage: Storage, table: str, date: str, write: Callable[[str], None], manifest: dict[str, Any]
) -> dict[str, Any]:
    """Replace ``table/dt=date`` with what ``write(directory)`` produces, ``_SUCCESS`` last; the manifest."""
    partition = ("/".join((table, f"dt={date}")),)
    storage.delete_file(*partition, SUCCESS)
    storage.delete_dir(*partition)
    write(storage.path(*partition))
    files = storage.list_files(*partition, suffix=".parquet")
    rows = sum(
        retry(lambda f=f: pq.read_metadata(f, filesystem=storage.filesystem).num_rows, what=f"stat {f}")
        for f in files
    )
    manifest = {
        **manifest,
        "rows": rows,
        "files": [f.rsplit("/", 1)[1] for f in files],
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    storage.write_json(manifest, *partition, SUCCESS)
    log.info("published %s: %d rows in %d files", storage.uri(*partition), rows, len(files))
    return manifest


def read_partition(storage: Storage, table: str, date: str) -> pa.Table | None:
    """The published partition, or None when it is absent or incomplete (no ``_SUCCESS``)."""
    partition = "/".join((table, f"dt={date}"))
    if not storage.exists(partition, SUCCESS):
        return None
    manifest = storage.read_json(partition, SUCCESS)
    parts = [storage.read_table(partition, name) for name in manifest["files"]]
    return pa.concat_tables(parts) if parts else None


def published_dates(storage: Storage, table: str = TABLE) -> list[str]:
    """Dates with published rows: from the Delta log, or the ``dt=`` folders with ``_SUCCESS``."""
    if table == TABLE and is_delta(storage):
        return sorted(p["dt"] for p in open_table(storage).partitions())
    return [
        d.removeprefix("dt=")
        for d in storage.list_dirs(table)
        if d.startswith("dt=") and storage.exists(table, d, SUCCESS)
    ]
