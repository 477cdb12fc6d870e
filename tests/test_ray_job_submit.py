"""`ray job submit` of the nightly job against a real two-node Ray cluster on this machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import psutil
import pyarrow as pa
import pytest

from seqrec.publish import read_recommendations
from seqrec.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(marker: str) -> None:
    """Stop only this cluster's processes (``ray stop`` would also stop the session's local Ray).

    Ray renames its processes (``ray::DashboardAgent``), so they are found by an environment
    variable every process of the cluster inherits from ``ray start``.
    """
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SEQREC_TEST_CLUSTER") == marker:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _ray_start(ray: str, args: list[str], env: dict[str, str]) -> None:
    """``ray start``; a failure raises with Ray's own output, which names the cause."""
    done = subprocess.run([ray, "start", *args], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(
            f"ray start {' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        )


@pytest.fixture(scope="module")
def two_node_cluster():
    marker = uuid.uuid4().hex[:8]
    temp_dir = f"/tmp/rj-{marker}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "SEQREC_TEST_CLUSTER": marker,
        # The job's python is whatever the raylet finds first on PATH: this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    ray = str(Path(sys.executable).parent / "ray")

    # Every port explicit and free: another Ray on this host (the session's) holds the defaults.
    # Two logical CPUs a node: two evaluation (and scoring) actors of 0.5 CPU, one a node, leave
    # each node the whole CPU that a read task asks for.
    def node_ports() -> list[str]:
        return [
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
        ]

    try:
        # The head's start failed once in a CI run (its output was not kept). A port found free can be
        # taken before Ray binds it, so the head gets a second try on fresh ports; the first failure's
        # output stays visible as a warning.
        for attempt in range(2):
            gcs, dashboard = _free_port(), _free_port()
            try:
                _ray_start(
                    ray,
                    [
                        "--head",
                        f"--port={gcs}",
                        "--node-ip-address=127.0.0.1",
                        "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard}",
                        f"--ray-client-server-port={_free_port()}",
                        f"--temp-dir={temp_dir}",
                        *node_ports(),
                    ],
                    env,
                )
                break
            except RuntimeError as error:
                if attempt:
                    raise
                warnings.warn(f"retrying on fresh ports: {error}")
                _kill_cluster(marker)
                shutil.rmtree(temp_dir, ignore_errors=True)
        # Its own temp dir: two nodes on one host must not share runtime-env folders (each node's
        # agent unpacks the job's working_dir there and would delete it under the other's driver).
        _ray_start(
            ray,
            [
                f"--address=127.0.0.1:{gcs}",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir}-w",
                *node_ports(),
            ],
            env,
        )
        yield f"http://127.0.0.1:{dashboard}", env, ray
    finally:
        _kill_cluster(marker)
        for directory in (temp_dir, f"{temp_dir}-w"):
            shutil.rmtree(directory, ignore_errors=True)


def test_ray_job_submit_publishes_the_night(two_node_cluster, ray_local, monkeypatch, tmp_path):
    """The whole night as a job on two nodes: evaluation's and scoring's actors run on both (Ray's own
    actor records), and the table equals scoring the same model on the single-node Ray of this
    process, row for row."""
    address, env, ray = two_node_cluster
    root = str(tmp_path / "root")
    entrypoint = (
        f"python jobs/nightly.py --demo --root {root} --config configs/demo.yaml "
        "--set train.epochs=3 --set model.max_len=30 --set prepare.max_len=30 --set train.num_workers=2 "
        "--set score.num_actors=2"
    )
    started = time.perf_counter()
    for _ in range(30):  # the job agent registers a few seconds after `ray start` returns
        job = subprocess.run(
            [
                ray,
                "job",
                "submit",
                f"--address={address}",
                f"--working-dir={REPO}",
                "--submission-id=seqrec-nightly-2024-01-07",
                "--",
                *entrypoint.split(),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        if "No available agent" not in job.stderr:
            break
        time.sleep(2)
    wall = time.perf_counter() - started
    print(f"ray job submit on a two-node cluster: {wall:.1f} s")
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout
    table = read_recommendations(Storage(root), "2024-01-07")
    assert table is not None and table.num_rows == 2000
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    nodes = actor_nodes(address, ("Evaluator", "Recommender"))
    assert len(nodes["Evaluator"]) == 2 and len(nodes["Recommender"]) == 2, nodes
    assert_same_rows_on_one_node(Storage(root), "2024-01-07", table)
    # The README's schedules submit each night under the id seqrec-nightly-<date>: Ray refuses a second one.
    again = subprocess.run(
        [
            ray,
            "job",
            "submit",
            f"--address={address}",
            f"--working-dir={REPO}",
            "--submission-id=seqrec-nightly-2024-01-07",
            "--no-wait",
            "--",
            *entrypoint.split(),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr, again.stderr[-2000:]


def _submit(address: str, env: dict[str, str], ray: str, entrypoint: str) -> subprocess.CompletedProcess:
    for _ in range(30):  # the job agent registers a few seconds after `ray start` returns
        job = subprocess.run(
            [
                ray,
                "job",
                "submit",
                f"--address={address}",
                f"--working-dir={REPO}",
                "--",
                *entrypoint.split(),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        if "No available agent" not in job.stderr:
            return job
        time.sleep(2)
    return job


def task_nodes(address: str, names: set[str]) -> dict[str, set[str]]:
    """Ray's own record of where the cluster ran tasks of these function names: name -> node ids.
    (The evaluate half of the two-node test can ask the same of its actor pool's tasks.)"""
    from ray.util.state import list_tasks

    nodes: dict[str, set[str]] = {}
    for task in list_tasks(address=address, limit=10_000, raise_on_missing_output=False):
        name = task.func_or_class_name.rsplit(".", 1)[-1]
        if name in names and task.node_id:
            nodes.setdefault(name, set()).add(task.node_id)
    return nodes


def actor_nodes(address: str, classes: tuple[str, ...]) -> dict[str, set[str]]:
    """Ray's own record of the nodes the cluster's Ray Data actors of these classes ran on."""
    from ray.util.state import list_actors

    nodes: dict[str, set[str]] = {c: set() for c in classes}
    for actor in list_actors(address=address, limit=10_000, raise_on_missing_output=False):
        for c in classes:
            if f"({c})" in actor.class_name and actor.node_id:
                nodes[c].add(actor.node_id)
    return nodes


def assert_same_rows_on_one_node(storage: Storage, date: str, published: pa.Table) -> None:
    """Scoring the night's live model again on this process's single-node Ray gives the same rows."""
    import numpy as np
    import pyarrow.compute as pc

    from seqrec import artifact
    from seqrec.config import load_config
    from seqrec.score import score

    copy = Storage(tempfile.mkdtemp(prefix="seqrec-one-node-"))
    shutil.copytree(storage.root, copy.root, dirs_exist_ok=True)
    score(copy, date, artifact.promoted_version(storage), load_config("configs/demo.yaml").score)
    again = read_recommendations(copy, date).sort_by("user_id")
    published = published.sort_by("user_id")
    exact = ["user_id", "items", "source", "model_version"]
    assert again.select(exact).equals(published.select(exact))
    # Scores to float32 rounding: two actors' batches are not one actor's (another matmul shape).
    np.testing.assert_allclose(
        pc.list_flatten(again["scores"]).to_numpy(),
        pc.list_flatten(published["scores"]).to_numpy(),
        rtol=1e-5,
    )
    shutil.rmtree(copy.root, ignore_errors=True)


def test_prepare_runs_on_both_nodes_and_equals_one_node(two_node_cluster, ray_local, tmp_path, monkeypatch):
    """A night's prepare tasks run on both nodes of the cluster, and its sequences, quarantine and
    counts equal the same prepare on the single-node Ray of this process, row for row."""
    from seqrec.config import PrepareConfig
    from seqrec.prepare import prepare, read_sequences
    from seqrec.synthetic import SyntheticSpec, write_synthetic

    address, env, ray = two_node_cluster
    spec = SyntheticSpec(num_users=300, num_items=80, mean_events=12, bad_rows=20)
    cluster, local = Storage(str(tmp_path / "cluster")), Storage(str(tmp_path / "local"))
    for storage in (cluster, local):
        write_synthetic(storage, spec)
    job = _submit(
        address,
        env,
        ray,
        f"python jobs/prepare.py --root {cluster.root} --date {spec.end_date} "
        "--set prepare.buckets=16 --set prepare.rows_per_task=1000",
    )
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    on_cluster = cluster.read_json("sequences", f"dt={spec.end_date}", "_SUCCESS")

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    nodes = task_nodes(address, {"stage_events", "merge_bucket"})
    assert len(nodes["stage_events"] | nodes["merge_bucket"]) == 2, nodes
    assert on_cluster["nodes"] == 2

    single = prepare(local, spec.end_date, PrepareConfig(buckets=16, rows_per_task=1000))
    assert single.nodes == 1
    assert {k: v for k, v in on_cluster.items() if k != "nodes"} == {
        k: v for k, v in single.as_dict().items() if k != "nodes"
    }
    assert (
        read_sequences(cluster, spec.end_date)
        .sort_by("user_id")
        .equals(read_sequences(local, spec.end_date).sort_by("user_id"))
    )
    quarantined = [
        pa.concat_tables(
            [
                s.read_table(f[len(s.base) + 1 :]).drop_columns(["source_file"])
                for f in s.list_files("quarantine", f"dt={spec.end_date}")
            ]
        )
        for s in (cluster, local)
    ]
    assert quarantined[0].num_rows == single.rows_quarantined and quarantined[0].equals(quarantined[1])
