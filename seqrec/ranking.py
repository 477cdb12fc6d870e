"""The one masking + top-k function, shared by offline evaluation and nightly scoring.

Evaluation and production must never disagree about what a user can be shown, so both call
:func:`rank_unseen`. It scores the catalogue in chunks (so memory does not grow with catalogue
size and the score block stays cache-sized), masks each user's history by scatter into the chunk
(no dense per-user masks), masks unavailable items, and keeps a running top-k (searched in two
levels: group maxima first, then only the best groups). Given targets it also returns each
target's full-catalogue rank, counted in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
# Scores computed per (users x items) block. ~1M float32 (4 MiB) stays in the CPU's cache while it
# is masked and searched: a whole (B, chunk) block written at once is memory-bound instead
# (measured on a 2-core EPYC: 72 GF/s for one (1024 x 100k) product, 106 GF/s in 64 x 16384 blocks).
CPU_BLOCK_SCORES = 1 << 20
GPU_BLOCK_SCORES = 1 << 26
# Items per group in the two-level top-k: a group's maximum is one vectorised pass, and only the
# best k groups are searched item by item.
GROUP = 64


@dataclass
class Ranked:
    scores: torch.Tensor  # (B, k) best first
    indices: torch.Tensor  # (B, k) item indices (vocabulary / item-table rows)
    target_rank: torch.Tensor | None  # (B,) 1-based rank of the target (ties first), inf if excluded


def _merge_top_k(
    block: torch.Tensor, start: int, best_scores: torch.Tensor, best_indices: torch.Tensor, adaptive: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the top-k of ``block`` (b, C), the scores of items ``start..start+C``, into the running best.

    Exact two-level search: the k items of a top-k lie in the k groups with the largest maxima (each
    of those groups holds an item at least as good), so only those groups are gathered. A full
    ``topk`` over the block would cost as much as the matrix product that made it. ``adaptive``
    (CPU) also skips groups whose maximum cannot beat the current k-th best.
    """
    rows, width = block.shape
    k = best_scores.shape[1]
    groups = width // GROUP
    candidates, candidate_indices = [best_scores], [best_indices]
    if groups:
        maxima = block[:, : groups * GROUP].view(rows, groups, GROUP).amax(2)  # (b, G)
        take = min(k, groups)
        if adaptive:
            take = min(take, int((maxima > best_scores[:, -1:]).sum(1).max()))
        if take:
            top_groups = maxima.topk(take, dim=1, sorted=False).indices  # (b, take)
            columns = (top_groups[:, :, None] * GROUP + torch.arange(GROUP, device=block.device)).view(
                rows, -1
            )  # (b, take * GROUP)
            candidates.append(block.gather(1, columns))
            candidate_indices.append(columns + start)
    if width > groups * GROUP:  # the ragged tail
        candidates.append(block[:, groups * GROUP :])
        candidate_indices.append(
            torch.arange(start + groups * GROUP, start + width, device=block.device).expand(rows, -1)
        )
    if len(candidates) == 1:
        return best_scores, best_indices
    merged_scores, order = torch.cat(candidates, dim=1).topk(k, dim=1)
    return merged_scores, torch.cat(candidate_indices, dim=1).gather(1, order)


def at_least(scores: torch.Tensor, threshold: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """(b,) how many of each row's ``scores`` (b, C) are >= its ``threshold`` (b, 1); exact.

    On a CPU, ``(scores >= threshold).sum(1)`` writes a bool block and widens it to int64, which
    costs more than the matrix product that made the block. With a float32 ``buffer`` the
    difference's sign bit does the count instead: ``scores - threshold`` is +0.0 on a tie and
    negative exactly when the score is lower (-inf scores stay -inf), so an arithmetic shift by 31
    gives -1 for lower and 0 otherwise. That needs a finite threshold (-inf - -inf is NaN); without
    a buffer or with another threshold the comparison counts.
    """
    if buffer is None or not threshold.isfinite().all():
        return (scores >= threshold).sum(1)
    rows, width = scores.shape
    difference = torch.sub(scores, threshold, out=buffer[: rows * width].view(rows, width))
    lower = difference.view(torch.int32).bitwise_right_shift_(31).sum(1, dtype=torch.int32)
    return (width + lower).long()


@torch.inference_mode()
def rank_unseen(
    queries: torch.Tensor,
    items: torch.Tensor,
    seen: torch.Tensor,
    k: int,
    *,
    excluded: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    chunk_size: int = 16384,
) -> Ranked:
    """Top-``k`` items per query among those not in ``seen`` and not ``excluded``.

    queries:  (B, H) user vectors, or (B, 1) ones for a popularity baseline.
    items:    (N, H) item table; row 0 is padding and is never returned.
    seen:     (B, L) item indices each user already interacted with, 0-padded.
    excluded: (N,) bool, True for items that must never be recommended (unavailable, [MASK]).
    targets:  (B,) item indices whose rank to report (leave-one-out evaluation).
    k=0 (with targets): only the ranks, no top-k lists (evaluation needs no more; the search for the
    lists costs about a quarter of a call).
    """
    batch, num_items = queries.shape[0], items.shape[0]
    device = queries.device
    k = max(min(k, num_items - 1), 0)
    if k == 0 and targets is None:
        raise ValueError("rank_unseen needs k > 0 or targets")
    chunk_size = max(1, min(chunk_size, num_items))
    on_cpu = device.type == "cpu"
    block_rows = max(1, (CPU_BLOCK_SCORES if on_cpu else GPU_BLOCK_SCORES) // chunk_size)
    # Padding and excluded items as sorted indices: each chunk fills only its own few columns.
    never = torch.zeros(1, dtype=torch.long, device=device)
    if excluded is not None:
        never = torch.cat([never, excluded.nonzero().flatten()]).unique()
    starts = list(range(0, num_items, chunk_size))
    bounds = torch.searchsorted(never, torch.tensor([*starts, num_items], device=device)).tolist()
    if targets is not None:
        target_score = (queries * items[targets]).sum(-1, keepdim=True)  # (B, 1)
        target_hidden = (seen == targets[:, None]).any(1) | (targets == 0)
        if excluded is not None:
            target_hidden |= excluded[targets]
        higher = torch.zeros(batch, dtype=torch.long, device=device)
        # The sign-bit count's scratch block: float32 on a CPU only (elsewhere the comparison counts).
        below = None
        if on_cpu and queries.dtype == torch.float32:
            below = torch.empty(min(block_rows, batch) * chunk_size, dtype=torch.float32)

    best_scores = torch.full((batch, k), NEG_INF, device=device, dtype=queries.dtype)
    best_indices = torch.zeros((batch, k), dtype=torch.long, device=device)
    buffer = torch.empty(min(block_rows, batch) * chunk_size, device=device, dtype=queries.dtype)
    # Items outside, users inside: a chunk of the item table is read from memory once per call and
    # stays in cache while every block of users is scored against it.
    for chunk, start in enumerate(starts):
        stop = min(start + chunk_size, num_items)
        chunk_items = items[start:stop]
        for first in range(0, batch, block_rows):
            last = min(first + block_rows, batch)
            rows = torch.arange(last - first, device=device)
            scores = torch.mm(
                queries[first:last],
                chunk_items.T,  # (b, C), in cache
                out=buffer[: (last - first) * (stop - start)].view(last - first, stop - start),
            )
            local = seen[first:last] - start  # (b, L)
            hit = (local >= 0) & (local < stop - start)
            scores[rows[:, None].expand_as(local)[hit], local[hit]] = NEG_INF  # history, by scatter
            if bounds[chunk + 1] > bounds[chunk]:  # padding, unavailable
                scores.index_fill_(1, never[bounds[chunk] : bounds[chunk + 1]] - start, NEG_INF)
            if targets is not None:
                # Ties count against the target, so a target ranked <= k is always in the top-k list;
                # the target itself never counts (its score here may differ from target_score in the
                # last bit: matmul and elementwise sums round differently).
                block_score = target_score[first:last]
                higher[first:last] += at_least(scores, block_score, below)
                local_target = targets[first:last] - start
                own = (local_target >= 0) & (local_target < stop - start)
                higher[first:last][own] -= (
                    scores[rows[own], local_target[own]] >= block_score[own, 0]
                ).long()
            if k > 0:
                best_scores[first:last], best_indices[first:last] = _merge_top_k(
                    scores, start, best_scores[first:last], best_indices[first:last], adaptive=on_cpu
                )

    target_rank = None
    if targets is not None:
        target_rank = (higher + 1).to(torch.float32)
        target_rank[target_hidden] = float("inf")
    return Ranked(scores=best_scores, indices=best_indices, target_rank=target_rank)


@torch.inference_mode()
def popularity_ranks(
    popularity: torch.Tensor, seen: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) the targets' ranks under a score every user shares, as :func:`rank_unseen` counts them.

    Equal to ``rank_unseen(ones(B, 1), popularity[:, None], seen, 0, excluded=..., targets=...)``
    without scoring the catalogue per user: one sorted array of the visible items' scores gives how
    many score at least the target's, and the user's distinct visible history among those is taken
    off. popularity: (N,) scores, row 0 padding; the rest as in :func:`rank_unseen`.
    """
    num_items = popularity.shape[0]
    visible = torch.ones(num_items, dtype=torch.bool, device=popularity.device)
    visible[0] = False
    if excluded is not None:
        visible &= ~excluded
    ordered = popularity[visible].sort().values
    target_score = popularity[targets]
    at_least = len(ordered) - torch.searchsorted(ordered, target_score, right=False)  # with the target
    history = seen.sort(dim=1).values
    distinct = torch.ones_like(history, dtype=torch.bool)
    distinct[:, 1:] = history[:, 1:] != history[:, :-1]
    counted = distinct & visible[history] & (popularity[history] >= target_score[:, None])
    ranks = (at_least - counted.sum(1)).to(torch.float32)  # rank = 1 + the others at least as good
    hidden = ~visible[targets] | (seen == targets[:, None]).any(1)
    ranks[hidden] = float("inf")
    return ranks


def user_metrics(ranks: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """(B,) HR@k, NDCG@k (one relevant item) and reciprocal rank of each user, from 1-based ranks."""
    out: dict[str, torch.Tensor] = {"mrr": 1.0 / ranks}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.to(ranks.dtype)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))
    return out


def ranking_metrics(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from 1-based ranks; sums, not means."""
    return {name: values.sum().item() for name, values in user_metrics(ranks, ks).items()}
