"""Training objectives over item scores, selected by ``TrainConfig.loss``.

* ``ce``: full-softmax cross-entropy over the whole catalogue (the strongest when it fits),
  computed by :class:`ChunkedCrossEntropy` so the (positions x catalogue) logit matrix is never
  materialised.
* ``sampled``: softmax over the positive and ``num_negatives`` items drawn by popularity, with the
  log-q correction (subtract log of each item's sampling probability) so the estimate is unbiased
  towards popular items; for catalogues too large for a full softmax.
* ``gbce``: gSASRec's generalised binary cross-entropy with uniform negatives; ``gbce_t`` calibrates
  the positive term against the negative sampling rate (t=0 is plain BCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "sampled", "gbce")


def ce_chunk_rows(num_items: int) -> int:
    """Rows of logits formed at once: ~1M scores (4 MB), between 64 and 256 rows.

    Profiled on one CPU thread, bf16 (4000 positions): 3.4k items, 256 rows 0.067 s (64 rows 0.073);
    54.5k items, 64 rows 0.83 s, 256 rows 1.80 s (the chunk and the table gradient spill the cache).
    """
    return int(min(256, max(64, (1 << 20) // max(num_items, 1))))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean full-softmax cross-entropy of ``hidden @ table.T`` fused with its gradient.

    The logits are formed ``chunk`` rows at a time; each chunk's log-sum-exp and its gradient
    ``softmax - onehot`` are computed while it is still in cache, and the gradients of ``hidden``
    and ``table`` are accumulated right away. Nothing of size (P, N) outlives a chunk, which on CPU
    turned the softmax from memory-bound into matmul-bound (torch.profiler: ``log_softmax`` forward
    + backward and the bf16<->fp32 copies of the logits were half the training step).

    Matmuls run in ``compute_dtype`` (bf16 under autocast); the softmax is always float32.
    The backward only scales the stored gradients, so call this where a backward follows.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        table: torch.Tensor,
        labels: torch.Tensor,
        excluded: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk: int,
    ) -> torch.Tensor:
        rows = len(labels)
        h, w = hidden.detach().to(compute_dtype), table.detach().to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h_c, y_c = h[start : start + chunk], labels[start : start + chunk]
            logits = torch.mm(h_c, w.T).float()  # (c, N+1)
            logits.index_fill_(1, excluded, float("-inf"))  # padding (+ items never in training)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, y_c[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad[torch.arange(len(y_c), device=grad.device), y_c] -= 1.0
            grad = grad.to(compute_dtype)
            grad_hidden[start : start + chunk] = torch.mm(grad, w)
            grad_table += torch.mm(grad.T, h_c)
        ctx.save_for_backward(grad_hidden, grad_table)
        ctx.rows, ctx.dtypes = max(rows, 1), (hidden.dtype, table.dtype)
        return total / ctx.rows

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_table = ctx.saved_tensors
        scale = grad_output.float() / ctx.rows
        return (
            grad_hidden.mul_(scale).to(ctx.dtypes[0]),
            grad_table.mul_(scale).to(ctx.dtypes[1]),
            None,
            None,
            None,
            None,
        )


def full_ce(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    items: torch.Tensor,
    chunk: int | None = None,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden: (P, H) states at labelled positions; labels: (P,) in 1..N; items: (N+1, H) incl. padding.

    ``excluded``: (N+1,) bool, items left out of the softmax (never a label); padding always is.
    Under autocast the matmuls run in the autocast dtype (as ``hidden @ items.T`` would).
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    columns = (
        torch.zeros(1, dtype=torch.long, device=hidden.device)
        if excluded is None
        else (excluded | (torch.arange(len(excluded), device=excluded.device) == 0)).nonzero().squeeze(1)
    )
    with torch.autocast(device, enabled=False):
        return ChunkedCrossEntropy.apply(
            hidden, items, labels, columns, dtype, chunk or ce_chunk_rows(len(items))
        )


def sampled_ce(
    hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor, num_negatives: int
) -> torch.Tensor:
    """log_q: (N+1,) log sampling probability of each index (padding: -inf)."""
    negatives = torch.multinomial(log_q.exp(), num_negatives, replacement=True)  # (M,) shared
    pos = (hidden * items[labels]).sum(-1, keepdim=True) - log_q[labels, None]  # (P, 1)
    neg = hidden @ items[negatives].T - log_q[negatives]  # (P, M)
    neg = neg.masked_fill(negatives[None, :] == labels[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(labels), dtype=torch.long, device=hidden.device))


def gbce(
    hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor, num_negatives: int, t: float
) -> torch.Tensor:
    """Negatives are drawn uniformly once per batch and shared by every position, as in
    :func:`sampled_ce`: a (P, M) matmul. Drawn per position they were gathered into a (P, M, hidden)
    tensor: at 4,096 negatives and hidden 128 one S3-Rec Beauty epoch took 1,007 s, against about
    25 s with the full softmax. Each positive still meets M uniform negatives, so alpha and beta are
    unchanged."""
    num_items = items.shape[0] - 1
    negatives = torch.randint(1, num_items + 1, (num_negatives,), device=hidden.device)  # (M,) shared
    pos = (hidden * items[labels]).sum(-1)  # (P,)
    neg = hidden @ items[negatives].T  # (P, M)
    alpha = num_negatives / max(num_items - 1, 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    pos_term = beta * F.logsigmoid(pos)
    neg_term = F.logsigmoid(-neg).masked_fill(negatives[None, :] == labels[:, None], 0.0).sum(-1)
    return -(pos_term + neg_term).mean()


def contrastive(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised InfoNCE over two views of the same positions (DuoRec's contrastive term).

    first/second: (P, H) the states of P positions from two encoder passes with independent
    dropout; labels: (P,) their next items. Each of the 2P states is an anchor; its positives are
    its other view and both views of every other position with the same label, its negatives all
    the remaining states (dot-product similarity / ``temperature``, in float32). Returns the mean
    over anchors of the mean -log p(positive).
    """
    z = torch.cat([first, second]).float()  # (2P, H)
    targets = torch.cat([labels, labels])
    scores = (z @ z.T) / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    scores = scores.masked_fill(self_pair, float("-inf"))
    positive = (targets[:, None] == targets[None, :]) & ~self_pair
    log_p = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    per_anchor = -(log_p.masked_fill(~positive, 0.0).sum(1) / positive.sum(1))
    return per_anchor.mean()


def item_loss(
    name: str,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    items: torch.Tensor,
    *,
    log_q: torch.Tensor | None = None,
    num_negatives: int = 256,
    gbce_t: float = 0.75,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """``excluded`` (full CE only): items kept out of the softmax, see :func:`full_ce`."""
    if name == "ce":
        return full_ce(hidden, labels, items, excluded=excluded)
    if name == "sampled":
        if log_q is None:
            raise ValueError("the sampled loss needs item sampling probabilities (log_q)")
        return sampled_ce(hidden, labels, items, log_q, num_negatives)
    if name == "gbce":
        return gbce(hidden, labels, items, num_negatives, gbce_t)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
