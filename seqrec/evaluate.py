"""Stage 3: leave-one-out evaluation with full-catalogue ranking, against popularity.

For each user with enough history the last known item is the test target (the second-to-last is
the validation target), the model ranks *every* item in the catalogue, the user's history and the
items the catalogue marks unavailable are excluded, and HR@K, NDCG@K and MRR are averaged over
users. Ranking goes through the same :func:`seqrec.ranking.rank_unseen` the nightly scoring uses.
The popularity baseline ranks by training-interaction counts under exactly the same protocol.

:func:`evaluate_models` is the night's path: the sequences stream from storage through a Ray
Data actor pool like scoring's (:mod:`seqrec.score`); each :class:`Evaluator` loads every model
to judge once (candidate and live, so one pass over the data serves both) and returns metric sums
and sums of squares per batch, which the driver adds up. The gate judges a stable hash sample of
users (:func:`gate_sample_size`: ``eval.max_users``, and no more full-catalogue rankings than
scoring makes) and reports each metric's standard error. :func:`evaluate` ranks an
in-memory table in this process (benchmarks on small data, tests).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from seqrec.config import EvalConfig, ScoreConfig
from seqrec.data import Vocabulary, evaluation_rows, longest, sample_fraction, sampled
from seqrec.model import SeqRecModel, query_inputs
from seqrec.ranking import popularity_ranks, rank_unseen, ranking_metrics, user_metrics
from seqrec.score import (
    RankingModel,
    on_actor_pool,
    sequence_columns,
    sequence_dataset,
    sequence_files,
    sequence_rows,
)
from seqrec.storage import Storage

log = logging.getLogger("seqrec.evaluate")

PROTOCOL = (
    "leave-one-out: last item = test, second-to-last = validation; full-catalogue ranking with the "
    "user's history excluded; metrics averaged over users with at least one item before the target"
)


def evaluate_batches(
    model: SeqRecModel,
    batches,
    ks: list[int],
    device: torch.device,
    bf16: bool = False,
    never_recommend: torch.Tensor | None = None,
    top_k: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Sums of leave-one-out metrics over batches of {items, event_types, seen} (last column = target).

    ``seen`` is the whole history, excluded from the ranking (:func:`evaluation_rows`).

    ``bf16`` runs the sequence encoder under bf16 autocast; ranking is always float32 so that
    near-ties are not decided by rounding. ``never_recommend``: (N+1,) bool, items never ranked.
    """
    config = model.config
    never_recommend = None if never_recommend is None else never_recommend.to(device)
    totals: dict[str, float] = {"users": 0.0}
    model.eval()
    with torch.inference_mode():
        table = model.item_table()[: config.num_items + 1].float()
        for batch in batches:
            items, types = batch["items"].to(device), batch["event_types"].to(device)
            targets, history, history_types = items[:, -1], items[:, :-1], types[:, :-1]
            inputs, input_types = query_inputs(history, history_types, config.kind, config.mask_index)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                queries = model.user_vectors(inputs, input_types)
            queries = queries.float()
            ranked = rank_unseen(
                queries,
                table,
                batch["seen"].to(device),
                k=max(ks) if top_k is not None else 0,  # metrics need the ranks only
                excluded=never_recommend,
                targets=targets,
            )
            if top_k is not None:  # the ranked lists, for comparison with scoring
                top_k.append(ranked.indices.cpu())
            for key, value in ranking_metrics(ranked.target_rank, ks).items():
                totals[key] = totals.get(key, 0.0) + value
            totals["users"] += len(targets)
    return totals


def means(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """Sums over users -> means, keys prefixed (``val_``)."""
    users = max(totals.get("users", 0.0), 1.0)
    return {f"{prefix}{k}": v / users for k, v in totals.items() if k != "users"}


def split_batches(
    sequences: pa.Table, vocab: Vocabulary, width: int, holdout: int, batch_size: int, max_users: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of {items, event_types, seen}: ``width`` history columns + the target in the last
    column, and the user's whole history before the target (:func:`evaluation_rows`).

    holdout=1: validation (the second-to-last item is the target); holdout=0: test. ``max_users``:
    only the users of the hash sample (:func:`seqrec.data.user_sample`), as the pool judges them.
    """
    sequences = sampled(sequences, sample_fraction(max_users, sequences.num_rows))
    rows = sequences.num_rows
    for start in range(0, rows, batch_size):
        batch = sequences.slice(start, min(batch_size, rows - start))
        out = evaluation_rows(batch, vocab, width, holdout, seen_width=max(longest(batch) - holdout, 1))
        if len(out["items"]):
            yield {key: torch.from_numpy(value).long() for key, value in out.items()}


def popularity_metrics(
    batches: Iterator[dict[str, torch.Tensor]],
    vocab: Vocabulary,
    ks: list[int],
    never_recommend: torch.Tensor | None = None,
) -> dict[str, float]:
    scores = torch.from_numpy(vocab.popularity())
    totals: dict[str, float] = {"users": 0.0}
    for batch in batches:
        items = batch["items"]
        ranks = popularity_ranks(scores, batch["seen"], items[:, -1], excluded=never_recommend)
        for key, value in ranking_metrics(ranks, ks).items():
            totals[key] = totals.get(key, 0.0) + value
        totals["users"] += len(items)
    return totals


def evaluate(
    model: SeqRecModel,
    vocab: Vocabulary,
    sequences: pa.Table,
    config: EvalConfig,
    splits: tuple[str, ...] = ("val", "test"),
    never_recommend: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` and of popularity on the validation and test targets, in this process.

    ``never_recommend``: (N+1,) bool, items never ranked (:func:`seqrec.catalogue.unavailable_items`).
    """
    mask = None if never_recommend is None else torch.from_numpy(never_recommend)
    model.eval()
    width = model.config.max_len
    out: dict[str, Any] = {"protocol": PROTOCOL, "ks": config.ks, "catalogue_size": vocab.num_items}
    for split in splits:
        holdout = 1 if split == "val" else 0
        batches = lambda: split_batches(sequences, vocab, width, holdout, config.batch_size, config.max_users)  # noqa: E731
        model_totals = evaluate_batches(
            model, batches(), config.ks, torch.device("cpu"), never_recommend=mask
        )
        pop_totals = popularity_metrics(batches(), vocab, config.ks, never_recommend=mask)
        out[split] = {
            "model": means(model_totals, ""),
            "popularity": means(pop_totals, ""),
            "users": int(model_totals["users"]),
        }
    return out


def metric_names(ks: list[int]) -> list[str]:
    return ["mrr", *[f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]]


@dataclass(frozen=True)
class Judged:
    """A model to evaluate tonight: ``name`` in the report (candidate, live), its version, its splits."""

    name: str
    version: str
    splits: tuple[str, ...] = ("val", "test")


class Evaluator:
    """Ray Data actor: every judged model loaded once; a batch of sequences -> metric sums.

    One row per (model, scorer, split) and batch: users, and for each metric the sum and the sum
    of squares of the per-user values (for standard errors). Each model ranks with its own
    vocabulary and the unavailable items of that vocabulary, as scoring does.
    """

    def __init__(
        self,
        root: str,
        judged: list[Judged],
        ks: list[int],
        torch_threads: int = 1,
        item_chunk: int = 16384,
        device: str = "cpu",
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        storage = Storage(root)
        # float32 on every device: near-ties must not be decided by bf16 rounding.
        self.models = [
            (j, RankingModel(storage, j.version, device=device, low_precision=False)) for j in judged
        ]
        self.ks, self.item_chunk = ks, item_chunk

    def _sums(self, ranks: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, values in user_metrics(ranks, self.ks).items():
            values = values.double()
            out[name], out[f"{name}^2"] = values.sum().item(), (values * values).sum().item()
        return out

    def _rank(self, ranker: RankingModel, rows: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) 1-based target ranks of the model and of popularity for leave-one-out ``rows``."""
        items = torch.from_numpy(rows["items"]).long().to(ranker.device)
        types = torch.from_numpy(rows["event_types"]).long()
        seen = torch.from_numpy(rows["seen"]).long().to(ranker.device)
        targets = items[:, -1]
        queries = ranker.user_vectors(items[:, :-1], types[:, :-1]).float()
        model = rank_unseen(
            queries,
            ranker.items.float(),
            seen,
            0,  # the target ranks only: no top-k lists
            excluded=ranker.never_recommend,
            targets=targets,
            chunk_size=self.item_chunk,
        )
        popularity = popularity_ranks(ranker.popularity, seen, targets, excluded=ranker.never_recommend)
        return model.target_rank, popularity

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for judged, ranker in self.models:
            for split in judged.splits:
                holdout = 1 if split == "val" else 0
                rows = evaluation_rows(
                    batch,
                    ranker.vocab,
                    ranker.config.max_len,
                    holdout,
                    seen_width=max(longest(batch) - holdout, 1),
                )
                users = len(rows["items"])
                ranks = self._rank(ranker, rows) if users else (torch.zeros(0), torch.zeros(0))
                for scorer, rank in zip(("model", "popularity"), ranks):
                    out.append(
                        {
                            "model": judged.name,
                            "scorer": scorer,
                            "split": split,
                            "users": users,
                            "sequences": batch.num_rows,
                            "catalogue_size": ranker.vocab.num_items,
                            **self._sums(rank),
                        }
                    )
        return pa.Table.from_pylist(out)


def summarise(sums: dict[str, float], names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Means and their standard errors (sample std / sqrt(n)) from sums and sums of squares."""
    users = sums["users"]
    mean = {name: sums[name] / max(users, 1) for name in names}
    stderr = {}
    for name in names:
        variance = (sums[f"{name}^2"] - users * mean[name] ** 2) / (users - 1) if users > 1 else math.nan
        stderr[name] = math.sqrt(max(variance, 0.0) / users) if users > 1 else math.nan
    return mean, stderr


def gate_sample_size(config: EvalConfig, users: int, rankings: int) -> int:
    """Users the gate judges (0: all of them).

    At most ``eval.max_users``, and at most ``eval.max_rankings_per_user`` x ``users`` /
    ``rankings``, so the gate's full-catalogue rankings (one per judged model and split) never
    outnumber those of the night's scoring; but never fewer than ``eval.min_users`` (the standard
    error grows as 1 / sqrt(n)).
    """
    if not config.max_users:
        return 0
    limit = config.max_users
    if config.max_rankings_per_user:
        affordable = int(config.max_rankings_per_user * users / max(rankings, 1))
        limit = min(limit, max(affordable, config.min_users))
    return max(limit, 1)


def rankings_per_user(judged: list[Judged]) -> int:
    """Full-catalogue rankings per judged user: one per model and split."""
    return sum(len(j.splits) for j in judged)


def night_users(storage: Storage, date: str) -> int:
    """Users in ``sequences/dt=date``, from the Parquet footers alone."""
    return sequence_rows(storage, sequence_files(storage, date))


def evaluate_models(
    storage: Storage,
    date: str,
    judged: list[Judged],
    config: EvalConfig,
    pool: ScoreConfig,
    users: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics of each judged model (and of popularity) on ``sequences/dt=date``, on the actor pool.

    The models must be saved under ``models/`` (each actor loads them from there). One pass over
    the hash sample of :func:`gate_sample_size` users scores every model; ``pool`` sizes the
    actors as for scoring; ``users``: the night's user count when the caller has it
    (:func:`night_users`). Returns {name: metrics} in :func:`evaluate`'s shape, plus ``stderr``
    beside each split's metrics and the ``sample``.
    """
    started = time.perf_counter()
    files = sequence_files(storage, date)
    rows = sequence_rows(storage, files) if users is None else users
    rankings = rankings_per_user(judged)
    fraction = sample_fraction(gate_sample_size(config, rows, rankings), rows)
    embeds_types = any(
        storage.read_json("models", j.version, "config.json").get("num_event_types") for j in judged
    )
    columns = sequence_columns(bool(embeds_types))
    dataset = sequence_dataset(storage, files, rows, columns, pool, fraction)
    sums = on_actor_pool(
        dataset, Evaluator, dict(root=storage.root, judged=judged, ks=config.ks), config.batch_size, pool
    )
    names = metric_names(config.ks)
    parts = [t for t in sums.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    if not parts:
        raise ValueError(f"no users to evaluate in {storage.uri('sequences', f'dt={date}')}")
    table = pa.concat_tables(parts)
    totals = (
        table.group_by(["model", "scorer", "split"])
        .aggregate(
            [(c, "sum") for c in ["users", "sequences", *names, *[f"{n}^2" for n in names]]]
            + [("catalogue_size", "max")]
        )
        .to_pylist()
    )
    out: dict[str, dict[str, Any]] = {}
    for j in judged:
        mine = {
            (r["scorer"], r["split"]): {k.removesuffix("_sum"): v for k, v in r.items()}
            for r in totals
            if r["model"] == j.name
        }
        first = next(iter(mine.values()))
        result: dict[str, Any] = {
            "protocol": PROTOCOL,
            "ks": config.ks,
            "catalogue_size": first["catalogue_size_max"],
            "sample": {
                "max_users": config.max_users,
                "rankings": rankings,
                "fraction": fraction,
                "users": int(first["sequences"]),
                "of": rows,
            },
        }
        for split in j.splits:
            model_mean, model_se = summarise(mine["model", split], names)
            pop_mean, pop_se = summarise(mine["popularity", split], names)
            result[split] = {
                "model": model_mean,
                "popularity": pop_mean,
                "users": int(mine["model", split]["users"]),
                "stderr": {"model": model_se, "popularity": pop_se},
            }
        out[j.name] = result
    log.info(
        "evaluated %s on %d of %d users in %.1f s",
        ", ".join(j.name for j in judged),
        out[judged[0].name]["sample"]["users"],
        rows,
        time.perf_counter() - started,
    )
    return out


def summary_table(metrics: dict[str, Any], split: str = "test") -> str:
    """The split's metrics as a text table; with standard errors (a ``± s.e.`` row) where known."""
    names = metric_names(metrics["ks"])
    result = metrics[split]
    sample = metrics.get("sample")
    of = f" sampled of {sample['of']}" if sample and sample["fraction"] < 1 else ""
    lines = [
        f"{split} ({result['users']} users{of}, {metrics['catalogue_size']} items)",
        f"{'model':<12}" + "".join(f"{n:>10}" for n in names),
    ]
    for who in ("model", "popularity"):
        lines.append(f"{who:<12}" + "".join(f"{result[who][n]:>10.4f}" for n in names))
        if "stderr" in result:
            lines.append(f"{'  ± s.e.':<12}" + "".join(f"{result['stderr'][who][n]:>10.4f}" for n in names))
    return "\n".join(lines)


def not_worse(candidate: float, incumbent: float | None, tolerance: float) -> bool:
    """The promotion gate: promote unless the candidate is worse by more than ``tolerance``."""
    return incumbent is None or bool(np.isnan(incumbent)) or candidate >= incumbent - tolerance
