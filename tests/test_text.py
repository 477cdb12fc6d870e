"""Item text features: the packaged encoder, the embedding cache, alignment to the vocabulary, Ray Data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import pytest
import torch

from seqrec import text
from seqrec.data import Vocabulary
from seqrec.storage import Storage
from seqrec.text import encode_texts, encoder_key, item_text_features, resolve_encoder

TEXTS = {
    10: "red running shoes",
    20: "red sports shoes",
    30: "kitchen knife",
    40: "",  # empty text: zero row
    50: None,  # missing text: zero row
    60: "kitchen knife",  # same text as item 30: encoded once
    99: "not in the vocabulary",
}
VOCAB_IDS = [60, 50, 40, 30, 20, 10, 70]  # not the catalogue's order; 70 has no catalogue row


def write_catalogue(storage: Storage, texts: dict[int, str | None]) -> None:
    storage.write_table(
        pa.table(
            {
                "item_id": pa.array(list(texts), pa.int64()),
                "text": pa.array(list(texts.values()), pa.string()),
                "available": pa.array([True] * len(texts)),
            }
        ),
        "items",
        "items.parquet",
    )


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(items=pa.array(VOCAB_IDS, pa.int64()), event_types=["view"])


@pytest.fixture
def storage(tmp_path) -> Storage:
    storage = Storage(str(tmp_path / "root"))
    write_catalogue(storage, TEXTS)
    return storage


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Number of texts of each encode_texts call made by item_text_features."""
    calls: list[int] = []
    real = text.encode_texts

    def counting(texts, encoder, batch_size=64):
        calls.append(len(texts))
        return real(texts, encoder, batch_size)

    monkeypatch.setattr(text, "encode_texts", counting)
    return calls


def row(features: torch.Tensor, vocab: Vocabulary, item_id: int) -> np.ndarray:
    return features[int(vocab.lookup(pa.array([item_id], pa.int64()))[0])].numpy()


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
def test_packaged_encoder_gives_384_d_unit_vectors():
    assert resolve_encoder("minilm") == resolve_encoder("all-MiniLM-L6-v2")
    assert encoder_key("minilm") == encoder_key("all-MiniLM-L6-v2")
    vectors = encode_texts(["red running shoes", "red sports shoes", "kitchen knife"], "minilm")
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.2, (similar, unrelated)


def test_batching_keeps_rows_in_place():
    texts = [
        "a much longer title about a blue winter jacket with a hood",
        "mug",
        "red running shoes",
        "kitchen knife",
        "a paperback novel",
    ]
    batched = encode_texts(texts, "minilm", batch_size=2)
    alone = np.concatenate([encode_texts([t], "minilm") for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_unknown_encoder_is_a_clear_error(tmp_path, storage, vocab):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_encoder("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model directory"):
        item_text_features(storage, vocab, str(tmp_path / "no-such-model"))


def test_missing_catalogue_is_a_clear_error(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="no item catalogue"):
        item_text_features(Storage(str(tmp_path / "empty")), vocab, "minilm")


# --------------------------------------------------------------------------------------------
# Features and cache
# --------------------------------------------------------------------------------------------
def test_features_are_aligned_to_vocabulary_indices(storage, vocab):
    features = item_text_features(storage, vocab, "minilm", use_ray=False)
    assert features.dtype == torch.float32 and features.shape == (len(VOCAB_IDS) + 2, 384)
    assert not features[0].any() and not features[-1].any()  # padding, [MASK]
    for item_id in (40, 50, 70):  # empty, null, no catalogue row
        assert not row(features, vocab, item_id).any(), item_id
    for item_id in (10, 20, 30, 60):
        np.testing.assert_allclose(
            row(features, vocab, item_id), encode_texts([TEXTS[item_id]], "minilm")[0], atol=1e-5
        )
    np.testing.assert_allclose(
        np.linalg.norm(features.numpy(), axis=1).round(4), [0, 1, 0, 0, 1, 1, 1, 0, 0]
    )  # indices: pad, 60, 50, 40, 30, 20, 10, 70, mask


def test_cache_computes_only_new_texts(storage, vocab, encoded):
    first = item_text_features(storage, vocab, "minilm", use_ray=False)
    assert encoded == [3]  # three distinct texts; 30 and 60 share one, 99 is not in the vocab

    second = item_text_features(storage, vocab, "minilm", use_ray=False)
    assert encoded == [3]  # everything cached: no encoder call at all
    assert torch.equal(first, second)

    write_catalogue(storage, {**TEXTS, 20: "stainless steel frying pan"})
    third = item_text_features(storage, vocab, "minilm", use_ray=False)
    assert encoded == [3, 1]  # only the edited title
    changed = row(third, vocab, 20)
    np.testing.assert_allclose(changed, encode_texts(["stainless steel frying pan"], "minilm")[0], atol=1e-5)
    assert not np.allclose(changed, row(first, vocab, 20))
    unchanged = [i for i in range(len(VOCAB_IDS) + 2) if i != int(vocab.lookup(pa.array([20]))[0])]
    assert torch.equal(third[unchanged], first[unchanged])

    cache_files = storage.list_files("cache", "text-embeddings", encoder_key("minilm"), suffix=".parquet")
    assert len(cache_files) == 2  # one file per run that computed something


def test_last_catalogue_row_of_an_item_wins(storage, vocab):
    storage.write_table(
        pa.table(
            {
                "item_id": pa.array([10, 30], pa.int64()),
                "text": pa.array(["blue denim jacket", None], pa.string()),
            }
        ),
        "items",
        "update.parquet",
    )  # sorts after items.parquet
    features = item_text_features(storage, vocab, "minilm", use_ray=False)
    np.testing.assert_allclose(
        row(features, vocab, 10), encode_texts(["blue denim jacket"], "minilm")[0], atol=1e-5
    )
    assert not row(features, vocab, 30).any()
    assert row(features, vocab, 60).any()


# --------------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------------
def test_ray_data_path_matches_in_process(tmp_path, ray_local, encoded):
    words = ["red", "blue", "green", "leather", "cotton", "steel", "wooden", "running", "winter", "kitchen"]
    things = ["shoes", "jacket", "knife", "table", "mug"]
    texts = {i: f"{words[i % 10]} {things[i // 10]} no. {i}" for i in range(50)}
    vocab = Vocabulary(items=pa.array(list(texts), pa.int64()), event_types=["view"])
    via_ray, in_process = Storage(str(tmp_path / "ray")), Storage(str(tmp_path / "local"))
    write_catalogue(via_ray, texts)
    write_catalogue(in_process, texts)

    ray_features = item_text_features(via_ray, vocab, "minilm", use_ray=True)
    assert encoded == []  # the driver encoded nothing: the Ray actor did
    local_features = item_text_features(in_process, vocab, "minilm", use_ray=False)
    assert encoded == [50]
    assert ray_features.shape == (52, 384)
    torch.testing.assert_close(ray_features, local_features, atol=1e-5, rtol=0)

    again = item_text_features(via_ray, vocab, "minilm")  # Ray is up, but nothing is missing
    assert encoded == [50] and torch.equal(again, ray_features)
