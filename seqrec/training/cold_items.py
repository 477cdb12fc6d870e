"""Items with no training interaction: kept out of the softmax, then placed from their text.

A text-aware model learns an item's id row from its interactions only. Items without any stay out
of the training softmax (:func:`never_trained`) and, after training, get rows fitted from their
text (:func:`place_untrained_items`) so that they can reach a top-k at all.
"""

from __future__ import annotations

import numpy as np
import torch

from seqrec.model import SeqRecModel, next_item_pairs, query_inputs

# Users whose rows the placement fit reads: it needs examples, not everyone.
PLACEMENT_USERS = 20_000


def never_trained(counts: np.ndarray) -> np.ndarray:
    """(N+1,) bool: padding and the items with no interaction in the training part.

    A text-aware model keeps them out of the training softmax: they would only ever be negatives
    there, so their id rows would learn "never chosen" and bury the items text alone could place
    (the cold-start case). Their id rows stay zero and their score is their text's.
    """
    untrained = np.asarray(counts) == 0
    untrained[0] = True
    return untrained


def without_id_rows(model: SeqRecModel, counts: np.ndarray) -> np.ndarray:
    """(N+1,) bool: items with no interaction in the training part and no id row yet (all zeros).

    A warm start keeps the rows the parent learned (or placed) for items that are quiet tonight;
    only items that never had one are placed from their text.
    """
    rows = model.item_embedding.weight.detach()[: len(counts)]
    return never_trained(counts) & (rows == 0).all(1).numpy()


def place_untrained_items(
    model: SeqRecModel,
    rows: np.ndarray,
    row_types: np.ndarray,
    untrained: np.ndarray,
    *,
    max_examples: int = 100_000,
    epochs: int = 2,
    batch_size: int = 512,
    share: float = 0.5,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Give the items in ``untrained`` (N+1 bool; padding included) rows learned from their text.

    A text-aware model learns an item's id row from its interactions only, so an item with none is
    scored by the text projection alone, which trained rows have learned to outscore: it never
    reaches a top-k. Here, after training, a second projection ``g`` of the text is fitted with
    everything else frozen, on the training rows ``rows`` / ``row_types`` ((U, T+1) as the training
    loop sees them): at each step a ``share`` of the trained items are represented by ``g(text)``
    instead of their own row, and the full-softmax loss of the (fixed) user states is minimised.
    ``g`` thus learns to place an item from its text where a trained row would be, at the scale
    trained rows have, and against other text-placed items (without those negatives it would only
    grow). Training itself is unchanged, so items with interactions rank as before. The untrained
    items' id rows are then set so that their representation is ``g(text)``. Returns the fit's loss
    before and after, for the log.
    """
    config = model.config
    no_column = torch.from_numpy(untrained.copy())  # padding and untrained: no column
    cold = no_column.clone()
    cold[0] = False  # padding stays zero
    if int(cold.sum()) == 0 or model.text_projection is None:
        return {"items": 0}
    generator = torch.Generator().manual_seed(seed)
    num = len(untrained)
    model.eval()
    with torch.no_grad():  # (inference tensors can't enter autograd)
        text = model.text_features[:num].float().clone()
        table = model.item_table()[:num].float().clone()  # (N+1, H) what scoring uses
        states, labels = [], []
        items, types = torch.from_numpy(rows), torch.from_numpy(row_types)
        for first in range(0, len(items), 256):
            batch, batch_types = items[first : first + 256], types[first : first + 256]
            if config.kind == "causal":  # every position predicts the next item
                inputs, input_types, target = next_item_pairs(batch, batch_types)
                picked = target != 0
                states.append(model(inputs, input_types).hidden[picked])
                labels.append(target[picked])
            else:  # the [MASK] state predicts the last item
                inputs, input_types = query_inputs(
                    batch[:, :-1], batch_types[:, :-1], config.kind, config.mask_index
                )
                keep = batch[:, -1] != 0
                states.append(model.user_vectors(inputs, input_types)[keep])
                labels.append(batch[:, -1][keep])
        states, labels = torch.cat(states).float(), torch.cat(labels)
    keep = ~no_column[labels]
    states, labels = states[keep], labels[keep]
    if len(labels) == 0:
        return {"items": 0}
    if len(labels) > max_examples:
        pick = torch.randperm(len(labels), generator=generator)[:max_examples]
        states, labels = states[pick], labels[pick]
    projection = torch.nn.Linear(config.text_dim, config.width)
    with torch.no_grad():
        projection.weight.copy_(model.text_projection.weight)
        projection.bias.zero_()
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)

    def loss_of(chosen: torch.Tensor, placed: torch.Tensor) -> torch.Tensor:
        candidates = torch.where(placed[:, None], projection(text), table)
        logits = (states[chosen] @ candidates.T).masked_fill(no_column, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, labels[chosen])

    def placed_share() -> torch.Tensor:
        return torch.rand(num, generator=generator) < share

    probe = torch.randperm(len(labels), generator=generator)[:4096]
    probe_placed = placed_share()
    with torch.no_grad():
        before = float(loss_of(probe, probe_placed))
    for _ in range(epochs):
        for chosen in torch.randperm(len(labels), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss_of(chosen, placed_share()).backward()
            optimizer.step()
    with torch.no_grad():
        after = float(loss_of(probe, probe_placed))
        placed = projection(text[cold]) - model.text_projection(text[cold])
        model.item_embedding.weight[:num][cold] = placed.to(model.item_embedding.weight.dtype)
    return {"items": int(cold.sum()), "examples": len(labels), "loss_before": before, "loss_after": after}
