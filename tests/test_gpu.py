"""GPU paths: Ray Train workers on a GPU (train.use_gpu) and scoring actors on a GPU in bf16
(score.gpus_per_actor). Run where CUDA is present; skipped otherwise, with the reason in the
test output (``-rs``)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import torch

from seqrec import artifact
from seqrec.config import load_config
from seqrec.prepare import prepare, read_sequences
from seqrec.publish import read_recommendations
from seqrec.score import Recommender, score, unavailable_items
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: train.use_gpu, score.gpus_per_actor and bf16 scoring are not exercised here "
    "(run tests/test_gpu.py on a GPU machine)",
)

SPEC = SyntheticSpec(num_users=400, num_items=100, mean_events=20, days=1, end_date="2024-03-01", bad_rows=0)


def test_gpu_training_and_bf16_scoring_agree_with_cpu(ray_local, tmp_path):
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray sees no GPU although CUDA is available"
    storage = Storage(str(tmp_path / "root"))
    write_synthetic(storage, SPEC)
    prepare(storage, SPEC.end_date, load_config("configs/demo.yaml").prepare)
    config = load_config(
        "configs/demo.yaml",
        [
            "train.use_gpu=true",
            "train.num_workers=1",
            "train.epochs=3",
            "train.patience=3",
            "model.max_len=30",
            "score.cpus_per_actor=0.5",
        ],
    )
    sequences = read_sequences(storage, SPEC.end_date, columns=["user_id", "item_ids", "event_types"])
    from seqrec.training import train

    result = train(
        storage,
        sequences,
        model_config=config.model,
        train_config=config.train,
        prepare_config=config.prepare,
        run_name="train-gpu",
    )
    assert result.best_val["val_ndcg@10"] > 0.2  # it learned the planted chains on the GPU
    version = "2024-03-01-gpu"
    artifact.save(storage, artifact.Artifact(version=version, model=result.model, vocab=result.vocab))

    cpu = score(storage, SPEC.end_date, version, config.score)
    cpu_table = read_recommendations(storage, SPEC.end_date)
    gpu_config = dataclasses.replace(config.score, gpus_per_actor=1.0)
    gpu = score(storage, SPEC.end_date, version, gpu_config)
    gpu_table = read_recommendations(storage, SPEC.end_date)
    assert cpu.rows == gpu.rows == sequences.num_rows
    cpu_items = dict(zip(cpu_table["user_id"].to_pylist(), cpu_table["items"].to_pylist()))
    overlap = [
        len(set(items) & set(cpu_items[user])) / len(items)
        for user, items in zip(gpu_table["user_id"].to_pylist(), gpu_table["items"].to_pylist())
    ]
    assert np.mean(overlap) > 0.9  # bf16 changes near-ties only

    loaded = artifact.load(storage, version)
    recommender = Recommender(
        storage.root,
        version,
        10,
        unavailable_items(storage, loaded.vocab),
        dt.datetime.now(dt.UTC),
        device="cuda",
    )
    assert recommender.device.type == "cuda" and recommender.model.dtype == torch.bfloat16
