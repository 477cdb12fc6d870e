"""Training objectives over item scores, selected by ``TrainConfig.loss``.

* ``ce``: full-softmax cross-entropy over the whole catalogue (the strongest when it fits).
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


def full_ce(hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """hidden: (P, H) states at labelled positions; labels: (P,) in 1..N; items: (N+1, H) incl. padding."""
    logits = hidden @ items.T                                   # (P, N+1)
    logits[:, 0] = float("-inf")                                # padding is never an answer
    return F.cross_entropy(logits, labels)


def sampled_ce(hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor, log_q: torch.Tensor,
               num_negatives: int) -> torch.Tensor:
    """log_q: (N+1,) log sampling probability of each index (padding: -inf)."""
    negatives = torch.multinomial(log_q.exp(), num_negatives, replacement=True)        # (M,) shared
    pos = (hidden * items[labels]).sum(-1, keepdim=True) - log_q[labels, None]        # (P, 1)
    neg = hidden @ items[negatives].T - log_q[negatives]                              # (P, M)
    neg = neg.masked_fill(negatives[None, :] == labels[:, None], float("-inf"))       # accidental hits
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(labels), dtype=torch.long, device=hidden.device))


def gbce(hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor, num_negatives: int,
         t: float) -> torch.Tensor:
    num_items = items.shape[0] - 1
    negatives = torch.randint(1, num_items + 1, (len(labels), num_negatives), device=hidden.device)  # (P, M)
    pos = (hidden * items[labels]).sum(-1)                                            # (P,)
    neg = torch.einsum("ph,pmh->pm", hidden, items[negatives])                        # (P, M)
    alpha = num_negatives / max(num_items - 1, 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    pos_term = beta * F.logsigmoid(pos)
    neg_term = F.logsigmoid(-neg).masked_fill(negatives == labels[:, None], 0.0).sum(-1)
    return -(pos_term + neg_term).mean()


def item_loss(name: str, hidden: torch.Tensor, labels: torch.Tensor, items: torch.Tensor, *,
              log_q: torch.Tensor | None = None, num_negatives: int = 256, gbce_t: float = 0.75) -> torch.Tensor:
    if name == "ce":
        return full_ce(hidden, labels, items)
    if name == "sampled":
        if log_q is None:
            raise ValueError("the sampled loss needs item sampling probabilities (log_q)")
        return sampled_ce(hidden, labels, items, log_q, num_negatives)
    if name == "gbce":
        return gbce(hidden, labels, items, num_negatives, gbce_t)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
