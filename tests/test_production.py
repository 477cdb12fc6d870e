"""Production paths: the nightly job on a real S3 server, faults injected from outside."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pyarrow.compute as pc
import pytest
from conftest import FIRST_NIGHT, this_jobs_live_actors

from seqrec import artifact
from seqrec.config import load_config
from seqrec.lease import Holder
from seqrec.nightly import run_nightly
from seqrec.prepare import read_sequences
from seqrec.publish import history, read_recommendations
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic
from seqrec.training import train

SPEC = SyntheticSpec(num_users=400, num_items=100, mean_events=20, days=2, end_date="2024-02-02", bad_rows=10)
# Best validation NDCG@10 of a restored run against an uninterrupted one (see the worker-kill test).
# Three repeats of that test (4 epochs, resumed at epoch 1) gave killed/uninterrupted 0.7034/0.7178,
# 0.7092/0.7154 and 0.7123/0.7067: differences of 0.014, 0.006 and 0.006, all six runs within 0.015
# of each other (run-to-run noise: Ray Data's batch order). Twice the largest difference:
TOLERANCE = 0.03
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_row_per_user(storage: Storage, date: str) -> None:
    table = read_recommendations(storage, date)
    users = read_sequences(storage, date, columns=["user_id"]).num_rows
    assert table is not None and table.num_rows == users
    assert len(pc.unique(table["user_id"])) == users


# Longer than pyarrow's own S3 retries, so seqrec's retry must take over: they gave up after ~12.6 s
# on a quiet host, but one call outlasted a 16 s outage on a loaded one.
OUTAGE_S = 30.0


@pytest.fixture(scope="module")
def s3_night(ray_local, s3_server, demo_config):
    """The whole night against the S3 server, with two hard crashes of the server mid-night.

    Crash 1, between prepare and the candidate's first storage call: the server stays down for
    OUTAGE_S, longer than pyarrow's own retries, so seqrec's retry must take over (and log it).
    Crash 2, as soon as the first Ray Train checkpoint is in the bucket: the server restarts at once
    while workers go on checkpointing. Every log record of the night (any logger, DEBUG and up) is kept.
    """
    import uuid

    from conftest import _AWS_ENV_TO_CLEAR

    import seqrec.candidate as candidate
    import seqrec.nightly as nightly
    from seqrec.runtime import quiet_third_party_loggers

    times: dict[str, float] = {}
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name} {record.levelname} {record.getMessage()}")

    with pytest.MonkeyPatch.context() as mp:
        for key in _AWS_ENV_TO_CLEAR:
            mp.delenv(key, raising=False)
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        storage = Storage(f"s3://{s3_server.create_bucket(f't-{uuid.uuid4().hex[:16]}')}/root")
        write_synthetic(storage, SPEC)
        real_candidate, real_train = nightly.train_candidate, candidate.train

        def candidate_after_an_outage_begins(*args, **kwargs):
            # The night's next storage call (the promoted model's pointer) meets the outage.
            times["crash_1"] = time.time()
            s3_server.stop(kill=True)

            def back() -> None:
                time.sleep(OUTAGE_S)
                s3_server.start()
                times["back_1"] = time.time()

            threading.Thread(target=back, daemon=True).start()
            result = real_candidate(*args, **kwargs)
            times["training_ended"] = time.time()
            return result

        def train_and_start_the_watcher(*args, **kwargs):
            times["records_before_training"] = len(records)
            watcher.start()  # its own storage calls come after crash 1
            return real_train(*args, **kwargs)

        def crash_at_first_checkpoint() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and "training_ended" not in times:
                try:
                    found = any(
                        d.startswith("checkpoint_")
                        for run in storage.list_dirs("runs")
                        for d in storage.list_dirs("runs", run)
                    )
                except OSError:
                    found = False
                if found:
                    times["crash_2"] = time.time()
                    s3_server.restart(kill=True)
                    times["back_2"] = time.time()
                    return
                time.sleep(0.2)

        # As every entry point sets up logging (seqrec.runtime.setup_logging), not as an earlier
        # test happened to leave it.
        quiet_third_party_loggers()
        keep, root = Keep(level=logging.DEBUG), logging.getLogger()
        level = root.level
        root.addHandler(keep)
        root.setLevel(logging.DEBUG)
        watcher = threading.Thread(target=crash_at_first_checkpoint, daemon=True)
        try:
            with pytest.MonkeyPatch.context() as hooks:  # this night only
                hooks.setattr(nightly, "train_candidate", candidate_after_an_outage_begins)
                hooks.setattr(candidate, "train", train_and_start_the_watcher)
                started = time.perf_counter()
                result = run_nightly(storage, SPEC.end_date, demo_config)
                print(f"nightly on S3 with two server crashes: {time.perf_counter() - started:.1f} s")
        finally:
            root.removeHandler(keep)
            root.setLevel(level)
            if watcher.is_alive():
                watcher.join(timeout=60)
        yield storage, result, times, records


def test_nightly_on_s3_survives_server_crashes(s3_night):
    storage, result, times, records = s3_night
    # Both crashes happened, and were over, before training ended (not after the night).
    assert times["crash_1"] < times["back_1"] < times["training_ended"]
    assert times["crash_2"] < times["back_2"] < times["training_ended"], times
    assert times["back_1"] - times["crash_1"] >= OUTAGE_S
    night_before_training = records[: times["records_before_training"]]  # the night's own calls only
    retries = [r for r in night_before_training if r.startswith("seqrec.storage WARNING") and "retrying" in r]
    assert retries, "no storage retry was logged"
    _one_row_per_user(storage, SPEC.end_date)
    assert artifact.promoted_version(storage) == result.live_model
    assert storage.exists("reports", f"dt={SPEC.end_date}", "report.json")
    assert storage.list_dirs("runs"), "Ray Train checkpoints must live under runs/ in the bucket"


def test_no_credential_in_any_log_report_manifest_or_config_of_an_s3_night(
    s3_night, s3_server, ray_local, demo_config
):
    """The night's log records, every object it wrote (reports, manifests, _SUCCESS, PROMOTED.json,
    model configs, checkpoints), its config dump and the Ray session's logs hold neither the access
    key nor the secret key."""
    from pathlib import Path

    import pyarrow.fs as pafs

    storage, _, _, records = s3_night
    credentials = [s3_server.secret_key.encode(), s3_server.access_key.encode()]
    texts: dict[str, bytes] = {
        "log records": "\n".join(records).encode(),
        "config dump": demo_config.dumps().encode(),
    }
    infos = storage.filesystem.get_file_info(pafs.FileSelector(storage.path(), recursive=True))
    written = [i.path for i in infos if i.type == pafs.FileType.File]
    assert any(p.endswith("report.json") for p in written)
    assert any(p.endswith("manifest.json") for p in written)
    for path in written:
        with storage.filesystem.open_input_stream(path) as f:
            texts[path] = f.read()
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    ray_logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert ray_logs
    for path in ray_logs:
        texts[str(path)] = path.read_bytes()
    leaks = [where for where, data in texts.items() if any(c in data for c in credentials)]
    leaked_records = [r[:300] for r in records if any(c.decode() in r for c in credentials)]
    assert not leaks, f"credentials found in {leaks}: {leaked_records[:3]}"


_CRASHING_SCORE = textwrap.dedent("""
    import os, signal, sys
    import seqrec.score as score
    publish = score.publish_recommendations

    def write_then_die(storage, date, write, metadata, config):
        def write_parts(directory):
            write(directory)
            os.kill(os.getpid(), signal.SIGKILL)   # the driver dies after the data files, before the commit
        return publish(storage, date, write_parts, metadata, config)

    score.publish_recommendations = write_then_die
    from seqrec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def trained_night(first_night) -> Storage:
    """A night already trained, scored and published (this module's copy of the session's first)."""
    return first_night[0]


def _score_args(storage: Storage, ray_local, ttl_s: float) -> list[str]:
    address = ray_local.get_runtime_context().gcs_address
    return [
        "score",
        "--root",
        storage.root,
        "--date",
        FIRST_NIGHT.end_date,
        "--ray-address",
        address,
        "--config",
        "configs/demo.yaml",
        "--set",
        "score.batch_size=64",
        "--set",
        f"publish.lease_ttl_s={ttl_s}",
    ]


def test_scoring_driver_killed_mid_write_keeps_the_previous_night(trained_night, ray_local):
    from seqrec.testing.readers import duckdb_connection, duckdb_count

    storage, date = trained_night, FIRST_NIGHT.end_date
    before = read_recommendations(storage, date)
    files_before = storage.list_files("recommendations", f"dt={date}", suffix=".parquet")
    args = _score_args(storage, ray_local, ttl_s=4)
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_SCORE, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    files = storage.list_files("recommendations", f"dt={date}", suffix=".parquet")
    assert len(files) > len(files_before), "the data files were written"
    assert read_recommendations(storage, date).equals(before)  # readers still see the previous night
    rows, _ = duckdb_count(duckdb_connection(storage), storage, date)
    assert rows == before.num_rows
    shown = subprocess.run(
        [sys.executable, "-m", "seqrec.cli", "show", "--root", storage.root, "--date", date],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"recommendations for {date}: {before.num_rows} users" in shown.stdout, shown.stderr[-2000:]

    # The dead run's lease is left behind; the next run takes it over once it has expired.
    lease = Holder.loads(storage.read_bytes("leases", f"dt={date}.json"))
    time.sleep(max(0.0, lease.renewed_at + lease.ttl_s + 0.5 - time.time()))
    rerun = subprocess.run(
        [sys.executable, "-m", "seqrec.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "took over the lease" in rerun.stderr
    _one_row_per_user(storage, date)
    committed = {c["version"] for c in history(storage, date)}
    left = storage.list_files("recommendations", f"dt={date}", suffix=".parquet")
    assert len(left) == len(files_before) + 1, "the crashed run's files are cleaned up"
    assert not storage.exists("leases", f"dt={date}.json"), "the lease is released at the end"
    assert committed


def test_two_concurrent_runs_of_one_night_exactly_one_publishes(trained_night, ray_local):
    storage, date = trained_night, FIRST_NIGHT.end_date
    commits_before = len(history(storage, date))
    args = _score_args(storage, ray_local, ttl_s=60)
    first = subprocess.Popen(
        [sys.executable, "-m", "seqrec.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while (
            not storage.exists("leases", f"dt={date}.json")
            and time.time() < deadline
            and first.poll() is None
        ):
            time.sleep(0.1)
        started = time.perf_counter()
        second = subprocess.run(
            [sys.executable, "-m", "seqrec.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        refused_s = time.perf_counter() - started
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 75, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"seqrec: error: the night {date} is being written by host ")
    assert f"pid {first.pid} " in message and "since " in message, message
    print(f"second run refused in {refused_s:.1f} s: {message}")
    assert len(history(storage, date)) == commits_before + 1
    _one_row_per_user(storage, date)


def _this_jobs_train_workers(ray_local) -> list[int]:
    """Pids of the live Ray Train workers of this test session's own Ray job (from Ray's actor table):
    never another job's processes on a shared machine."""
    actors = this_jobs_live_actors(ray_local)
    return [a["Pid"] for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def test_training_worker_killed_mid_run_restores_from_checkpoint(trained_night, ray_local):
    storage, date = trained_night, FIRST_NIGHT.end_date
    config = load_config(
        "configs/demo.yaml",
        [
            "train.epochs=4",
            "train.patience=4",
            "model.max_len=30",
            "prepare.max_len=30",
            "train.warm_start=false",
            "train.weight_average=0.9",  # the average is checkpointed and resumed too
        ],
    )
    sequences = read_sequences(storage, date, columns=["user_id", "item_ids", "event_types"])
    killed: list[int] = []
    run_name = f"train-killed-{time.time_ns()}"

    def kill_a_worker_after_a_registered_checkpoint() -> None:
        # Only once Ray Train's controller has registered a checkpoint (its snapshot file lists it):
        # a checkpoint directory on storage is not enough, a hard kill may lose the reports that
        # are not registered yet (see PITFALLS), and the restored attempt then starts from scratch.
        deadline = time.time() + 300
        while time.time() < deadline:
            snapshot = ("runs", run_name, "checkpoint_manager_snapshot.json")
            if storage.exists(*snapshot) and storage.read_json(*snapshot)["checkpoint_results"]:
                workers = _this_jobs_train_workers(ray_local)
                if workers:
                    assert all(psutil.Process(pid).is_running() for pid in workers)
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_a_worker_after_a_registered_checkpoint, daemon=True)
    thread.start()
    result = train(
        storage,
        sequences,
        model_config=config.model,
        train_config=config.train,
        prepare_config=config.prepare,
        run_name=run_name,
    )
    thread.join(timeout=10)
    assert killed, "no training worker of this job was found to kill"
    assert len(result.restores) == 1, result.restores  # exactly one failure, one restore
    assert result.restores[0] >= 1  # resumed from a checkpoint, not from scratch
    epochs = [h["epoch"] for h in result.history]
    assert epochs == sorted(set(epochs)) and epochs[-1] == config.train.epochs - 1, epochs
    uninterrupted = train(
        storage,
        sequences,
        model_config=config.model,
        train_config=config.train,
        prepare_config=config.prepare,
        run_name=f"train-clean-{time.time_ns()}",
    )
    assert uninterrupted.restores == []
    killed_best, clean_best = result.best_val["val_ndcg@10"], uninterrupted.best_val["val_ndcg@10"]
    print(
        f"best val NDCG@10: killed {killed_best:.4f} (resumed at epoch {result.restores[0]}), "
        f"uninterrupted {clean_best:.4f}"
    )
    assert killed_best > 0.3
    assert abs(killed_best - clean_best) < TOLERANCE
