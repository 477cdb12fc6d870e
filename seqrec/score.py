"""Stage 4: score every user with Ray Data and publish the recommendation table.

``read_parquet`` streams the night's sequences (only the columns scoring needs) -> ``map_batches``
with :class:`Recommender` on an actor pool (the model and the item table are loaded once per actor
from the artifact alone) -> :func:`seqrec.ranking.rank_unseen`, the same masking + top-k function
evaluation uses -> ``write_parquet`` into the partition, then ``_SUCCESS`` last (see
:mod:`seqrec.publish`). Users with no known item get the popularity ranking, marked
``source = "popularity"``.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from seqrec import artifact as artifacts
from seqrec.catalogue import read_catalogue
from seqrec.config import ScoreConfig
from seqrec.data import SEQUENCE_COLUMNS, Vocabulary, encode, longest
from seqrec.errors import NotFoundError
from seqrec.publish import publish_partition
from seqrec.ranking import rank_unseen
from seqrec.model import query_inputs
from seqrec.storage import Storage, read_parquet_batches

log = logging.getLogger("seqrec.score")

# Users per forward pass on CPU: the (rows, T, 4H) MLP activations then stay in cache. Measured
# (T=50, H=64, 2 layers, one thread): 128 rows 68 GFLOP/s, 256 rows 58, 1024 rows 41.
CPU_FORWARD_ROWS = 128


def output_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("user_id", user_type),
        ("items", pa.list_(item_type)),
        ("scores", pa.list_(pa.float32())),
        ("source", pa.string()),
        ("model_version", pa.string()),
        ("generated_at", pa.timestamp("us", tz="UTC")),
    ])


def unavailable_items(storage: Storage, vocab: Vocabulary) -> np.ndarray:
    """(N+1,) bool: items never recommended: the catalogue's unavailable ones, and padding."""
    unavailable = np.zeros(vocab.num_items + 1, dtype=bool)
    unavailable[0] = True
    catalogue = read_catalogue(storage)
    if catalogue is not None and "available" in catalogue.column_names:
        off = catalogue.filter(pc.invert(pc.fill_null(catalogue["available"], True)))["item_id"]
        index = vocab.lookup(off)
        unavailable[index[index > 0]] = True
    return unavailable


class Recommender:
    """Ray Data actor: one model per actor, ``__call__`` maps a batch of sequences to top-k."""

    def __init__(self, root: str, version: str, k: int, never_recommend: np.ndarray, generated_at: dt.datetime,
                 torch_threads: int = 1, item_chunk: int = 16384, device: str = "cpu"):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        storage = Storage(root)
        self.artifact = artifacts.load(storage, version, cache_dir=tempfile.mkdtemp(prefix="seqrec-score-"))
        self.device = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
        self.model = self.artifact.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(torch.bfloat16)
        self.vocab = self.artifact.vocab
        self.k, self.item_chunk = k, item_chunk
        self.generated_at = generated_at
        config = self.model.config
        with torch.inference_mode():
            self.items = self.model.item_table()[: config.num_items + 1].contiguous()   # held once per actor
        self.never_recommend = torch.from_numpy(never_recommend.copy()).to(self.device)
        self.popularity = torch.from_numpy(self.vocab.popularity()).to(self.device)

    def _finish(self, ranked_scores: torch.Tensor, ranked_indices: torch.Tensor) -> tuple[pa.Array, pa.Array]:
        """(B, k) tensors -> list arrays of original ids and float32 scores, dropping masked slots."""
        scores = ranked_scores.float().cpu().numpy()
        indices = ranked_indices.cpu().numpy()
        valid = np.isfinite(scores)
        offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
        items = self.vocab.original(indices[valid])
        return (pa.ListArray.from_arrays(pa.array(offsets), items),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[valid], pa.float32())))

    def __call__(self, batch: pa.Table) -> pa.Table:
        config = self.model.config
        # The whole stored history is masked; the model reads its newest max_len items.
        enc = encode(batch, self.vocab, max(config.max_len, longest(batch)))
        seen = torch.from_numpy(enc.items).to(self.device)
        history = seen[:, -config.max_len:]
        types = torch.from_numpy(enc.event_types[:, -config.max_len:]).to(self.device)
        has_history = torch.from_numpy(enc.lengths > 0).to(self.device)
        inputs, input_types = query_inputs(history, types, config.kind, config.mask_index)
        rows = CPU_FORWARD_ROWS if self.device.type == "cpu" else max(len(inputs), 1)
        with torch.inference_mode():
            queries = torch.cat([self.model.user_vectors(inputs[i:i + rows], input_types[i:i + rows])
                                 for i in range(0, max(len(inputs), 1), rows)]).to(self.items.dtype)
        ranked = rank_unseen(queries, self.items, seen, self.k, excluded=self.never_recommend, chunk_size=self.item_chunk)
        scores, indices = ranked.scores, ranked.indices
        if not bool(has_history.all()):
            cold = ~has_history
            fallback = rank_unseen(torch.ones(int(cold.sum()), 1, device=self.device), self.popularity[:, None],
                                   seen[cold], self.k, excluded=self.never_recommend)
            scores, indices = scores.clone(), indices.clone()
            scores[cold], indices[cold] = fallback.scores.to(scores.dtype), fallback.indices
        items, item_scores = self._finish(scores, indices)
        n = batch.num_rows
        source = np.where(has_history.cpu().numpy(), "model", "popularity")
        return pa.Table.from_arrays([
            batch["user_id"], items, item_scores, pa.array(source, pa.string()),
            pa.array([self.artifact.version] * n, pa.string()),
            pa.array([self.generated_at] * n, pa.timestamp("us", tz="UTC")),
        ], schema=output_schema(batch.schema.field("user_id").type, self.vocab.items.type))


@dataclass
class ScoreReport:
    date: str
    model_version: str
    rows: int
    wall_s: float
    location: str


def score(storage: Storage, date: str, version: str, config: ScoreConfig) -> ScoreReport:
    """Score all users of ``sequences/dt=date`` with model ``version``; publish atomically."""
    import ray
    from ray.data import ExecutionResources

    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    files = storage.list_files("sequences", f"dt={date}", suffix=".parquet")
    if not files:
        raise NotFoundError(f"no sequences for {date} under {storage.uri('sequences')}; "
                            f"run `seqrec prepare --date {date}` first")
    # Only the artifact's vocabulary is needed on the driver (for the availability mask).
    probe = artifacts.load(storage, version, cache_dir=tempfile.mkdtemp(prefix="seqrec-probe-"))
    never_recommend = unavailable_items(storage, probe.vocab)
    # Column projection: event types are decoded only for a model that embeds them.
    columns = SEQUENCE_COLUMNS if probe.model.config.num_event_types else \
        [c for c in SEQUENCE_COLUMNS if c != "event_types"]
    use_gpu = config.gpus_per_actor > 0
    # Each file is read `rows_per_block` users at a time (see read_parquet_batches), and blocks are cut
    # to at most that many rows by *streaming* repartition, so that every actor gets work and memory
    # does not grow with the number of users (repartition(num_blocks) is all-to-all: it held every
    # sequence at once).
    blocks = config.num_blocks or max(4 * config.num_actors, 1)
    rows = sum(pq.read_metadata(f, filesystem=storage.filesystem).num_rows for f in files)
    rows_per_block = max(1, min(4 * config.batch_size, -(-rows // blocks)))
    dataset = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_parquet_batches, fn_kwargs=dict(root=storage.root, rows=rows_per_block, columns=columns), batch_size=1,
        batch_format="pyarrow")
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
    # The driver's C++ core prints this line itself (no Python logger to filter): say so beforehand.
    log.info("scoring on %d actor(s); Ray may print once that an actor 'has constructor arguments in the "
             "object store': harmless here (ray issue 53727)", config.num_actors)
    recommendations = dataset.map_batches(
        Recommender,
        fn_constructor_kwargs=dict(root=storage.root, version=version, k=config.k, never_recommend=never_recommend,
                                   generated_at=started_at, torch_threads=config.torch_threads,
                                   item_chunk=config.item_chunk, device="cuda" if use_gpu else "cpu"),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
    )

    if config.object_store_gib > 0:
        # Backpressure: the reader pauses while this much is queued, so memory stays flat in users.
        recommendations.context.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=config.object_store_gib * 2**30)

    def write(directory: str) -> None:
        # Files of ~rows_per_file users: one per output block would be ~1000 small files per million.
        recommendations.write_parquet(directory, filesystem=storage.filesystem, min_rows_per_file=config.rows_per_file)

    manifest = publish_partition(storage, "recommendations", date, write, {
        "model_version": version, "input": storage.uri("sequences", f"dt={date}"),
        "started_at": started_at.isoformat(), "k": config.k,
    })
    report = ScoreReport(date=date, model_version=version, rows=manifest["rows"], wall_s=time.perf_counter() - started,
                         location=storage.uri("recommendations", f"dt={date}"))
    log.info("scored %d users with %s in %.1f s -> %s", report.rows, version, report.wall_s, report.location)
    return report
