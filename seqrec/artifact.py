"""Model artifacts under ``models/<version>/`` and the promoted-model pointer.

An artifact is a Hugging Face style directory (``config.json`` + ``model.safetensors``) plus the
item vocabulary (``vocabulary.parquet``), ``metrics.json`` and ``manifest.json``. It is written to
a local directory first and uploaded whole; ``models/PROMOTED.json`` is a single small object, so
switching the live model is one atomic write.

Loading refuses pickled weights and vocabularies that do not match the weights, with errors that
say what is wrong, because a silently mis-aligned vocabulary recommends the wrong items.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers.utils import logging as hf_logging

from seqrec.buildinfo import code_version  # noqa: F401  (re-exported: manifests name it)
from seqrec.data import Vocabulary
from seqrec.errors import UserError
from seqrec.model import SeqRecModel
from seqrec.storage import Storage

log = logging.getLogger("seqrec.artifact")
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

PROMOTED = "PROMOTED.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ArtifactError(UserError, ValueError):
    """A model artifact that must not be used."""


@dataclass
class Artifact:
    version: str
    model: SeqRecModel
    vocab: Vocabulary
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def new_version(date: str) -> str:
    return f"{date}-{dt.datetime.now(dt.UTC).strftime('%H%M%S%f')}"


def vocabulary_checksum(vocab: Vocabulary) -> str:
    """sha256 of the index -> original id mapping and the event types, the order the weights assume.

    Two vocabularies of the same size but another order (or other ids) give other checksums: the
    size check alone would let such a file recommend the wrong items.
    """
    digest = hashlib.sha256()
    items = vocab.items.combine_chunks() if isinstance(vocab.items, pa.ChunkedArray) else vocab.items
    if pa.types.is_integer(items.type):
        digest.update(b"int64\0" + np.asarray(items.cast(pa.int64()), dtype="<i8").tobytes())
    else:
        text = items.cast(pa.string())
        digest.update(b"string\0" + np.asarray(pc.binary_length(text), dtype="<i8").tobytes())
        digest.update("".join(text.to_pylist()).encode())
    digest.update(b"\0".join(t.encode() for t in vocab.event_types))
    return digest.hexdigest()


def write_local(artifact: Artifact, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifact.model.config.event_types = artifact.vocab.event_types
    # Saved beside the weights (config.json), so a vocabulary file swapped afterwards is caught.
    artifact.model.config.vocabulary_checksum = vocabulary_checksum(artifact.vocab)
    artifact.model.save_pretrained(directory)
    pq.write_table(artifact.vocab.to_table(), directory / "vocabulary.parquet")
    import json

    (directory / "metrics.json").write_text(json.dumps(artifact.metrics, indent=2, sort_keys=True))
    (directory / "manifest.json").write_text(
        json.dumps(artifact.manifest, indent=2, sort_keys=True, default=str)
    )
    return directory


def read_local(directory: str | Path, version: str = "") -> Artifact:
    """Load an artifact directory, checking that it is safe and self-consistent."""
    import json

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ArtifactError(f"{directory} is not a model artifact: config.json is missing")
    pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if not (directory / "model.safetensors").exists():
        raise ArtifactError(
            f"{directory}: no model.safetensors"
            + (
                f" (found pickled weights {pickles}; seqrec "
                "never unpickles weights: re-export them as safetensors)"
                if pickles
                else ""
            )
        )
    if pickles:
        raise ArtifactError(
            f"{directory}: pickled files {pickles} beside model.safetensors; remove them, "
            "seqrec loads weights only from safetensors"
        )
    try:
        model, loading = SeqRecModel.from_pretrained(
            directory, use_safetensors=True, output_loading_info=True
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"{directory}: weights do not load into the configured model: {exc}") from exc
    # from_pretrained fills missing tensors with fresh random values and only warns: refuse instead.
    problems = {k: sorted(map(str, v)) for k, v in loading.items() if v}
    if problems:
        raise ArtifactError(f"{directory}: weights do not match the configured model: {problems}")
    table = pq.read_table(directory / "vocabulary.parquet")
    vocab = Vocabulary.from_table(table, getattr(model.config, "event_types", []) or [])
    if vocab.num_items != model.config.num_items:
        raise ArtifactError(
            f"{directory}: vocabulary has {vocab.num_items} items but the weights were built for "
            f"{model.config.num_items}; the artifact is inconsistent, do not use it"
        )
    recorded = getattr(model.config, "vocabulary_checksum", None)
    if recorded is not None and recorded != vocabulary_checksum(vocab):
        raise ArtifactError(
            f"{directory}: vocabulary.parquet is not the vocabulary these weights were trained "
            "with (same size, other ids or order: checksum differs); do not use it"
        )
    if model.item_embedding.weight.shape[0] != vocab.num_items + 2:
        raise ArtifactError(
            f"{directory}: item table has {model.item_embedding.weight.shape[0]} rows, "
            f"expected {vocab.num_items + 2} for the vocabulary"
        )
    metrics = (
        json.loads((directory / "metrics.json").read_text()) if (directory / "metrics.json").exists() else {}
    )
    manifest = (
        json.loads((directory / "manifest.json").read_text())
        if (directory / "manifest.json").exists()
        else {}
    )
    model.eval()
    return Artifact(
        version=version or directory.name, model=model, vocab=vocab, metrics=metrics, manifest=manifest
    )


def save(storage: Storage, artifact: Artifact) -> str:
    """Write ``models/<version>/`` under the storage root; returns its address."""
    with tempfile.TemporaryDirectory(prefix="seqrec-artifact-") as tmp:
        write_local(artifact, tmp)
        storage.upload_dir(tmp, f"models/{artifact.version}")
    log.info("saved model %s -> %s", artifact.version, storage.uri("models", artifact.version))
    return storage.uri("models", artifact.version)


def write_metrics(storage: Storage, version: str, metrics: dict[str, Any]) -> None:
    """Replace ``models/<version>/metrics.json``: a saved candidate's metrics once it has been evaluated."""
    storage.write_json(metrics, "models", version, "metrics.json")


def load(storage: Storage, version: str) -> Artifact:
    """The artifact ``models/<version>/``, in memory.

    From object storage it is downloaded into a temporary directory that is removed once loaded:
    every evaluation and scoring actor of every night loads the model, and kept copies filled the
    nodes' /tmp (a removed file stays readable to whatever still maps it).
    """
    if not storage.exists("models", version, "config.json"):
        raise ArtifactError(f"no model {version!r} under {storage.uri('models')}")
    if not storage.is_s3:
        return read_local(storage.path("models", version), version)
    with tempfile.TemporaryDirectory(prefix="seqrec-model-") as tmp:
        local = Path(tmp) / version
        storage.download_dir(f"models/{version}", local)
        return read_local(local, version)


def promoted_version(storage: Storage) -> str | None:
    if not storage.exists("models", PROMOTED):
        return None
    return storage.read_json("models", PROMOTED)["version"]


def promote(storage: Storage, version: str, reason: str, metrics: dict[str, Any] | None = None) -> None:
    previous = promoted_version(storage)
    storage.write_json(
        {
            "version": version,
            "previous": previous,
            "reason": reason,
            "metrics": metrics or {},
            "promoted_at": dt.datetime.now(dt.UTC).isoformat(),
        },
        "models",
        PROMOTED,
    )
    log.info("promoted %s (previous: %s): %s", version, previous, reason)
