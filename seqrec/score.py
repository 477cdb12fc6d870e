"""Stage 4: score every user with Ray Data and publish the recommendation table.

``read_parquet`` streams the night's sequences (only the columns scoring needs) -> ``map_batches``
with :class:`Recommender` on an actor pool (the model and the item table are loaded once per actor
from the artifact alone) -> :func:`seqrec.ranking.rank_unseen`, the same masking + top-k function
evaluation uses -> ``write_parquet`` of the night's files, which the driver then commits to the
recommendation table in one transaction (see :mod:`seqrec.publish`), all under the night's lease
(:mod:`seqrec.lease`). Users with no known item get the popularity ranking, marked
``source = "popularity"``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seqrec import artifact as artifacts
from seqrec.catalogue import unavailable_items  # re-exported: scoring and evaluation share it
from seqrec.config import PublishConfig, ScoreConfig
from seqrec.data import SEQUENCE_COLUMNS, encode, longest, sampled
from seqrec.errors import NotFoundError
from seqrec.lease import hold_night
from seqrec.model import query_inputs
from seqrec.publish import publish_recommendations
from seqrec.ranking import rank_unseen
from seqrec.storage import Storage, read_parquet_batches

log = logging.getLogger("seqrec.score")

# Users per forward pass on CPU: the (rows, T, 4H) MLP activations then stay in cache. Measured
# (T=50, H=64, 2 layers, one thread): 128 rows 68 GFLOP/s, 256 rows 58, 1024 rows 41.
CPU_FORWARD_ROWS = 128


def output_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("user_id", user_type),
            ("items", pa.list_(item_type)),
            ("scores", pa.list_(pa.float32())),
            ("source", pa.string()),
            ("model_version", pa.string()),
            ("generated_at", pa.timestamp("us", tz="UTC")),
        ]
    )


class RankingModel:
    """One artifact, ready to rank users: what a scoring or an evaluation actor loads once.

    Holds the model (on ``device``; bf16 on CUDA with ``low_precision``), its item table, the
    items it must never rank (:func:`unavailable_items` of its own vocabulary unless
    ``never_recommend`` is given) and its popularity scores. Scoring and evaluation both encode through
    :meth:`user_vectors`, so the gate judges the rankings the table publishes.
    """

    def __init__(
        self,
        storage: Storage,
        version: str,
        never_recommend: np.ndarray | None = None,
        device: str = "cpu",
        low_precision: bool = True,
    ):
        self.artifact = artifacts.load(storage, version)
        self.device = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
        self.model = self.artifact.model.to(self.device).eval()
        if self.device.type == "cuda" and low_precision:
            self.model = self.model.to(torch.bfloat16)
        self.vocab = self.artifact.vocab
        self.config = self.model.config
        with torch.inference_mode():
            self.items = self.model.item_table()[: self.config.num_items + 1].contiguous()
        if never_recommend is None:
            never_recommend = unavailable_items(storage, self.vocab)
        self.never_recommend = torch.from_numpy(never_recommend.copy()).to(self.device)
        self.popularity = torch.from_numpy(self.vocab.popularity()).to(self.device)

    def user_vectors(self, history: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """(B, max_len) newest items and their event types -> (B, H) queries, in the item table's dtype."""
        inputs, input_types = query_inputs(
            history.to(self.device), types.to(self.device), self.config.kind, self.config.mask_index
        )
        rows = CPU_FORWARD_ROWS if self.device.type == "cpu" else max(len(inputs), 1)
        with torch.inference_mode():
            return torch.cat(
                [
                    self.model.user_vectors(inputs[i : i + rows], input_types[i : i + rows])
                    for i in range(0, max(len(inputs), 1), rows)
                ]
            ).to(self.items.dtype)


class Recommender:
    """Ray Data actor: one model per actor, ``__call__`` maps a batch of sequences to top-k."""

    def __init__(
        self,
        root: str,
        version: str,
        k: int,
        never_recommend: np.ndarray | None,
        generated_at: dt.datetime,
        torch_threads: int = 1,
        item_chunk: int = 16384,
        device: str = "cpu",
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.ranker = RankingModel(Storage(root), version, never_recommend, device)
        self.artifact, self.vocab, self.device = self.ranker.artifact, self.ranker.vocab, self.ranker.device
        self.k, self.item_chunk = k, item_chunk
        self.generated_at = generated_at

    def _finish(self, ranked_scores: torch.Tensor, ranked_indices: torch.Tensor) -> tuple[pa.Array, pa.Array]:
        """(B, k) tensors -> list arrays of original ids and float32 scores, dropping masked slots."""
        scores = ranked_scores.float().cpu().numpy()
        indices = ranked_indices.cpu().numpy()
        valid = np.isfinite(scores)
        offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
        items = self.vocab.original(indices[valid])
        return (
            pa.ListArray.from_arrays(pa.array(offsets), items),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[valid], pa.float32())),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        ranker = self.ranker
        max_len = ranker.config.max_len
        # The whole stored history is masked; the model reads its newest max_len items.
        enc = encode(batch, self.vocab, max(max_len, longest(batch)))
        seen = torch.from_numpy(enc.items).to(self.device)
        has_history = torch.from_numpy(enc.lengths > 0).to(self.device)
        queries = ranker.user_vectors(seen[:, -max_len:], torch.from_numpy(enc.event_types[:, -max_len:]))
        ranked = rank_unseen(
            queries, ranker.items, seen, self.k, excluded=ranker.never_recommend, chunk_size=self.item_chunk
        )
        scores, indices = ranked.scores, ranked.indices
        if not bool(has_history.all()):
            cold = ~has_history
            ones = torch.ones(int(cold.sum()), 1, device=self.device)
            fallback = rank_unseen(
                ones, ranker.popularity[:, None], seen[cold], self.k, excluded=ranker.never_recommend
            )
            scores, indices = scores.clone(), indices.clone()
            scores[cold], indices[cold] = fallback.scores.to(scores.dtype), fallback.indices
        items, item_scores = self._finish(scores, indices)
        n = batch.num_rows
        source = np.where(has_history.cpu().numpy(), "model", "popularity")
        return pa.Table.from_arrays(
            [
                batch["user_id"],
                items,
                item_scores,
                pa.array(source, pa.string()),
                pa.array([self.artifact.version] * n, pa.string()),
                pa.array([self.generated_at] * n, pa.timestamp("us", tz="UTC")),
            ],
            schema=output_schema(batch.schema.field("user_id").type, self.vocab.items.type),
        )


@dataclass
class ScoreReport:
    date: str
    model_version: str
    rows: int
    wall_s: float
    location: str
    snapshot: int | None = None  # the table version this night's commit made (Delta)
    commit_s: float = 0.0


def sequence_files(storage: Storage, date: str) -> list[str]:
    files = storage.list_files("sequences", f"dt={date}", suffix=".parquet")
    if not files:
        raise NotFoundError(
            f"no sequences for {date} under {storage.uri('sequences')}; "
            f"run `seqrec prepare --date {date}` first"
        )
    return files


def sequence_columns(event_types: bool) -> list[str]:
    """The columns a model stage reads: event types only for a model that embeds them."""
    return SEQUENCE_COLUMNS if event_types else [c for c in SEQUENCE_COLUMNS if c != "event_types"]


def sequence_rows(storage: Storage, files: list[str]) -> int:
    """Users in ``files``, from the Parquet footers alone."""
    return sum(pq.read_metadata(f, filesystem=storage.filesystem).num_rows for f in files)


def sequence_dataset(
    storage: Storage,
    files: list[str],
    rows: int,
    columns: list[str],
    config: ScoreConfig,
    fraction: float = 1.0,
):
    """The night's sequences as a Ray Data stream for an actor pool (scoring, evaluation).

    Each file is read ``rows_per_block`` users at a time (see read_parquet_batches) and blocks are
    cut to at most that many rows by *streaming* repartition, so that every actor gets work and
    memory does not grow with the number of users (repartition(num_blocks) is all-to-all: it held
    every sequence at once). ``fraction`` < 1 keeps only the users of :func:`seqrec.data.sampled`,
    dropped in the read tasks before anything reaches an actor.
    """
    import ray

    blocks = config.num_blocks or max(4 * config.num_actors, 1)
    rows_per_block = max(1, min(4 * config.batch_size, -(-int(rows * fraction) // blocks)))
    dataset = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_parquet_batches,
        fn_kwargs=dict(root=storage.root, rows=rows_per_block, columns=columns),
        batch_size=1,
        batch_format="pyarrow",
    )
    if fraction < 1.0:
        dataset = dataset.map_batches(
            sampled, fn_kwargs=dict(fraction=fraction), batch_size=None, batch_format="pyarrow"
        )
    return dataset.repartition(target_num_rows_per_block=rows_per_block)


def on_actor_pool(dataset, actor: type, kwargs: dict, batch_size: int, config: ScoreConfig):
    """``dataset`` mapped by ``actor`` on a pool sized by ``config`` (scoring's and evaluation's).

    The actor is also given ``torch_threads``, ``item_chunk`` and its ``device`` from ``config``.
    """
    import ray
    from ray.data import ExecutionResources

    # The driver's C++ core prints this line itself (no Python logger to filter): say so beforehand.
    log.info(
        "%s on %d actor(s); Ray may print once that an actor 'has constructor arguments in the "
        "object store': harmless here (ray issue 53727)",
        actor.__name__,
        config.num_actors,
    )
    kwargs = {
        **kwargs,
        "torch_threads": config.torch_threads,
        "item_chunk": config.item_chunk,
        "device": "cuda" if config.gpus_per_actor > 0 else "cpu",
    }
    pool = ray.data.ActorPoolStrategy(size=config.num_actors)
    mapped = dataset.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor or None,
        # Spread over the nodes (one node's actors would leave the others' cores idle): Ray Data's
        # default for pool actors (DataContext.scheduling_strategy), so it is not passed here, where
        # it went through **ray_remote_args, deprecated (and a warning on every night) since Ray 2.60.
    )
    if config.object_store_gib > 0:
        # Backpressure: the reader pauses while this much is queued, so memory stays flat in users.
        mapped.context.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=config.object_store_gib * 2**30
        )
    return mapped


def _input_snapshot(storage: Storage, date: str) -> dict[str, Any] | None:
    """What identifies the night's input: the sequences' ``_SUCCESS`` (when prepare wrote it) and counts."""
    if not storage.exists("sequences", f"dt={date}", "_SUCCESS"):
        return None
    manifest = storage.read_json("sequences", f"dt={date}", "_SUCCESS")
    written = storage.filesystem.get_file_info(storage.path("sequences", f"dt={date}", "_SUCCESS")).mtime
    return {
        "location": storage.uri("sequences", f"dt={date}"),
        "written_at": written.isoformat() if written else None,
        **{k: manifest[k] for k in ("users", "rows_kept", "mode") if k in manifest},
    }


def score(
    storage: Storage, date: str, version: str, config: ScoreConfig, publish: PublishConfig | None = None
) -> ScoreReport:
    """Score all users of ``sequences/dt=date`` with model ``version``; publish atomically, holding
    the night's lease from before anything is written until the commit."""
    publish = publish or PublishConfig()
    with hold_night(storage, date, publish.lease_ttl_s):
        return _score(storage, date, version, config, publish)


def _score(
    storage: Storage, date: str, version: str, config: ScoreConfig, publish: PublishConfig
) -> ScoreReport:
    started_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    files = sequence_files(storage, date)
    # Only the artifact's vocabulary is needed on the driver (for the availability mask).
    probe = artifacts.load(storage, version)
    never_recommend = unavailable_items(storage, probe.vocab)
    # Column projection: event types are decoded only for a model that embeds them.
    columns = sequence_columns(bool(probe.model.config.num_event_types))
    dataset = sequence_dataset(storage, files, sequence_rows(storage, files), columns, config)
    recommendations = on_actor_pool(
        dataset,
        Recommender,
        dict(
            root=storage.root,
            version=version,
            k=config.k,
            never_recommend=never_recommend,
            generated_at=started_at,
        ),
        config.batch_size,
        config,
    )

    def write(directory: str) -> None:
        # Files of ~rows_per_file users: one per output block would be ~1000 small files per million.
        recommendations.write_parquet(
            directory, filesystem=storage.filesystem, min_rows_per_file=config.rows_per_file
        )

    snapshot = publish_recommendations(
        storage,
        date,
        write,
        {
            "model_version": version,
            "input": storage.uri("sequences", f"dt={date}"),
            "input_snapshot": _input_snapshot(storage, date),
            "started_at": started_at.isoformat(),
            "k": config.k,
        },
        publish,
    )
    report = ScoreReport(
        date=date,
        model_version=version,
        rows=snapshot.rows,
        wall_s=time.perf_counter() - started,
        location=storage.uri("recommendations", f"dt={date}"),
        snapshot=snapshot.version,
        commit_s=round(snapshot.commit_s, 3),
    )
    log.info("scored %d users with %s in %.1f s -> %s", report.rows, version, report.wall_s, report.location)
    return report
