"""End to end: the nightly pipeline on synthetic data through real local Ray."""

from __future__ import annotations

import dataclasses

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from seqrec import artifact
from seqrec.nightly import run_nightly
from seqrec.prepare import read_sequences
from seqrec.publish import SUCCESS, read_partition
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic

SPEC = SyntheticSpec(num_users=600, num_items=120, mean_events=20, days=3, end_date="2024-01-03", bad_rows=25)


@pytest.fixture(scope="module")
def night(ray_local, demo_config, tmp_path_factory):
    storage = Storage(str(tmp_path_factory.mktemp("night")))
    write_synthetic(storage, SPEC)
    result = run_nightly(storage, SPEC.end_date, demo_config)
    return storage, result


def test_model_beats_popularity_on_planted_structure(night):
    _, result = night
    test = result.metrics["test"]
    assert test["model"]["ndcg@10"] > 2 * test["popularity"]["ndcg@10"]
    assert test["model"]["ndcg@10"] > 0.3
    assert result.promoted and result.live_model == result.candidate


def test_two_workers_stay_in_sync(night):
    """Data-parallel training really averaged gradients: both ranks hold identical weights."""
    storage, result = night
    history = artifact.load(storage, result.candidate).metrics["history"]
    assert history and all(epoch["replicas_in_sync"] for epoch in history)


def test_one_row_per_user_k_items_none_seen(night, demo_config):
    storage, result = night
    table = read_partition(storage, "recommendations", result.date)
    sequences = read_sequences(storage, result.date)
    assert table.num_rows == sequences.num_rows
    assert len(pc.unique(table["user_id"])) == table.num_rows
    assert set(pc.list_value_length(table["items"]).to_pylist()) == {demo_config.score.k}
    history = dict(zip(sequences["user_id"].to_pylist(), sequences["item_ids"].to_pylist()))
    for user, items, scores in zip(table["user_id"].to_pylist(), table["items"].to_pylist(),
                                   table["scores"].to_pylist()):
        assert not set(items) & set(history[user])
        assert scores == sorted(scores, reverse=True)
    assert set(table["model_version"].to_pylist()) == {result.live_model}
    assert table.schema.field("scores").type.value_type == "float"


def test_success_written_last_with_manifest(night):
    storage, result = night
    partition = storage.path("recommendations", f"dt={result.date}")
    manifest = storage.read_json("recommendations", f"dt={result.date}", SUCCESS)
    parts = storage.list_files("recommendations", f"dt={result.date}", suffix=".parquet")
    assert manifest["rows"] == result.recommendations.rows
    assert len(parts) == 1      # 2000 users < score.rows_per_file: one file, not one per block
    assert sorted(manifest["files"]) == sorted(p.rsplit("/", 1)[1] for p in parts)
    success_mtime = storage.filesystem.get_file_info(f"{partition}/{SUCCESS}").mtime
    assert all(storage.filesystem.get_file_info(p).mtime <= success_mtime for p in parts)


def test_counts_reconcile_and_quarantine_has_reasons(night):
    storage, result = night
    counts = result.prepare
    assert counts.rows_read == counts.rows_kept + counts.rows_quarantined + counts.duplicates_dropped
    assert counts.rows_quarantined > 0 and counts.duplicates_dropped > 0
    quarantine = pq.read_table(storage.path("quarantine", f"dt={result.date}"), filesystem=storage.filesystem)
    assert quarantine.num_rows == counts.rows_quarantined
    assert pc.all(pc.is_valid(quarantine["reason"])).as_py()


def test_artifact_and_report(night):
    storage, result = night
    assert artifact.promoted_version(storage) == result.live_model
    loaded = artifact.load(storage, result.live_model)
    assert loaded.metrics["test"]["model"]["ndcg@10"] == pytest.approx(result.metrics["test"]["model"]["ndcg@10"])
    assert loaded.manifest["training_data"].endswith(f"dt={result.date}")
    for name in ("report.json", "report.md", "training.png", "history.png"):
        assert storage.exists("reports", f"dt={result.date}", name)
    report = storage.read_json("reports", f"dt={result.date}", "report.json")
    assert set(report["timings_s"]) == {"prepare", "train", "evaluate", "score"}
    # Evaluated on the actor pool: every user (fewer than eval.max_users), standard errors beside the means.
    val = report["candidate_metrics"]["val"]
    assert report["candidate_metrics"]["sample"]["fraction"] == 1.0 and val["users"] > 500
    assert 0 < val["stderr"]["model"]["ndcg@10"] < 0.05
    assert report["val_ndcg@10_stderr"]["candidate"] == val["stderr"]["model"]["ndcg@10"]
    assert "±" in result.decision


def test_second_night_warm_starts_and_gates(night, demo_config):
    """The next night extends sequences incrementally, warm-starts, and re-scoring is reproducible."""
    storage, first = night
    gate = dataclasses.replace(demo_config.eval, promote_tolerance=1.0, max_users=300)
    config = dataclasses.replace(demo_config, eval=gate)
    second = run_nightly(storage, first.date, config)          # same date again: replaces the partition
    assert second.promoted
    # The gate judged the candidate and the live model on the same hash sample of about 300 users.
    report = storage.read_json("reports", f"dt={first.date}", "report.json")
    sample = report["candidate_metrics"]["sample"]
    assert report["live_metrics"]["sample"] == sample
    assert sample["fraction"] < 1 and 200 < sample["users"] < 400
    assert report["live_metrics"]["val"]["users"] == report["candidate_metrics"]["val"]["users"]
    loaded = artifact.load(storage, second.candidate)
    assert loaded.manifest["parent"] == first.live_model
    table = read_partition(storage, "recommendations", first.date)
    assert table.num_rows == first.recommendations.rows
    assert len(pc.unique(table["user_id"])) == table.num_rows


def test_seqrec_train_makes_a_candidate_the_nightly_way(night, capsys):
    """`seqrec train` takes the nightly's path: warm-started from the promoted model, saved, not promoted."""
    from seqrec.cli import main

    storage, first = night
    live = artifact.promoted_version(storage)
    assert main(["train", "--root", storage.root, "--date", first.date, "--config", "configs/demo.yaml",
                 "--set", "train.epochs=1", "--set", "model.max_len=30", "--set", "prepare.max_len=30"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1].split()[1].rstrip(":")
    candidate = artifact.load(storage, version)
    assert candidate.manifest["parent"] == live
    assert set(candidate.metrics) >= {"val", "test", "live_val", "history"}
    assert artifact.promoted_version(storage) == live


def test_a_night_without_settings_takes_them_from_the_data(capsys):
    """Fields the user did not set follow the data's shape (printed); the ones they set are kept."""
    import pyarrow as pa

    from seqrec.config import load_config
    from seqrec.nightly import suggest_settings

    sequences = pa.table({"user_id": list(range(300)),
                          "item_ids": [[(u + j) % 500 for j in range(3 + u % 8)] for u in range(300)],
                          "event_types": [["interaction"] * (3 + u % 8) for u in range(300)]})
    config = load_config(None, ["model.dropout=0.3"])
    tuned, changes = suggest_settings(config, sequences, explicit={"model.dropout"})
    assert changes == {"model.max_len": 50, "model.use_event_types": False, "model.num_layers": 1,
                       "train.patience": 8}                                           # short, sparse histories
    assert (tuned.model.max_len, tuned.model.num_layers, tuned.model.dropout) == (50, 1, 0.3)
    assert "model.num_layers=1" in capsys.readouterr().err
    assert suggest_settings(tuned, sequences, explicit={"model.dropout"})[1] == {}
