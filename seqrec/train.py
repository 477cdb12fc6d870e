"""Stage 2: fine-tune the recommender with Ray Train (data-parallel) and Accelerate.

The driver builds the vocabulary and the initial model (warm-started from the promoted artifact
when there is one: existing rows kept, new items appended), turns the night's sequences into Ray
datasets of index arrays, and runs a ``TorchTrainer``. Each worker trains on its shard of the
training users, evaluates its shard of the validation users each epoch (sums all-reduced, so every
rank sees the same numbers and stops at the same epoch), and rank 0 reports a checkpoint holding
the current state and the best-so-far weights. Model selection uses validation only.

Leave-one-out: a user's last item is the test target and the second-to-last the validation target;
training sees neither.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from safetensors.torch import load_file, save_file

from seqrec.artifact import Artifact
from seqrec.config import ModelConfig, PrepareConfig, TrainConfig, check_choices
from seqrec.data import Vocabulary, encode, list_parts, longest
from seqrec.losses import item_loss
from seqrec.model import SeqRecConfig, SeqRecModel, query_inputs
from seqrec.ranking import rank_unseen, ranking_metrics
from seqrec.storage import Storage

log = logging.getLogger("seqrec.train")

SELECTION_METRIC = "val_ndcg@10"


@dataclass
class TrainResult:
    model: SeqRecModel
    vocab: Vocabulary
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)
    run_name: str = ""
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Data for the workers
# --------------------------------------------------------------------------------------------
class EncodeSplit:
    """Ray Data batch function: sequences -> fixed-width training rows.

    ``holdout`` newest items are removed first (2 for training). Rows have ``width + 1`` columns
    (inputs and shifted labels); with ``windows`` a longer history gives one row per window
    (:func:`seqrec.data.window_index`). Validation rows come from :func:`evaluation_rows`.
    """

    def __init__(self, vocab: Vocabulary, width: int, holdout: int, min_len: int = 2, windows: bool = False):
        self.vocab, self.width, self.holdout, self.min_len, self.windows = vocab, width, holdout, min_len, windows

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        enc = encode(batch, self.vocab, self.width + 1, drop_last=self.holdout, windows=self.windows)
        keep = enc.lengths >= self.min_len
        return {"items": enc.items[keep], "event_types": enc.event_types[keep]}


def evaluation_rows(batch: pa.Table, vocab: Vocabulary, width: int, holdout: int, seen_width: int) -> dict[str, np.ndarray]:
    """Leave-one-out rows of users with at least one item before the target.

    items/event_types: the newest ``width`` items before the target, then the target (last column);
    seen: every item before the target (the newest ``seen_width``), excluded from the ranking as in
    the literature, even where the history is longer than the model's context.
    """
    full = encode(batch, vocab, max(seen_width, width) + 1, drop_last=holdout)
    keep = full.lengths >= 2
    return {"items": full.items[keep, -(width + 1):], "event_types": full.event_types[keep, -(width + 1):],
            "seen": full.items[keep, :-1].astype(np.int32)}


def item_counts(sequences: pa.Table, vocab: Vocabulary, holdout: int = 2) -> np.ndarray:
    """Interactions per vocabulary index in the training part (for popularity and log-q)."""
    enc = encode(sequences.select(["item_ids"]), vocab, width=max(longest(sequences), 1), drop_last=holdout)
    return np.bincount(enc.items.ravel(), minlength=vocab.num_items + 1).astype(np.int64)


def make_datasets(sequences: pa.Table, vocab: Vocabulary, max_len: int, num_workers: int,
                  windows: bool = False) -> dict[str, ray.data.Dataset]:
    source = ray.data.from_arrow(sequences.select(["item_ids", "event_types"]))
    blocks = max(num_workers * 2, 2)
    train = source.map_batches(EncodeSplit(vocab, max_len, holdout=2, windows=windows), batch_format="pyarrow",
                               batch_size=4096)
    val = source.map_batches(evaluation_rows, fn_kwargs={"vocab": vocab, "width": max_len, "holdout": 1,
                                                         "seen_width": max(longest(sequences) - 1, 1)},
                             batch_format="pyarrow", batch_size=4096)
    return {"train": train.repartition(blocks).materialize(), "val": val.repartition(blocks).materialize()}


# --------------------------------------------------------------------------------------------
# Model construction (driver side)
# --------------------------------------------------------------------------------------------
def initial_model(vocab: Vocabulary, config: ModelConfig, parent: Artifact | None,
                  text_features: torch.Tensor | None) -> SeqRecModel:
    """A fresh model, or the parent's weights grown to the new vocabulary."""
    model_config = SeqRecConfig.from_model_config(
        config, num_items=vocab.num_items, num_event_types=len(vocab.event_types),
        text_dim=0 if text_features is None else text_features.shape[1], event_types=vocab.event_types)
    model = SeqRecModel(model_config)
    if text_features is not None:
        model.text_features.copy_(text_features)
    if parent is None:
        if text_features is not None and vocab.counts is not None:
            # Items with no training interaction are scored from their text alone (see never_trained).
            with torch.no_grad():
                model.item_embedding.weight[:-1][torch.from_numpy(never_trained(vocab.counts))] = 0.0
        return model
    old = parent.model.state_dict()
    new = model.state_dict()
    compatible = all(old[k].shape == new[k].shape for k in new if k in old and "item_embedding" not in k
                     and "text_features" not in k)
    same_inputs = getattr(parent.model.config, "scale_embeddings", False) == config.scale_embeddings
    same_members = getattr(parent.model.config, "members", 1) == config.members
    if parent.model.config.kind != config.kind or not compatible or not same_inputs or not same_members:
        log.warning("promoted model %s has another architecture; training from scratch", parent.version)
        return model
    old_items = parent.vocab.num_items
    for key, value in old.items():
        if key == "item_embedding.weight":
            new[key][: old_items + 1] = value[: old_items + 1]     # padding + known items keep their rows
            if text_features is not None:
                new[key][old_items + 1:] = 0.0                      # new items start from their text alone
            new[key][-1] = value[-1]                                # [MASK]
        elif key == "text_features":
            continue                                                 # recomputed for the grown vocabulary
        elif key in new and new[key].shape == value.shape:
            new[key] = value
    model.load_state_dict(new)
    log.info("warm start from %s: %d known items kept, %d new", parent.version, old_items,
             vocab.num_items - old_items)
    return model


# --------------------------------------------------------------------------------------------
# The worker loop
# --------------------------------------------------------------------------------------------
def never_trained(counts: np.ndarray) -> np.ndarray:
    """(N+1,) bool: padding and the items with no interaction in the training part.

    A text-aware model keeps them out of the training softmax: they would only ever be negatives
    there, so their id rows would learn "never chosen" and bury the items text alone could place
    (the cold-start case). Their id rows stay zero and their score is their text's.
    """
    unseen = np.asarray(counts) == 0
    unseen[0] = True
    return unseen


def next_item_pairs(items: torch.Tensor, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal training rows (B, T+1) -> inputs, their types and next-item labels (B, T); 0 = no label."""
    inputs, input_types, labels = items[:, :-1], types[:, :-1], items[:, 1:].clone()
    labels[inputs == 0] = 0               # the first event has no context to predict it from
    return inputs, input_types, labels


def without_id_rows(model: SeqRecModel, counts: np.ndarray) -> np.ndarray:
    """(N+1,) bool: items with no interaction in the training part and no id row yet (all zeros).

    A warm start keeps the rows the parent learned (or placed) for items that are quiet tonight;
    only items that never had one are placed from their text.
    """
    rows = model.item_embedding.weight.detach()[: len(counts)]
    return never_trained(counts) & (rows == 0).all(1).numpy()


PLACEMENT_USERS = 20_000


def place_untrained_items(model: SeqRecModel, rows: np.ndarray, row_types: np.ndarray, untrained: np.ndarray, *,
                          max_examples: int = 100_000, epochs: int = 2, batch_size: int = 512, share: float = 0.5,
                          lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
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
    excluded = torch.from_numpy(untrained.copy())                        # padding and untrained: no column
    cold = excluded.clone()
    cold[0] = False                                                       # padding stays zero
    if int(cold.sum()) == 0 or model.text_projection is None:
        return {"items": 0}
    generator = torch.Generator().manual_seed(seed)
    num = len(untrained)
    model.eval()
    with torch.no_grad():                                                # (inference tensors can't enter autograd)
        text = model.text_features[:num].float().clone()
        table = model.item_table()[:num].float().clone()                  # (N+1, H) what scoring uses
        states, labels = [], []
        items, types = torch.from_numpy(rows), torch.from_numpy(row_types)
        for first in range(0, len(items), 256):
            batch, batch_types = items[first:first + 256], types[first:first + 256]
            if config.kind == "causal":                                  # every position predicts the next item
                inputs, input_types, target = next_item_pairs(batch, batch_types)
                picked = target != 0
                states.append(model(inputs, input_types).hidden[picked])
                labels.append(target[picked])
            else:                                                         # the [MASK] state predicts the last item
                inputs, input_types = query_inputs(batch[:, :-1], batch_types[:, :-1], config.kind, config.mask_index)
                keep = batch[:, -1] != 0
                states.append(model.user_vectors(inputs, input_types)[keep])
                labels.append(batch[:, -1][keep])
        states, labels = torch.cat(states).float(), torch.cat(labels)
    keep = ~excluded[labels]
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
        logits = (states[chosen] @ candidates.T).masked_fill(excluded, float("-inf"))
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


def training_step_loss(model: torch.nn.Module, core: SeqRecModel, items: torch.Tensor, types: torch.Tensor,
                       train: TrainConfig, log_q: torch.Tensor | None,
                       excluded: torch.Tensor | None = None) -> torch.Tensor:
    """items/types: (B, T+1) left-padded training rows.

    ``model`` is what the forward goes through (the DDP wrapper, so gradients are synchronised);
    ``core`` is the unwrapped model, for its config and item table.
    """
    config = core.config
    if config.kind == "causal":
        inputs, input_types, labels = next_item_pairs(items, types)                        # (B, T)
    else:
        inputs, input_types = items[:, 1:].clone(), types[:, 1:].clone()
        real = inputs != 0
        masked = (torch.rand(inputs.shape, device=inputs.device) < train.mask_prob) & real
        masked[:, -1] |= real[:, -1] & (torch.rand(len(inputs), device=inputs.device) < train.mask_prob)
        labels = torch.where(masked, inputs, torch.zeros_like(inputs))
        inputs[masked] = config.mask_index
        input_types[masked] = 0
    keep_ids = None
    if config.text_dim and train.id_dropout > 0:
        keep_ids = (torch.rand(config.num_items + 2, device=items.device) >= train.id_dropout).float()
        keep_ids[-1] = 1.0                                          # [MASK] has no text to fall back on
    hidden = model(inputs, input_types, keep_ids=keep_ids).hidden  # (B, T, width)
    picked = labels != 0
    table = core.item_table(keep_ids)[: config.num_items + 1]      # (N+1, width) without [MASK]
    # Each ensemble member is trained on its own loss (its own slice of states and items), as a
    # separately trained model would be; a loss of the summed scores would train one wide model.
    return sum(item_loss(train.loss, states, labels[picked], items, log_q=log_q, num_negatives=train.num_negatives,
                         gbce_t=train.gbce_t, excluded=excluded)
               for states, items in zip(hidden[picked].split(config.hidden_size, dim=-1),
                                        table.split(config.hidden_size, dim=-1)))


def evaluate_batches(model: SeqRecModel, batches, ks: list[int], device: torch.device,
                     bf16: bool = False) -> dict[str, float]:
    """Sums of leave-one-out metrics over batches of {items, event_types, seen} (last column = target).

    ``seen`` is the whole history, excluded from the ranking (:func:`evaluation_rows`).

    ``bf16`` runs the sequence encoder under bf16 autocast; ranking is always float32 so that
    near-ties are not decided by rounding.
    """
    config = model.config
    excluded = torch.zeros(config.num_items + 1, dtype=torch.bool, device=device)
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
            ranked = rank_unseen(queries, table, batch["seen"].to(device), k=max(ks), excluded=excluded, targets=targets)
            for key, value in ranking_metrics(ranked.target_rank, ks).items():
                totals[key] = totals.get(key, 0.0) + value
            totals["users"] += len(targets)
    return totals


def _reduce_sums(totals: dict[str, float]) -> dict[str, float]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return totals
    keys = sorted(totals)
    tensor = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def replicas_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds the same weights: the proof that gradients were averaged.

    (Seen on this stack: a plain ``Accelerator()`` in Ray Train CPU workers trained each worker
    alone, silently.) Compares a weight checksum's min and max over ranks.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.isclose(low, high, rtol=1e-9, atol=1e-9))


def means(totals: dict[str, float], prefix: str) -> dict[str, float]:
    users = max(totals.get("users", 0.0), 1.0)
    return {f"{prefix}{k}": v / users for k, v in totals.items() if k != "users"}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX): then bf16 autocast is ~1.5x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(train: TrainConfig) -> str:
    """``auto``: bf16 on CUDA and on CPUs with native bf16 matmuls, full fp32 otherwise."""
    if train.mixed_precision != "auto":
        return train.mixed_precision
    if train.use_gpu:
        return "bf16" if torch.cuda.is_available() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warmup, then constant or a cosine decay reaching 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    from accelerate import Accelerator

    train = TrainConfig(**loop["train"])
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train.seed + rank)
    mixed = resolve_mixed_precision(train)
    # cpu=True on CPU workers: without it Accelerate skipped gradient sync under Ray Train.
    accelerator = Accelerator(cpu=not train.use_gpu, mixed_precision=mixed)
    device = accelerator.device

    model = SeqRecModel(SeqRecConfig(**loop["model_config"]))
    model.load_state_dict(ray.get(loop["initial_state"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.98))
    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = json.loads(Path(directory, "state.json").read_text())
            model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
            optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
            best_state = load_file(os.path.join(directory, "best.safetensors"))
        start_epoch, best, best_epoch, history = state["epoch"] + 1, state["best"], state["best_epoch"], state["history"]
        log.info("rank %d resumed from epoch %d", rank, state["epoch"])
    else:
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
    per_worker_batch = max(1, train.batch_size // world)
    steps_per_epoch = -(-loop["train_rows"] // (per_worker_batch * world))
    done = start_epoch * steps_per_epoch                              # a restored run resumes its schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        done + step, train.warmup_steps, train.epochs * steps_per_epoch, train.lr_schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    log_q = None
    if train.loss == "sampled":
        counts = torch.tensor(loop["item_counts"], dtype=torch.float64) + 1.0
        if train.negatives == "uniform":                 # a constant log-q: the correction cancels
            counts = torch.ones_like(counts)
        counts[0] = 0.0
        log_q = (counts / counts.sum()).log().float().to(device)
    excluded = None
    if core.config.text_dim and train.loss == "ce":
        excluded = torch.from_numpy(never_trained(np.asarray(loop["item_counts"]))).to(device)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    patience_left = train.patience
    for epoch in range(start_epoch, train.epochs):
        model.train()
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_torch_batches(batch_size=per_worker_batch, dtypes=torch.long, device=str(device),
                                                    local_shuffle_buffer_size=per_worker_batch * 4,
                                                    local_shuffle_seed=train.seed + epoch * 131 + rank):
            with accelerator.autocast():
                loss = training_step_loss(model, core, batch["items"], batch["event_types"], train, log_q, excluded)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            steps += 1
            seen += len(batch["items"])
        train_s = time.perf_counter() - started
        totals = {"loss_sum": loss_sum, "steps": float(steps), "seen": float(seen)}
        totals = _reduce_sums(totals)
        metrics = {"epoch": epoch, "train_loss": totals["loss_sum"] / max(totals["steps"], 1.0),
                   "train_seq_per_s": totals["seen"] / max(train_s, 1e-9), "replicas_in_sync": replicas_in_sync(core)}
        if (epoch + 1) % train.eval_every == 0 or epoch == train.epochs - 1:
            val_batches = val_shard.iter_torch_batches(batch_size=512, dtypes=torch.long)
            metrics.update(means(_reduce_sums(evaluate_batches(core, val_batches, loop["ks"], device, mixed == "bf16")),
                                 "val_"))
            if metrics[SELECTION_METRIC] > best:
                best, best_epoch, patience_left = metrics[SELECTION_METRIC], epoch, train.patience
                best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
            else:
                patience_left -= 1
        metrics["epoch_s"] = time.perf_counter() - started
        history.append(metrics)
        stop = patience_left <= 0 or epoch == train.epochs - 1
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()},
                          os.path.join(directory, "model.safetensors"))
                save_file({k: v.contiguous() for k, v in best_state.items()}, os.path.join(directory, "best.safetensors"))
                torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
                Path(directory, "state.json").write_text(json.dumps(
                    {"epoch": epoch, "best": best, "best_epoch": best_epoch, "history": history, "done": stop}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if stop:
            break


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def event_type_vocabulary(prepare: PrepareConfig) -> list[str]:
    return list(dict.fromkeys([*prepare.event_types, prepare.default_event_type]))


def build_vocabulary(sequences: pa.Table, prepare: PrepareConfig, parent: Artifact | None) -> Vocabulary:
    flat, _ = list_parts(sequences["item_ids"])
    if parent is not None:
        return parent.vocab.extend(flat)
    return Vocabulary.build(flat, event_type_vocabulary(prepare))


def train(storage: Storage, sequences: pa.Table, *, model_config: ModelConfig, train_config: TrainConfig,
          prepare_config: PrepareConfig, run_name: str, parent: Artifact | None = None,
          text_features_fn=None, ks: list[int] | None = None) -> TrainResult:
    """Train on ``sequences`` (leave-one-out split) and return the best-on-validation model."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_choices(train_config, "train")
    started = time.perf_counter()
    vocab = build_vocabulary(sequences, prepare_config, parent if train_config.warm_start else None)
    vocab.counts = item_counts(sequences, vocab)
    text_features = text_features_fn(vocab) if text_features_fn else None
    model = initial_model(vocab, model_config, parent if train_config.warm_start else None, text_features)
    datasets = make_datasets(sequences, vocab, model_config.max_len, train_config.num_workers,
                             windows=train_config.windows == "all")
    train_rows = datasets["train"].count()
    if train_rows == 0:
        raise ValueError("no user has enough history to train on (need at least 4 known items: 2 to learn from, "
                         "1 for validation, 1 for test)")
    loop = {
        "train": asdict(train_config), "model_config": model.config.to_dict(), "ks": ks or [10, 20],
        "initial_state": ray.put({k: v.contiguous() for k, v in model.state_dict().items()}),
        "train_rows": train_rows, "item_counts": vocab.counts.tolist(),
    }
    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=train_config.num_workers, use_gpu=train_config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage.path("runs"),
            storage_filesystem=storage.filesystem if storage.is_s3 else None,
            failure_config=FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    log.info("training %s model: %d rows, %d items, %d workers, up to %d epochs -> run %s",
             model_config.kind, train_rows, vocab.num_items, train_config.num_workers, train_config.epochs,
             storage.uri("runs", run_name))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        state = json.loads(Path(directory, "state.json").read_text())
        model.load_state_dict(load_file(os.path.join(directory, "best.safetensors")))
    if model.text_projection is not None and train_config.cold_items == "learned":
        sample = sequences.select(["item_ids", "event_types"])
        if sample.num_rows > PLACEMENT_USERS:                          # the fit needs examples, not everyone
            rng = np.random.default_rng(train_config.seed)
            sample = sample.take(np.sort(rng.choice(sample.num_rows, PLACEMENT_USERS, replace=False)))
        rows = EncodeSplit(vocab, model_config.max_len, holdout=2)(sample)
        fit = place_untrained_items(model, rows["items"], rows["event_types"], without_id_rows(model, vocab.counts),
                                    seed=train_config.seed)
        if fit["items"]:
            log.info("%d items with no training interaction placed from their text (%d examples, loss %.3f -> %.3f)",
                     fit["items"], fit["examples"], fit["loss_before"], fit["loss_after"])
    model.eval()
    history = state["history"]
    best_val = next((h for h in history if h["epoch"] == state["best_epoch"]), {})
    log.info("training done: best epoch %d, %s %.4f, %.1f s", state["best_epoch"], SELECTION_METRIC,
             best_val.get(SELECTION_METRIC, float("nan")), time.perf_counter() - started)
    return TrainResult(model=model, vocab=vocab, history=history, best_epoch=state["best_epoch"], best_val=best_val,
                       run_name=run_name, wall_s=time.perf_counter() - started)
