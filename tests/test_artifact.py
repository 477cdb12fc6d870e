"""seqrec.artifact: model directories, the refusals that keep bad weights out, the promoted pointer."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from seqrec.artifact import (
    PROMOTED,
    Artifact,
    ArtifactError,
    load,
    promote,
    promoted_version,
    read_local,
    save,
    write_local,
)
from seqrec.data import Vocabulary
from seqrec.model import build_model
from seqrec.storage import Storage

NUM_ITEMS = 12
TYPES = ["view", "click"]


def artifact(version: str = "2024-01-02-000001", kind: str = "causal") -> Artifact:
    torch.manual_seed(0)
    model = build_model(
        NUM_ITEMS,
        kind=kind,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        max_len=6,
        dropout=0.0,
        num_event_types=len(TYPES),
    )
    vocab = Vocabulary.build(pa.array([100 + 7 * i for i in range(NUM_ITEMS)], pa.int64()), TYPES)
    vocab.counts = np.arange(NUM_ITEMS + 1, dtype=np.int64)
    return Artifact(
        version=version,
        model=model,
        vocab=vocab,
        metrics={"val": {"ndcg@10": 0.25}},
        manifest={"parent": None, "data": "sequences/dt=2024-01-02"},
    )


@pytest.fixture
def directory(tmp_path):
    return write_local(artifact(), tmp_path / "model")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_write_read_round_trip(tmp_path, kind):
    original = artifact(kind=kind)
    directory = write_local(original, tmp_path / "m")
    assert {p.name for p in directory.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "vocabulary.parquet",
        "metrics.json",
        "manifest.json",
    }
    loaded = read_local(directory, version="v7")
    assert loaded.version == "v7"
    assert read_local(directory).version == "m"  # defaults to the directory name
    assert same_weights(loaded.model, original.model)
    assert loaded.model.config.kind == kind
    assert not loaded.model.training
    assert loaded.vocab.items.to_pylist() == original.vocab.items.to_pylist()
    assert loaded.vocab.event_types == TYPES
    np.testing.assert_array_equal(loaded.vocab.counts, original.vocab.counts)
    assert loaded.metrics == {"val": {"ndcg@10": 0.25}}
    assert loaded.manifest == original.manifest
    items = torch.tensor([[0, 0, 1, 2, 3, 4]])
    assert torch.equal(loaded.model.user_vectors(items), original.model.eval().user_vectors(items))


def test_pickled_weights_instead_of_safetensors_are_refused(directory):
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ArtifactError) as err:
        read_local(directory)
    message = str(err.value)
    assert "no model.safetensors" in message and "pytorch_model.bin" in message and "safetensors" in message


@pytest.mark.parametrize("name", ["optimizer.pt", "extra.pkl", "pytorch_model.bin"])
def test_pickle_beside_safetensors_is_refused(directory, name):
    torch.save({"x": torch.zeros(1)}, directory / name)
    with pytest.raises(ArtifactError, match=f"pickled files .*{name}"):
        read_local(directory)


def test_vocabulary_size_mismatch_is_refused(directory):
    smaller = Vocabulary.build(pa.array(range(NUM_ITEMS - 2), pa.int64()), TYPES)
    pq.write_table(smaller.to_table(), directory / "vocabulary.parquet")
    with pytest.raises(
        ArtifactError,
        match=f"vocabulary has {NUM_ITEMS - 2} items but the weights were built for {NUM_ITEMS}",
    ):
        read_local(directory)


@pytest.mark.parametrize("change", ["other ids", "other order", "other event types"])
def test_vocabulary_of_the_same_size_but_different_is_refused(directory, change):
    original = read_local(directory).vocab
    ids = original.items.to_pylist()
    types = list(TYPES)
    if change == "other ids":
        ids[-1] = ids[-1] + 1
    elif change == "other order":
        ids[0], ids[1] = ids[1], ids[0]
    else:
        types = types[::-1]
    table = pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "index": pa.array(range(1, NUM_ITEMS + 1), pa.int64()),
            "count": pa.array(original.counts[1:], pa.int64()),
        }
    )
    pq.write_table(table, directory / "vocabulary.parquet")
    if change == "other event types":
        config = json.loads((directory / "config.json").read_text())
        config["event_types"] = types
        (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="not the vocabulary these weights were trained with"):
        read_local(directory)


def test_vocabulary_checksum_is_recorded_and_string_ids_work(tmp_path):
    from seqrec.artifact import vocabulary_checksum

    original = artifact()
    directory = write_local(original, tmp_path / "m")
    assert json.loads((directory / "config.json").read_text())["vocabulary_checksum"] == vocabulary_checksum(
        original.vocab
    )
    a = Vocabulary.build(pa.array(["ab", "c"]), TYPES)
    b = Vocabulary.build(pa.array(["a", "bc"]), TYPES)  # same bytes joined, other split
    assert vocabulary_checksum(a) != vocabulary_checksum(b)
    assert vocabulary_checksum(a) == vocabulary_checksum(Vocabulary.build(pa.array(["c", "ab"]), TYPES))


def test_missing_config_is_refused(directory):
    (directory / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json is missing"):
        read_local(directory)


def test_weights_for_another_shape_are_refused(directory):
    config = json.loads((directory / "config.json").read_text())
    config["num_items"] = NUM_ITEMS + 5
    (directory / "config.json").write_text(json.dumps(config))
    pq.write_table(
        Vocabulary.build(pa.array(range(NUM_ITEMS + 5), pa.int64()), TYPES).to_table(),
        directory / "vocabulary.parquet",
    )
    with pytest.raises(ArtifactError, match="weights do not"):
        read_local(directory)


def test_missing_tensor_is_refused_not_randomly_initialised(directory):
    state = load_file(directory / "model.safetensors")
    del state["item_embedding.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="item_embedding.weight"):
        read_local(directory)


def test_save_load_and_promote_through_storage(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    assert promoted_version(storage) is None
    first, second = artifact("2024-01-01-000001"), artifact("2024-01-02-000001")
    uri = save(storage, first)
    assert uri == storage.uri("models", first.version)
    save(storage, second)
    assert same_weights(load(storage, first.version).model, first.model)
    with pytest.raises(ArtifactError, match="no model 'missing'"):
        load(storage, "missing")

    promote(storage, first.version, "first model", {"ndcg@10": 0.2})
    assert promoted_version(storage) == first.version
    pointer = storage.read_json("models", PROMOTED)
    assert pointer["previous"] is None
    assert pointer["reason"] == "first model" and pointer["metrics"] == {"ndcg@10": 0.2}
    assert "promoted_at" in pointer

    promote(storage, second.version, "better on validation")
    assert promoted_version(storage) == second.version
    pointer = storage.read_json("models", PROMOTED)
    assert pointer["previous"] == first.version
    assert pointer["metrics"] == {}
    assert load(storage, promoted_version(storage)).version == second.version


def test_a_model_loaded_from_object_storage_leaves_no_copy_on_disk(s3_root, tmp_path, monkeypatch):
    """Every evaluation and scoring actor of every night loads the model: its download is removed
    once the weights are in memory, and they stay usable."""
    storage = Storage(s3_root)
    saved = artifact()
    save(storage, saved)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = load(storage, saved.version)
    assert list(scratch.iterdir()) == []
    assert same_weights(loaded.model, saved.model)
    assert loaded.vocab.num_items == saved.vocab.num_items
