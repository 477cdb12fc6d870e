"""Stage 3: leave-one-out evaluation with full-catalogue ranking, against popularity.

For each user with enough history the last known item is the test target (the second-to-last is
the validation target), the model ranks *every* item in the catalogue, the user's history is
excluded, and HR@K, NDCG@K and MRR are averaged over users. Ranking goes through the same
:func:`seqrec.ranking.rank_unseen` the nightly scoring uses. The popularity baseline ranks by
training-interaction counts under exactly the same protocol.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from seqrec.config import EvalConfig
from seqrec.data import Vocabulary, encode, longest
from seqrec.model import SeqRecModel, query_inputs
from seqrec.ranking import rank_unseen, ranking_metrics

log = logging.getLogger("seqrec.evaluate")

PROTOCOL = ("leave-one-out: last item = test, second-to-last = validation; full-catalogue ranking with the "
            "user's history excluded; metrics averaged over users with at least one item before the target")


def evaluation_rows(batch: pa.Table, vocab: Vocabulary, width: int, holdout: int,
                    seen_width: int) -> dict[str, np.ndarray]:
    """Leave-one-out rows of users with at least one item before the target.

    items/event_types: the newest ``width`` items before the target, then the target (last column);
    seen: every item before the target (the newest ``seen_width``), excluded from the ranking as in
    the literature, even where the history is longer than the model's context.
    """
    full = encode(batch, vocab, max(seen_width, width) + 1, drop_last=holdout)
    keep = full.lengths >= 2
    return {"items": full.items[keep, -(width + 1):], "event_types": full.event_types[keep, -(width + 1):],
            "seen": full.items[keep, :-1].astype(np.int32)}


def evaluate_batches(model: SeqRecModel, batches, ks: list[int], device: torch.device,
                     bf16: bool = False) -> dict[str, float]:
    """Sums of leave-one-out metrics over batches of {items, event_types, seen} (last column = target).

    ``seen`` is the whole history, excluded from the ranking (:func:`evaluation_rows`).

    ``bf16`` runs the sequence encoder under bf16 autocast; ranking is always float32 so that
    near-ties are not decided by rounding.
    """
    config = model.config
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
            ranked = rank_unseen(queries, table, batch["seen"].to(device), k=max(ks), targets=targets)
            for key, value in ranking_metrics(ranked.target_rank, ks).items():
                totals[key] = totals.get(key, 0.0) + value
            totals["users"] += len(targets)
    return totals


def means(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """Sums over users -> means, keys prefixed (``val_``)."""
    users = max(totals.get("users", 0.0), 1.0)
    return {f"{prefix}{k}": v / users for k, v in totals.items() if k != "users"}


def split_batches(sequences: pa.Table, vocab: Vocabulary, width: int, holdout: int, batch_size: int,
                  max_users: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of {items, event_types, seen}: ``width`` history columns + the target in the last
    column, and the user's whole history before the target (:func:`evaluation_rows`).

    holdout=1: validation (the second-to-last item is the target); holdout=0: test.
    """
    rows = sequences.num_rows if not max_users else min(max_users, sequences.num_rows)
    for start in range(0, rows, batch_size):
        batch = sequences.slice(start, min(batch_size, rows - start))
        out = evaluation_rows(batch, vocab, width, holdout, seen_width=max(longest(batch) - holdout, 1))
        if len(out["items"]):
            yield {key: torch.from_numpy(value).long() for key, value in out.items()}


def popularity_metrics(batches: Iterator[dict[str, torch.Tensor]], vocab: Vocabulary, ks: list[int]) -> dict[str, float]:
    scores = torch.from_numpy(vocab.popularity())[:, None]      # (N+1, 1): a 1-d "embedding"
    totals: dict[str, float] = {"users": 0.0}
    for batch in batches:
        items = batch["items"]
        ranked = rank_unseen(torch.ones(len(items), 1), scores, batch["seen"], k=max(ks), targets=items[:, -1])
        for key, value in ranking_metrics(ranked.target_rank, ks).items():
            totals[key] = totals.get(key, 0.0) + value
        totals["users"] += len(items)
    return totals


def evaluate(model: SeqRecModel, vocab: Vocabulary, sequences: pa.Table, config: EvalConfig,
             splits: tuple[str, ...] = ("val", "test")) -> dict[str, Any]:
    """Metrics of ``model`` and of popularity on the validation and test targets."""
    model.eval()
    width = model.config.max_len
    out: dict[str, Any] = {"protocol": PROTOCOL, "ks": config.ks, "catalogue_size": vocab.num_items}
    for split in splits:
        holdout = 1 if split == "val" else 0
        batches = lambda: split_batches(sequences, vocab, width, holdout, config.batch_size, config.max_users)  # noqa: E731
        model_totals = evaluate_batches(model, batches(), config.ks, torch.device("cpu"))
        pop_totals = popularity_metrics(batches(), vocab, config.ks)
        out[split] = {"model": means(model_totals, ""), "popularity": means(pop_totals, ""),
                      "users": int(model_totals["users"])}
    return out


def summary_table(metrics: dict[str, Any], split: str = "test") -> str:
    ks = metrics["ks"]
    names = ["mrr", *[f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]]
    lines = [f"{split} ({metrics[split]['users']} users, {metrics['catalogue_size']} items)",
             f"{'model':<12}" + "".join(f"{n:>10}" for n in names)]
    for who in ("model", "popularity"):
        lines.append(f"{who:<12}" + "".join(f"{metrics[split][who][n]:>10.4f}" for n in names))
    return "\n".join(lines)


def not_worse(candidate: float, incumbent: float | None, tolerance: float) -> bool:
    """The promotion gate: promote unless the candidate is worse by more than ``tolerance``."""
    return incumbent is None or bool(np.isnan(incumbent)) or candidate >= incumbent - tolerance
