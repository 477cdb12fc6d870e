"""The per-worker training loop (Ray Train + Accelerate, data-parallel).

Each worker trains on its shard of the training rows, evaluates its shard of the validation users
each epoch (sums all-reduced, so every rank sees the same numbers and stops at the same epoch), and
rank 0 reports a checkpoint holding the current state and the best-so-far weights. Model selection
uses validation only.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import ray
import torch

from seqrec.config import TrainConfig
from seqrec.evaluate import evaluate_batches, means
from seqrec.losses import contrastive, item_loss
from seqrec.model import SeqRecConfig, SeqRecModel, next_item_pairs
from seqrec.training.averaging import WeightAverage
from seqrec.training.checkpoints import Checkpoint, TrainingState, load_checkpoint, save_checkpoint
from seqrec.training.cold_items import never_trained
from seqrec.training.datasets import TRAIN_SHARD, VALIDATION_SHARD
from seqrec.training.worker import Prefetched, WorkerInputs, epoch_batches, per_worker_batch

log = logging.getLogger("seqrec.training")

SELECTION_METRIC = "val_ndcg@10"
VALIDATION_BATCH_ROWS = 512
# Devices where torch has a fused AdamW kernel: one pass over each parameter instead of a dozen
# element-wise ops. On CPU the item table dominates the parameters (100k items x 32: the nightly
# benchmark's model): the update fell from 6.1 to 1.5 ms and Adam's share of a worker's time, 18%
# in a py-spy profile of a 1M-user warm night, with it. The state dict is the same as the unfused
# one's, so checkpoints of either kind load in both.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
# Labelled positions per step in the contrastive term (TrainConfig.contrastive_weight), drawn at
# random from the batch's: a (2P x 2P) similarity matrix, 16 MB at 1,024.
CONTRASTIVE_POSITIONS = 1024


# --------------------------------------------------------------------------------------------
# Pieces of a step
# --------------------------------------------------------------------------------------------
def training_step_loss(
    model: torch.nn.Module,
    core: SeqRecModel,
    items: torch.Tensor,
    types: torch.Tensor,
    train_config: TrainConfig,
    log_q: torch.Tensor | None,
    out_of_softmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """items/types: (B, T+1) left-padded training rows.

    ``model`` is what the forward goes through (the DDP wrapper, so gradients are synchronised);
    ``core`` is the unwrapped model, for its config and item table. ``out_of_softmax``: (N+1,) bool,
    items that are never a softmax column (see :func:`seqrec.training.cold_items.never_trained`).
    """
    config = core.config
    if config.kind == "causal":
        inputs, input_types, labels = next_item_pairs(items, types)  # (B, T)
    else:
        inputs, input_types = items[:, 1:].clone(), types[:, 1:].clone()
        real = inputs != 0
        masked = (torch.rand(inputs.shape, device=inputs.device) < train_config.mask_prob) & real
        last_masked = torch.rand(len(inputs), device=inputs.device) < train_config.mask_prob
        masked[:, -1] |= real[:, -1] & last_masked
        labels = torch.where(masked, inputs, torch.zeros_like(inputs))
        inputs[masked] = config.mask_index
        input_types[masked] = 0
    keep_ids = None
    if config.text_dim and train_config.id_dropout > 0:
        keep_ids = (torch.rand(config.num_items + 2, device=items.device) >= train_config.id_dropout).float()
        keep_ids[-1] = 1.0  # [MASK] has no text to fall back on
    weight = train_config.contrastive_weight
    if weight > 0:  # both dropout draws in one forward: the batch twice
        both = model(
            torch.cat([inputs, inputs]), torch.cat([input_types, input_types]), keep_ids=keep_ids
        ).hidden
        hidden, second = both.split(len(inputs))
    else:
        hidden = model(inputs, input_types, keep_ids=keep_ids).hidden  # (B, T, width)
    picked = labels != 0
    table = core.item_table(keep_ids)[: config.num_items + 1]  # (N+1, width) without [MASK]
    loss = _item_losses(
        hidden, labels, picked, table, config.hidden_size, train_config, log_q, out_of_softmax
    )
    if weight > 0:
        where = picked.nonzero(as_tuple=True)
        if len(where[0]) > CONTRASTIVE_POSITIONS:
            keep = torch.randperm(len(where[0]), device=picked.device)[:CONTRASTIVE_POSITIONS]
            where = (where[0][keep], where[1][keep])
        loss = loss + weight * sum(
            contrastive(a, b, labels[where], train_config.contrastive_temperature)
            for a, b in zip(
                hidden[where].split(config.hidden_size, dim=-1),
                second[where].split(config.hidden_size, dim=-1),
            )
        )
    return loss


def _item_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    picked: torch.Tensor,
    table: torch.Tensor,
    width: int,
    train_config: TrainConfig,
    log_q: torch.Tensor | None,
    out_of_softmax: torch.Tensor | None,
) -> torch.Tensor:
    # Each ensemble member is trained on its own loss (its own slice of states and items), as a
    # separately trained model would be; a loss of the summed scores would train one wide model.
    return sum(
        item_loss(
            train_config.loss,
            states,
            labels[picked],
            member_items,
            log_q=log_q,
            num_negatives=train_config.num_negatives,
            gbce_t=train_config.gbce_t,
            excluded=out_of_softmax,
        )
        for states, member_items in zip(hidden[picked].split(width, dim=-1), table.split(width, dim=-1))
    )


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warmup, then constant or a cosine decay reaching 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX), where bf16 autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(train_config: TrainConfig) -> str:
    """``auto``: bf16 on CUDA and on CPUs with native bf16 matmuls, full fp32 otherwise."""
    if train_config.mixed_precision != "auto":
        return train_config.mixed_precision
    if train_config.use_gpu:
        return "bf16" if torch.cuda.is_available() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


# --------------------------------------------------------------------------------------------
# Across ranks
# --------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_sums(totals: dict[str, float]) -> dict[str, float]:
    """Each key summed over ranks (unchanged outside a process group)."""
    if not _distributed():
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
    if not _distributed():
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.isclose(low, high, rtol=1e-9, atol=1e-9))


# --------------------------------------------------------------------------------------------
# Progress and budgets
# --------------------------------------------------------------------------------------------
def log_to_stderr(logger_name: str = "seqrec") -> None:
    """Emit this process's ``seqrec`` INFO lines on stderr, which Ray forwards to the driver and the
    job's logs: a Ray worker configures no handler of its own, so they would be dropped."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # a root handler, where one exists, would print it twice


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(epoch: int, epochs: int, step: int, steps: int, rows_per_s: float, eta_s: float) -> str:
    return (
        f"epoch {epoch + 1}/{epochs} step {step}/{steps} {rows_per_s:,.0f} rows/s "
        f"epoch ETA {_duration(eta_s)}"
    )


class Progress:
    """Rank 0's progress line every ``every_s`` seconds (the other ranks stay quiet)."""

    def __init__(self, rank: int, world: int, every_s: float, epochs: int, steps_per_epoch: int):
        self.enabled = rank == 0
        self.world, self.every_s, self.epochs, self.steps_per_epoch = world, every_s, epochs, steps_per_epoch
        self.epoch, self.started, self.last = 0, time.perf_counter(), time.perf_counter()

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.started = epoch, time.perf_counter()
        self.last = self.started

    def step(self, step: int, rows: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        eta = (self.steps_per_epoch - step) * elapsed / max(step, 1)
        log.info(
            progress_line(
                self.epoch, self.epochs, step, self.steps_per_epoch, rows * self.world / elapsed, eta
            )
        )

    def validated(self, metrics: dict[str, Any], best: float, best_epoch: int) -> None:
        if self.enabled:
            log.info(
                "epoch %d/%d validated: train loss %.4f, %s %.4f (best %.4f at epoch %d), %.1f s",
                self.epoch + 1,
                self.epochs,
                metrics["train_loss"],
                SELECTION_METRIC,
                metrics[SELECTION_METRIC],
                best,
                best_epoch + 1,
                time.perf_counter() - self.started,
            )


class Budget:
    """``train.max_steps`` and ``train.max_minutes``; every rank reaches the same verdict at the same step
    (the time check is agreed over ranks), since a rank that stopped alone would hang the others."""

    def __init__(self, train_config: TrainConfig, steps_done: int):
        self.max_steps, self.max_s = train_config.max_steps, train_config.max_minutes * 60.0
        self.steps, self.started = steps_done, time.perf_counter()

    def spent(self) -> str:
        """After one more step: "" to go on, else which budget is used up."""
        self.steps += 1
        if self.max_steps and self.steps >= self.max_steps:
            return "max_steps"
        if self.max_s:
            over = torch.tensor([float(time.perf_counter() - self.started >= self.max_s)])
            if _distributed():
                torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
            if over.item():
                return "max_minutes"
        return ""


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _log_q(train_config: TrainConfig, item_counts: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """Log sampling probabilities of the sampled-softmax negatives (its log-q correction)."""
    if train_config.loss != "sampled":
        return None
    counts = torch.tensor(np.asarray(item_counts), dtype=torch.float64) + 1.0
    if train_config.negatives == "uniform":  # a constant log-q: the correction cancels
        counts = torch.ones_like(counts)
    counts[0] = 0.0
    return (counts / counts.sum()).log().float().to(device)


def _restore(model: SeqRecModel, optimizer: torch.optim.Optimizer, rank: int) -> Checkpoint | None:
    """The run's latest checkpoint, loaded into ``model`` and ``optimizer`` (after a fault)."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as directory:
        saved = load_checkpoint(directory)
    model.load_state_dict(saved.weights)
    optimizer.load_state_dict(saved.optimizer)
    log.info("rank %d resumed from epoch %d", rank, saved.state.epoch)
    return saved


def _weight_average(
    model: SeqRecModel, train_config: TrainConfig, saved: Checkpoint | None
) -> WeightAverage | None:
    if not train_config.weight_average:
        return None
    if saved is None:
        return WeightAverage(model, train_config.weight_average)
    return WeightAverage(
        model, train_config.weight_average, updates=saved.state.average_updates, average=saved.average
    )


def _train_epoch(
    model,
    core,
    optimizer,
    scheduler,
    accelerator,
    batches,
    train_config: TrainConfig,
    log_q,
    out_of_softmax,
    progress: Progress,
    budget: Budget,
    average: WeightAverage | None = None,
) -> tuple[dict[str, float], str]:
    """One pass over this rank's shard, or less when a budget runs out; returns its sums (loss,
    steps, rows) and the budget that stopped it ("" if none did)."""
    model.train()
    loss_sum, steps, rows_trained, spent = 0.0, 0, 0, ""
    device = accelerator.device
    for batch in batches:
        items, types = batch["items"].to(device), batch["event_types"].to(device)
        with accelerator.autocast():
            loss = training_step_loss(model, core, items, types, train_config, log_q, out_of_softmax)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update(core)
        loss_sum += loss.item()
        steps += 1
        rows_trained += len(batch["items"])
        progress.step(steps, rows_trained)
        spent = budget.spent()
        if spent:
            break
    return {"loss_sum": loss_sum, "steps": float(steps), "rows": float(rows_trained)}, spent


def _report(
    rank: int,
    metrics: dict[str, Any],
    state: TrainingState,
    core: SeqRecModel,
    best_weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None,
) -> None:
    """Every rank reports its metrics; only rank 0 attaches the checkpoint (Ray Train's rule)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(
            directory,
            state,
            weights=core.state_dict(),
            best_weights=best_weights,
            optimizer=optimizer.state_dict(),
            average=None if average is None else average.average,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _should_validate(epoch: int, train_config: TrainConfig, stopping: bool) -> bool:
    return (epoch + 1) % train_config.eval_every == 0 or epoch == train_config.epochs - 1 or stopping


def train_loop_per_worker(inputs: WorkerInputs, first_epoch: Prefetched | None = None) -> None:
    """The loop of :func:`seqrec.training.worker.train_worker`; ``first_epoch``: the first epoch's
    batches, already being read (None: each epoch's are asked for when it starts)."""
    from accelerate import Accelerator

    log_to_stderr()
    train_config = inputs.train_config
    if train_config.torch_threads:
        torch.set_num_threads(train_config.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train_config.seed + rank)
    mixed = resolve_mixed_precision(train_config)
    # cpu=True on CPU workers: without it Accelerate skipped gradient sync under Ray Train.
    accelerator = Accelerator(cpu=not train_config.use_gpu, mixed_precision=mixed)
    device = accelerator.device

    model = SeqRecModel(SeqRecConfig(**inputs.model_config))
    model.load_state_dict(ray.get(inputs.initial_state))
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_config.lr,
        weight_decay=train_config.weight_decay,
        betas=(0.9, 0.98),
        fused=device.type in FUSED_OPTIMIZER_DEVICES,
    )
    saved = _restore(model, optimizer, rank)
    average = _weight_average(model, train_config, saved)
    restored = None if saved is None else saved.state
    best_weights = saved.best_weights if saved else {k: v.clone() for k, v in model.state_dict().items()}
    state = restored or TrainingState(epoch=-1, best=-1.0, best_epoch=-1)
    start_epoch = state.epoch + 1
    if restored:
        state.restores.append(start_epoch)  # each restore is one recorded failure of the run

    steps_per_epoch = -(-inputs.train_rows // (per_worker_batch(train_config, world) * world))
    total_steps = train_config.epochs * steps_per_epoch
    if train_config.max_steps:
        total_steps = min(total_steps, train_config.max_steps)  # the schedule ends with the budget
    done_steps = state.steps or start_epoch * steps_per_epoch  # a restored run resumes its schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            done_steps + step, train_config.warmup_steps, total_steps, train_config.lr_schedule
        ),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    log_q = _log_q(train_config, inputs.item_counts, device)
    out_of_softmax = None
    if core.config.text_dim and train_config.loss == "ce":
        out_of_softmax = torch.from_numpy(never_trained(np.asarray(inputs.item_counts))).to(device)

    # A copy: the array arrives read-only from the object store, and torch warns on a read-only view.
    never_recommend = None if inputs.never_recommend is None else torch.tensor(inputs.never_recommend)
    train_shard = ray.train.get_dataset_shard(TRAIN_SHARD)
    val_shard = ray.train.get_dataset_shard(VALIDATION_SHARD)
    progress = Progress(rank, world, train_config.log_every_s, train_config.epochs, steps_per_epoch)
    budget = Budget(train_config, done_steps)
    patience_left = train_config.patience
    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        progress.start_epoch(epoch)
        if epoch == start_epoch and first_epoch is not None:
            batches = first_epoch
        else:
            batches = epoch_batches(train_shard, train_config, epoch, rank, world)
        sums, spent = _train_epoch(
            model,
            core,
            optimizer,
            scheduler,
            accelerator,
            batches,
            train_config,
            log_q,
            out_of_softmax,
            progress,
            budget,
            average,
        )
        train_s = time.perf_counter() - started
        sums = reduce_sums(sums)
        metrics = {
            "epoch": epoch,
            "train_loss": sums["loss_sum"] / max(sums["steps"], 1.0),
            "train_seq_per_s": sums["rows"] / max(train_s, 1e-9),
            "replicas_in_sync": replicas_in_sync(core),
        }
        if _should_validate(epoch, train_config, stopping=bool(spent)):
            val_batches = val_shard.iter_torch_batches(batch_size=VALIDATION_BATCH_ROWS, dtypes=torch.long)
            with nullcontext() if average is None else average.swapped_in(core):  # validate what is kept
                val_sums = evaluate_batches(
                    core,
                    val_batches,
                    inputs.ks,
                    device,
                    bf16=mixed == "bf16",
                    never_recommend=never_recommend,
                )
                metrics.update(means(reduce_sums(val_sums), "val_"))
                if metrics[SELECTION_METRIC] > state.best:
                    state.best, state.best_epoch = metrics[SELECTION_METRIC], epoch
                    patience_left = train_config.patience
                    best_weights = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
                else:
                    patience_left -= 1  # patience counts validations, all ranks alike
            progress.validated(metrics, state.best, state.best_epoch)
        metrics["epoch_s"] = time.perf_counter() - started
        state.epoch, state.steps = epoch, budget.steps
        state.average_updates = 0 if average is None else average.updates
        state.history.append(metrics)
        state.stopped = spent or (
            "patience" if patience_left <= 0 else "epochs" if epoch == train_config.epochs - 1 else ""
        )
        state.done = bool(state.stopped)
        _report(rank, metrics, state, core, best_weights, optimizer, average)
        if state.done:
            break
