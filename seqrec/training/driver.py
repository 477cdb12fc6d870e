"""The training stage's driver: vocabulary, initial model, datasets, a ``TorchTrainer``, the best model.

The driver builds the vocabulary and the initial model (warm-started from the promoted artifact
when there is one: existing rows kept, new items appended), turns the night's sequences into Ray
datasets of index rows, runs :func:`seqrec.training.worker.train_worker` on every worker,
and returns the best-on-validation weights of the run's last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
import torch

from seqrec.artifact import Artifact
from seqrec.catalogue import unavailable_items
from seqrec.config import ModelConfig, PrepareConfig, TrainConfig, check_choices
from seqrec.data import SEQUENCE_COLUMNS, Vocabulary, sample_fraction
from seqrec.errors import InputError
from seqrec.model import SeqRecModel
from seqrec.storage import Storage
from seqrec.training.checkpoints import load_checkpoint
from seqrec.training.cold_items import PLACEMENT_USERS, place_untrained_items, without_id_rows
from seqrec.training.datasets import (
    EncodeSplit,
    UserSelection,
    make_datasets,
    placement_sample,
    read_sequences_dataset,
    sequence_stats,
    table_dataset,
)
from seqrec.training.loop import SELECTION_METRIC
from seqrec.training.warm_start import build_vocabulary, initial_model, same_architecture, training_date
from seqrec.training.worker import WorkerInputs, train_worker

log = logging.getLogger("seqrec.training")


@dataclass
class TrainResult:
    model: SeqRecModel
    vocab: Vocabulary
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)
    run_name: str = ""
    wall_s: float = 0.0
    parent: str | None = None  # the version training really started from; None: from scratch
    restores: list[int] = field(default_factory=list)  # the epoch each restored attempt resumed at
    users: int = 0  # users trained on
    rows: int = 0  # their training rows
    changed_users: int = 0  # of them: with events since the parent's training data (or all)
    replayed_users: int = 0  # of them: replayed (warm-start nights)
    selection: str = ""  # which users were trained on, and why
    stop_reason: str = ""  # epochs | patience | max_steps | max_minutes

    def summary(self) -> dict[str, Any]:
        """What the report says about training."""
        return {
            "users": self.users,
            "rows": self.rows,
            "changed_users": self.changed_users,
            "replayed_users": self.replayed_users,
            "selection": self.selection,
            "stop_reason": self.stop_reason,
            "best_epoch": self.best_epoch,
            "epochs": len(self.history),
            "wall_s": round(self.wall_s, 2),
        }


def train(
    storage: Storage,
    sequences: pa.Table | str,
    *,
    model_config: ModelConfig,
    train_config: TrainConfig,
    prepare_config: PrepareConfig,
    run_name: str,
    parent: Artifact | None = None,
    text_features_fn: Callable[[Vocabulary], torch.Tensor] | None = None,
    ks: list[int] | None = None,
    validation_users: int = 0,
    min_validation_users: int = 0,
    runs_dir: str = "runs",
    callbacks: list | None = None,
) -> TrainResult:
    """Train on ``sequences`` (leave-one-out split) and return the best-on-validation model.

    ``sequences``: the date of the ``sequences/dt=DATE`` partition, read from storage with Ray Data
    (the stage), or a table already in memory (tests, benchmarks). ``parent`` (the promoted model)
    is warm-started from only when ``train_config.warm_start``; then, reading from storage, only the
    users with new events plus a replay sample are trained on (see :func:`plan_users`).
    The run's state lives under ``runs_dir/run_name`` below the storage root (a run of that name
    that did not finish resumes from its latest checkpoint); ``validation_users`` (0: all) bounds the
    per-epoch validation to the hash sample of about that many users (the night passes the gate's
    :func:`seqrec.evaluate.gate_sample_size`; a warm night validates the sample's users it trains on,
    or the whole sample where fewer than ``min_validation_users`` of them are trained on);
    ``callbacks`` are Ray Train ``UserCallback``s (``seqrec tune`` passes one that reports each
    epoch to its Tune trial).
    """
    check_choices(train_config, "train")
    started = time.perf_counter()
    parent = parent if train_config.warm_start else None
    date = sequences if isinstance(sequences, str) else None
    selection, why = plan_users(parent, train_config, date)
    source = _source(storage, sequences, with_ts=selection is not None)
    row_width = model_config.max_len + 1
    windows = train_config.windows == "all"
    stats = sequence_stats(source, row_width, windows, selection)
    if selection is not None:
        threshold, stats = stats.replay_cut(train_config.replay_ratio)
        selection = dataclasses.replace(selection, replay_below=threshold)
    vocab = build_vocabulary(stats.item_ids, prepare_config, parent)
    vocab.counts = stats.counts_by_index(vocab)
    text_features = text_features_fn(vocab) if text_features_fn else None
    model = initial_model(vocab, model_config, parent, text_features)
    warm_from = parent.version if parent is not None and same_architecture(parent.model, model) else None
    if selection is not None and not same_architecture(parent.model, model):
        selection, why = None, "all users: the promoted model has another architecture"
        stats = sequence_stats(source, row_width, windows)
    if stats.rows == 0:
        raise InputError(
            "no user has enough history to train on (need at least 4 known items: 2 to learn "
            "from, 1 for validation, 1 for test)"
        )
    validation_fraction = sample_fraction(validation_users, stats.users)
    users = stats.changed_users + stats.replayed_users
    # A warm night validates on the sample's users it trains on, unless they are too few to stop on:
    # on MovieLens-100K's 174 to 347 such users, patience stopped on noise after 7 to 12 epochs
    # (benchmarks/README.md, "What replay is worth"). Then the whole sample validates, as the gate
    # judges it, which also shows forgetting of the users without news while training.
    validate_selected = selection is None or users * validation_fraction >= min_validation_users
    datasets = make_datasets(
        source,
        vocab,
        model_config.max_len,
        stats.longest,
        windows=windows,
        selection=selection,
        validation_fraction=validation_fraction,
        validate_selected=validate_selected,
    )
    inputs = WorkerInputs(
        train_config=train_config,
        model_config=model.config.to_dict(),
        ks=ks or [10, 20],
        initial_state=ray.put({k: v.contiguous() for k, v in model.state_dict().items()}),
        train_rows=stats.rows,
        item_counts=vocab.counts,
        never_recommend=unavailable_items(storage, vocab),  # validation ranks what the table may show
    )
    if selection is not None:
        why = f"{why}: {stats.changed_users} with new events + {stats.replayed_users} replayed"
    log.info(
        "training %s model on %d of %d users (%s): %d rows, %d items, validation on %s, %d workers, "
        "up to %d epochs -> run %s",
        model_config.kind,
        users,
        stats.users,
        why,
        stats.rows,
        vocab.num_items,
        ("all of them" if validation_fraction >= 1 else f"a {validation_fraction:.3g} hash sample of them")
        + ("" if validate_selected else " and of the users not trained on (too few trained on to validate)"),
        train_config.num_workers,
        train_config.epochs,
        storage.uri(runs_dir, run_name),
    )
    state = _fit(storage, runs_dir, run_name, train_config, inputs, datasets, model, callbacks)
    if model.text_projection is not None and train_config.cold_items == "learned":
        sample = placement_sample(source, stats.users, PLACEMENT_USERS, train_config.seed)
        _place_cold_items(model, vocab, sample, model_config, train_config)
    model.eval()
    best_val = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    log.info(
        "training done (%s): best epoch %d of %d, %s %.4f, %.1f s",
        state.stopped,
        state.best_epoch + 1,  # 1-based, as the workers' epoch lines count
        len(state.history),
        SELECTION_METRIC,
        best_val.get(SELECTION_METRIC, float("nan")),
        time.perf_counter() - started,
    )
    return TrainResult(
        model=model,
        vocab=vocab,
        history=state.history,
        best_epoch=state.best_epoch,
        best_val=best_val,
        run_name=run_name,
        wall_s=time.perf_counter() - started,
        parent=warm_from,
        restores=state.restores,
        users=users,
        rows=stats.rows,
        changed_users=stats.changed_users,
        replayed_users=stats.replayed_users,
        selection=why,
        stop_reason=state.stopped,
    )


def plan_users(
    parent: Artifact | None, train_config: TrainConfig, date: str | None
) -> tuple[UserSelection | None, str]:
    """Which users tonight trains on (None: all), and the reason in words.

    A warm start fine-tunes on the users with events after the parent's training night plus a
    replay sample; a cold night, a rerun of the parent's own night or ``warm_start_users=all``
    trains on everyone.
    """
    if parent is None:
        return None, "all users: no model to warm-start from"
    if train_config.warm_start_users == "all":
        return None, "all users: train.warm_start_users=all"
    if date is None:
        return None, "all users: sequences given in memory"
    since = training_date(parent)
    if since is None:
        return None, f"all users: the training night of {parent.version} is unknown"
    if since >= date:
        return None, f"all users: {parent.version} was trained on the sequences of {since}"
    start = dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
    selection = UserSelection(since=start, replay_ratio=train_config.replay_ratio, salt=date)
    return selection, (
        f"warm start: users with events since {start.date()} + a replay sample of the others, "
        f"{train_config.replay_ratio:g} per such user"
    )


def _source(storage: Storage, sequences: pa.Table | str, with_ts: bool) -> ray.data.Dataset:
    columns = [*SEQUENCE_COLUMNS, "ts"] if with_ts else SEQUENCE_COLUMNS
    if isinstance(sequences, str):
        return read_sequences_dataset(storage, sequences, columns)
    return table_dataset(sequences, columns)


# Each batch's loss has its own number of labelled positions, and on CPU oneDNN caches a primitive
# per matmul shape (1024 by default): a training worker grew by about 1.5 GiB over an epoch. 64
# entries still hold the fixed-shape layers' primitives (benchmarks/onednn_cache.py, interleaved:
# 400 steps at 1024 / 64 / 8 entries: 10.6-10.7 / 10.5-10.8 / 9.0-9.3 steps/s, RSS +0.86-1.01 /
# +0.30-0.34 / +0.35-0.38 GiB).
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "64"


def worker_env_vars() -> dict[str, str]:
    """Environment of the training workers on top of the job's (a value the job sets is kept)."""
    return {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get(
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY
        )
    }


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), so a
# finished run waited up to that long to be noticed: 4.1 s from the last epoch to the result on the
# demo night, 1.5 s at 0.25 s. Ray Train passes this variable from the driver to its controller.
CONTROLLER_POLL_S = "0.5"


@contextlib.contextmanager
def controller_poll_interval():
    """Set the controller's poll interval for the run (a value the job sets is kept)."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = CONTROLLER_POLL_S
    try:
        yield
    finally:
        os.environ.pop(key, None)


@contextlib.contextmanager
def sigint_handler_kept():
    """Put the process's Ctrl-C handler back after the block.

    ``TorchTrainer.fit`` installs a SIGINT handler that aborts its run and holds the run's controller
    actor, and with it the run's dataset actors, for as long as the handler is installed: in a night
    they would stay alive through evaluation and scoring (about 1.5 GiB at 100k users), and a
    Ctrl-C during scoring would be sent to a finished run.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def _fit(
    storage: Storage,
    runs_dir: str,
    run_name: str,
    train_config: TrainConfig,
    inputs: WorkerInputs,
    datasets: dict[str, ray.data.Dataset],
    model: SeqRecModel,
    callbacks: list | None,
):
    """Run the workers; load the best weights of the run's last checkpoint into ``model``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        functools.partial(train_worker, inputs),
        scaling_config=ScalingConfig(
            num_workers=train_config.num_workers, use_gpu=train_config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path(runs_dir),
            callbacks=callbacks,
            storage_filesystem=storage.filesystem if storage.is_s3 else None,
            failure_config=FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker group, "Reporting training result N") stay in its log
            # files; seqrec's worker logs go through the root logger and are not affected.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": worker_env_vars()},
        ),
        datasets=datasets,
    )
    with sigint_handler_kept(), controller_poll_interval():
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        saved = load_checkpoint(directory, resume=False)
    model.load_state_dict(saved.best_weights)
    return saved.state


def _place_cold_items(
    model: SeqRecModel,
    vocab: Vocabulary,
    sample: pa.Table,
    model_config: ModelConfig,
    train_config: TrainConfig,
) -> None:
    """Fit rows for the items without any from their text, on a sample of users' training rows."""
    rows = EncodeSplit(vocab, model_config.max_len, holdout=2)(sample)
    fit = place_untrained_items(
        model,
        rows["items"],
        rows["event_types"],
        without_id_rows(model, vocab.counts),
        seed=train_config.seed,
    )
    if fit["items"]:
        log.info(
            "%d items with no training interaction placed from their text (%d examples, loss %.3f -> %.3f)",
            fit["items"],
            fit["examples"],
            fit["loss_before"],
            fit["loss_after"],
        )
