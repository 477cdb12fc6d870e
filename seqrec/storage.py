"""One storage root over a local directory or an ``s3://`` URI.

Every stage addresses its data through a :class:`Storage`, which hands out paths *relative to the
filesystem it owns* (pyarrow style: ``bucket/prefix/...`` for S3, absolute paths locally) together
with that filesystem. Ray Data, Ray Train and pyarrow all accept the pair, so no stage needs to know
where the bytes live.

S3 endpoint and credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) and ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for S3-compatible stores. Nothing here logs a credential.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from seqrec.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger("seqrec.storage")

# Rows per Parquet row group. A reader decodes a whole row group at once (however small the batches
# it asks for), so this bounds what scoring's streaming reader holds: 64k sequences of 50 items are
# ~30 MB, where one row group per 200k-user file held ~0.6 GiB per read worker.
ROW_GROUP_ROWS = 65_536

# Errors worth a retry against object storage: connection resets, a restarting server, throttling.
_TRANSIENT = (OSError, ConnectionError, TimeoutError)


def retry(fn: Callable[[], T], *, attempts: int = 5, first_delay_s: float = 0.5, what: str = "") -> T:
    """Call ``fn`` until it succeeds, backing off exponentially on transient I/O errors."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except _TRANSIENT as exc:
            if attempt == attempts:
                raise OSError(f"storage operation {what!r} failed after {attempts} attempts: {exc}") from exc
            # One line per retry: a store that keeps failing shows in the log before the error does.
            log.warning(
                "storage operation %r failed (attempt %d of %d), retrying in %.1f s: %s",
                what,
                attempt,
                attempts,
                delay,
                exc,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": 10,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=6),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        kwargs["allow_bucket_creation"] = True
        # S3-compatible stores usually want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


@dataclass
class Storage:
    """A storage root: ``/some/dir`` or ``s3://bucket/prefix``."""

    root: str
    filesystem: pafs.FileSystem = field(init=False, repr=False)
    base: str = field(init=False)

    def __post_init__(self) -> None:
        if self.root.startswith("s3://"):
            self.filesystem = _s3_filesystem()
            self.base = self.root[len("s3://") :].rstrip("/")
            if not self.base.split("/", 1)[0]:  # "s3://" and "s3:///prefix" name no bucket
                raise ConfigError(f"storage root {self.root!r} names no bucket; use s3://bucket/prefix")
        elif "://" in self.root:
            raise ConfigError(
                f"unsupported storage root {self.root!r}: use a local directory or s3://bucket/prefix"
            )
        else:
            self.filesystem = pafs.LocalFileSystem()
            self.base = str(Path(self.root).expanduser().resolve())
            Path(self.base).mkdir(parents=True, exist_ok=True)

    # -- addressing --------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of ``parts`` below the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Human-facing address of ``parts``, with ``s3://`` where it applies."""
        p = self.path(*parts)
        return f"s3://{p}" if self.is_s3 else p

    def __reduce__(self):  # pickles by root only: filesystems are rebuilt from the environment
        return (Storage, (self.root,))

    # -- small objects -----------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        info = retry(lambda: self.filesystem.get_file_info(self.path(*parts)), what="stat")
        return info.type != pafs.FileType.NotFound

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)

        def _write() -> None:
            if not self.is_s3:
                self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
                tmp = f"{path}.tmp-{os.getpid()}"
                with self.filesystem.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, path)  # atomic on POSIX: a reader never sees half a file
            else:
                with self.filesystem.open_output_stream(path) as f:  # S3 PUT is atomic per object
                    f.write(data)

        retry(_write, what=f"write {path}")

    def read_bytes(self, *parts: str) -> bytes:
        path = self.path(*parts)

        def _read() -> bytes:
            with self.filesystem.open_input_stream(path) as f:
                return f.read()

        return retry(_read, what=f"read {path}")

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_table(self, table: pa.Table, *parts: str, row_group_size: int = ROW_GROUP_ROWS) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size)
        self.write_bytes(sink.getvalue().to_pybytes(), *parts)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        path = self.path(*parts)
        return retry(
            lambda: pq.read_table(path, filesystem=self.filesystem, columns=columns), what=f"read {path}"
        )

    # -- directories -------------------------------------------------------------------------
    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Files (filesystem paths) below ``parts``, sorted, ignoring hidden/underscore files and
        folders (as pyarrow and Spark do: ``_staging/``, quarantined ``_files/``)."""
        top = self.path(*parts)
        selector = pafs.FileSelector(top, recursive=True, allow_not_found=True)
        infos = retry(lambda: self.filesystem.get_file_info(selector), what="list")
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(suffix)
            and not any(p.startswith(("_", ".")) for p in i.path[len(top) :].split("/") if p)
        )

    def list_dirs(self, *parts: str) -> list[str]:
        selector = pafs.FileSelector(self.path(*parts), recursive=False, allow_not_found=True)
        infos = retry(lambda: self.filesystem.get_file_info(selector), what="list")
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete_dir(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.exists(*parts):
            retry(lambda: self.filesystem.delete_dir(path), what=f"delete {path}")

    def delete_file(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.exists(*parts):
            retry(lambda: self.filesystem.delete_file(path), what=f"delete {path}")

    def move_file(self, source: str, *parts: str) -> None:
        """Move the file at filesystem path ``source`` to ``parts`` below the root (a rename locally,
        copy and delete on S3)."""
        path = self.path(*parts)
        if not self.is_s3:
            self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        retry(lambda: self.filesystem.move(source, path), what=f"move {source}")

    def download_dir(self, parts: str, local_dir: str | Path) -> Path:
        """Copy a directory below the root to a local directory (for model artifacts)."""
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        src = self.path(parts)
        if not self.is_s3:
            return Path(src)
        retry(
            lambda: pafs.copy_files(
                src,
                str(local),
                source_filesystem=self.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            ),
            what=f"download {src}",
        )
        return local

    def upload_dir(self, local_dir: str | Path, parts: str) -> None:
        dst = self.path(parts)
        if not self.is_s3:
            self.filesystem.create_dir(dst, recursive=True)
        retry(
            lambda: pafs.copy_files(
                str(local_dir),
                dst,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
            ),
            what=f"upload {dst}",
        )

    def ensure_bucket(self) -> None:
        """Create the bucket of an ``s3://`` root when the store allows it (test servers do)."""
        if self.is_s3:
            bucket = self.base.split("/", 1)[0]
            retry(lambda: self.filesystem.create_dir(bucket), what=f"create bucket {bucket}")


def read_parquet_batches(paths: pa.Table, root: str, rows: int, columns: list[str]) -> Iterator[pa.Table]:
    """Ray Data batch function: Parquet ``paths`` under ``root`` -> their ``columns``, ``rows`` at a time.

    pyarrow decodes one row group at a time this way (seqrec writes them 64k rows long, see
    ``ROW_GROUP_ROWS``), so a read task holds tens of MB whatever the file size, where a
    ``ray.data.read_parquet`` task held ~1.5 GiB for a 200k-user file. It lives in this module,
    which needs pyarrow alone, because a Ray worker imports a task function's module before it
    runs it: defined in ``seqrec.score``, every read worker first imported torch and transformers
    (~3 s of CPU, taken from the scoring actors on a small machine).

    Each row group is read with :func:`retry` (the file reopened on each attempt): training reads
    its input again every epoch, so a store that restarts meanwhile must not fail the run.
    """
    filesystem = Storage(root).filesystem
    for path in paths["path"].to_pylist():
        groups = retry(
            lambda: pq.ParquetFile(filesystem.open_input_file(path)).num_row_groups, what=f"open {path}"
        )
        pending: pa.Table | None = None  # rows of this file not yet yielded
        for group in range(groups):
            table = retry(
                lambda: pq.ParquetFile(filesystem.open_input_file(path)).read_row_group(
                    group, columns=columns
                ),
                what=f"read {path} row group {group}",
            )
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= rows:
                yield pending.slice(0, rows).combine_chunks()
                pending = pending.slice(rows)
        if pending is not None and pending.num_rows:
            yield pending.combine_chunks()
