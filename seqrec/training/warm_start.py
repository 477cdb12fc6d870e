"""The model a night starts from: fresh, or the promoted model's weights grown to tonight's items.

The vocabulary of a warm start keeps every index the parent had and appends tonight's new items
after them, so the parent's item rows can be copied as they are.
"""

from __future__ import annotations

import logging
import re

import pyarrow as pa
import torch

from seqrec.artifact import Artifact
from seqrec.config import ModelConfig, PrepareConfig
from seqrec.data import Vocabulary, list_parts
from seqrec.model import SeqRecConfig, SeqRecModel
from seqrec.training.cold_items import never_trained

log = logging.getLogger("seqrec.training")


def event_type_vocabulary(prepare_config: PrepareConfig) -> list[str]:
    return list(dict.fromkeys([*prepare_config.event_types, prepare_config.default_event_type]))


def build_vocabulary(
    sequences: pa.Table | pa.Array, prepare_config: PrepareConfig, parent: Artifact | None
) -> Vocabulary:
    """Tonight's items: the parent's indices kept and new items appended, or a fresh vocabulary.

    ``sequences``: the night's sequences, or the distinct items in them.
    """
    flat = list_parts(sequences["item_ids"])[0] if isinstance(sequences, pa.Table) else sequences
    if parent is not None:
        return parent.vocab.extend(flat)
    return Vocabulary.build(flat, event_type_vocabulary(prepare_config))


def initial_model(
    vocab: Vocabulary, model_config: ModelConfig, parent: Artifact | None, text_features: torch.Tensor | None
) -> SeqRecModel:
    """A fresh model, or the parent's weights grown to the new vocabulary."""
    model = SeqRecModel(
        SeqRecConfig.from_model_config(
            model_config,
            num_items=vocab.num_items,
            num_event_types=len(vocab.event_types),
            text_dim=0 if text_features is None else text_features.shape[1],
            event_types=vocab.event_types,
        )
    )
    if text_features is not None:
        model.text_features.copy_(text_features)
    if parent is None:
        if text_features is not None and vocab.counts is not None:
            # Items with no training interaction are scored from their text alone (see never_trained).
            with torch.no_grad():
                model.item_embedding.weight[:-1][torch.from_numpy(never_trained(vocab.counts))] = 0.0
        return model
    if not same_architecture(parent.model, model):
        log.warning("promoted model %s has another architecture; training from scratch", parent.version)
        return model
    _copy_parent_weights(parent, model, new_items_from_text=text_features is not None)
    log.info(
        "warm start from %s: %d known items kept, %d new",
        parent.version,
        parent.vocab.num_items,
        vocab.num_items - parent.vocab.num_items,
    )
    return model


def same_architecture(parent: SeqRecModel, model: SeqRecModel) -> bool:
    """Every tensor but the vocabulary-sized ones has the same shape, and inputs mean the same."""
    old, new = parent.state_dict(), model.state_dict()
    same_shapes = all(
        old[k].shape == new[k].shape
        for k in new
        if k in old and "item_embedding" not in k and "text_features" not in k
    )
    return (
        same_shapes
        and parent.config.kind == model.config.kind
        and parent.config.scale_embeddings == model.config.scale_embeddings
        and parent.config.members == model.config.members
    )


def _copy_parent_weights(parent: Artifact, model: SeqRecModel, new_items_from_text: bool) -> None:
    old, new = parent.model.state_dict(), model.state_dict()
    old_items = parent.vocab.num_items
    for key, value in old.items():
        if key == "item_embedding.weight":
            new[key][: old_items + 1] = value[: old_items + 1]  # padding + known items keep their rows
            if new_items_from_text:
                new[key][old_items + 1 :] = 0.0  # new items start from their text alone
            new[key][-1] = value[-1]  # [MASK]
        elif key == "text_features":
            continue  # recomputed for the grown vocabulary
        elif key in new and new[key].shape == value.shape:
            new[key] = value
    model.load_state_dict(new)


def training_date(parent: Artifact) -> str | None:
    """The night whose sequences the parent was trained on (``YYYY-MM-DD``), from its manifest."""
    manifest = parent.manifest or {}
    if manifest.get("training_date"):
        return str(manifest["training_date"])
    found = re.search(r"dt=(\d{4}-\d{2}-\d{2})", str(manifest.get("training_data", "")))
    return found.group(1) if found else None
