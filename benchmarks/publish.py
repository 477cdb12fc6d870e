"""The cost of publishing a night: the Delta commit against the plain-Parquet ``_SUCCESS`` way.

A synthetic night of ``--users`` rows x k=10 (the published schema) is written as files of 250k rows,
as scoring's ``write_parquet`` does, and published both ways, twice each (a first night, then a
re-publish of the same date). Printed per way: seconds to write the files, seconds from the files
being complete to readers seeing the new rows (the commit: Delta's re-publish window, in which
readers still see the old rows; for Parquet the ``_SUCCESS`` write, before which readers saw
nothing), and the whole publish.

    python benchmarks/publish.py --users 1000000           # local root in a temp dir
    python benchmarks/publish.py --users 1000000 --s3      # a SeaweedFS server on loopback
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqrec.config import PublishConfig  # noqa: E402
from seqrec.publish import publish_recommendations  # noqa: E402
from seqrec.storage import ROW_GROUP_ROWS, Storage  # noqa: E402

K = 10
ROWS_PER_FILE = 250_000


def synthetic_night(users: int, tag: str, seed: int) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, users, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, users - start)
        offsets = pa.array(np.arange(0, (n + 1) * K, K, dtype=np.int32))
        items = pa.array(rng.integers(1, 100_000, n * K, dtype=np.int64))
        scores = pa.array(np.sort(rng.random(n * K, dtype=np.float32).reshape(n, K), axis=1)[:, ::-1].ravel())
        parts.append(
            pa.table(
                {
                    "user_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                    "items": pa.ListArray.from_arrays(offsets, items),
                    "scores": pa.ListArray.from_arrays(offsets, scores),
                    "source": pa.array(["model"] * n, pa.string()),
                    "model_version": pa.array([tag] * n, pa.string()),
                    "generated_at": pa.array(np.full(n, 1_700_000_000_000_000), pa.timestamp("us", tz="UTC")),
                }
            )
        )
    return parts


def measure(storage: Storage, fmt: str, date: str, parts: list[pa.Table], tag: str) -> dict:
    timings: dict[str, float] = {}

    def write(directory: str) -> None:
        started = time.perf_counter()
        storage.filesystem.create_dir(directory, recursive=True)
        for part in parts:
            pq.write_table(
                part,
                f"{directory}/{uuid.uuid4().hex}.parquet",
                filesystem=storage.filesystem,
                row_group_size=ROW_GROUP_ROWS,
            )
        timings["write_s"] = time.perf_counter() - started

    started = time.perf_counter()
    snapshot = publish_recommendations(
        storage, date, write, {"model_version": tag}, PublishConfig(format=fmt)
    )
    total = time.perf_counter() - started
    return {
        "format": fmt,
        "tag": tag,
        "rows": snapshot.rows,
        "write_s": round(timings["write_s"], 2),
        "commit_s": round(snapshot.commit_s, 3) if fmt == "delta" else None,
        "publish_s": round(total, 2),
        "overhead_s": round(total - timings["write_s"], 3),
    }


def run(root_for, users: int) -> list[dict]:
    nights = [synthetic_night(users, "v1", 1), synthetic_night(users, "v2", 2)]
    results = []
    for fmt in ("parquet", "delta"):
        storage = root_for(fmt)
        for parts, tag in zip(nights, ("v1", "v2")):
            results.append(measure(storage, fmt, "2024-01-07", parts, tag))
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--s3", action="store_true", help="publish to a SeaweedFS S3 server on loopback")
    args = parser.parse_args()
    if not args.s3:
        with tempfile.TemporaryDirectory(prefix="seqrec-publish-bench-") as tmp:
            run(lambda fmt: Storage(f"{tmp}/{fmt}"), args.users)
        return
    from seqrec.testing.s3server import S3Server

    with S3Server() as s3:
        os.environ.update(s3.env())
        bucket = s3.create_bucket("publish-bench")
        run(lambda fmt: Storage(f"s3://{bucket}/{fmt}"), args.users)


if __name__ == "__main__":
    main()
