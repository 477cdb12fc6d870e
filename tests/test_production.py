"""Production paths: the nightly job on a real S3 server, faults injected from outside."""

from __future__ import annotations

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

from seqrec import artifact
from seqrec.config import load_config
from seqrec.nightly import run_nightly
from seqrec.prepare import prepare, read_sequences
from seqrec.publish import SUCCESS, read_partition
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic
from seqrec.training import train

SPEC = SyntheticSpec(num_users=400, num_items=100, mean_events=20, days=2, end_date="2024-02-02", bad_rows=10)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_row_per_user(storage: Storage, date: str) -> None:
    table = read_partition(storage, "recommendations", date)
    users = read_sequences(storage, date, columns=["user_id"]).num_rows
    assert table is not None and table.num_rows == users
    assert len(pc.unique(table["user_id"])) == users


def test_nightly_on_s3_survives_server_restart(ray_local, s3_server, s3_root, demo_config):
    """The whole night against the S3 server, which is restarted while the model trains."""
    storage = Storage(s3_root)
    write_synthetic(storage, SPEC)
    restarted = threading.Event()

    def restart_when_training() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not storage.exists("runs"):
            time.sleep(0.5)
        s3_server.restart()
        restarted.set()

    thread = threading.Thread(target=restart_when_training, daemon=True)
    thread.start()
    started = time.perf_counter()
    result = run_nightly(storage, SPEC.end_date, demo_config)
    wall = time.perf_counter() - started
    thread.join(timeout=60)
    assert restarted.is_set()
    print(f"nightly on S3 with a server restart: {wall:.1f} s")
    _one_row_per_user(storage, SPEC.end_date)
    assert artifact.promoted_version(storage) == result.live_model
    assert storage.exists("reports", f"dt={SPEC.end_date}", "report.json")
    assert storage.list_dirs("runs"), "Ray Train checkpoints must live under runs/ in the bucket"


_CRASHING_SCORE = textwrap.dedent("""
    import os, signal, sys
    import seqrec.score as score
    publish = score.publish_partition

    def write_then_die(storage, table, date, write, manifest):
        def write_parts(directory):
            write(directory)
            os.kill(os.getpid(), signal.SIGKILL)   # the driver dies after the parts, before _SUCCESS
        return publish(storage, table, date, write_parts, manifest)

    score.publish_partition = write_then_die
    from seqrec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def trained_night(ray_local, tmp_path_factory, demo_config):
    storage = Storage(str(tmp_path_factory.mktemp("faults")))
    write_synthetic(storage, SPEC)
    run_nightly(storage, SPEC.end_date, demo_config)
    return storage


def test_scoring_driver_killed_mid_write_publishes_nothing(trained_night, ray_local):
    storage, date = trained_night, SPEC.end_date
    address = ray_local.get_runtime_context().gcs_address
    args = ["score", "--root", storage.root, "--date", date, "--ray-address", address,
            "--config", "configs/demo.yaml", "--set", "score.batch_size=64"]
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_SCORE, *args], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert storage.list_files("recommendations", f"dt={date}", suffix=".parquet"), "parts were written"
    assert not storage.exists("recommendations", f"dt={date}", SUCCESS)
    assert read_partition(storage, "recommendations", date) is None

    rerun = subprocess.run([sys.executable, "-m", "seqrec.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _one_row_per_user(storage, date)


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_training_worker_killed_mid_run_restores_from_checkpoint(trained_night, ray_local):
    storage, date = trained_night, SPEC.end_date
    config = load_config("configs/demo.yaml", ["train.epochs=6", "train.patience=6", "model.max_len=30",
                                               "prepare.max_len=30", "train.warm_start=false"])
    sequences = read_sequences(storage, date, columns=["user_id", "item_ids", "event_types"])
    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint() -> None:
        deadline = time.time() + 180
        while time.time() < deadline:
            runs = [d for d in storage.list_dirs("runs") if d.startswith("train-killed")]
            if runs and any(d.startswith("checkpoint_") for d in storage.list_dirs("runs", runs[0])):
                workers = _train_workers()
                if workers:
                    workers[-1].send_signal(signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    thread.start()
    result = train(storage, sequences, model_config=config.model, train_config=config.train,
                   prepare_config=config.prepare, run_name=f"train-killed-{time.time_ns()}")
    thread.join(timeout=10)
    assert killed, "no training worker was found to kill"
    epochs = [h["epoch"] for h in result.history]
    assert epochs == sorted(set(epochs)) and epochs[-1] == config.train.epochs - 1, epochs
    uninterrupted = train(storage, sequences, model_config=config.model, train_config=config.train,
                          prepare_config=config.prepare, run_name=f"train-clean-{time.time_ns()}")
    assert result.best_val["val_ndcg@10"] > 0.3
    assert abs(result.best_val["val_ndcg@10"] - uninterrupted.best_val["val_ndcg@10"]) < 0.1
