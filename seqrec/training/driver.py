"""The training stage's driver: vocabulary, initial model, datasets, a ``TorchTrainer``, the best model.

The driver builds the vocabulary and the initial model (warm-started from the promoted artifact
when there is one: existing rows kept, new items appended), turns the night's sequences into Ray
datasets of index rows, runs :func:`seqrec.training.loop.train_loop_per_worker` on every worker,
and returns the best-on-validation weights of the run's last checkpoint.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray
import torch

from seqrec.artifact import Artifact
from seqrec.config import ModelConfig, PrepareConfig, TrainConfig, check_choices
from seqrec.data import Vocabulary
from seqrec.errors import InputError
from seqrec.model import SeqRecModel
from seqrec.storage import Storage
from seqrec.training.checkpoints import load_checkpoint
from seqrec.training.cold_items import PLACEMENT_USERS, place_untrained_items, without_id_rows
from seqrec.training.datasets import EncodeSplit, item_counts, make_datasets
from seqrec.training.loop import SELECTION_METRIC, WorkerInputs, train_loop_per_worker
from seqrec.training.warm_start import build_vocabulary, initial_model, same_architecture

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
    parent: str | None = None          # the version training really started from; None: from scratch
    restores: list[int] = field(default_factory=list)   # the epoch each restored attempt resumed at


def train(storage: Storage, sequences: pa.Table, *, model_config: ModelConfig, train_config: TrainConfig,
          prepare_config: PrepareConfig, run_name: str, parent: Artifact | None = None,
          text_features_fn: Callable[[Vocabulary], torch.Tensor] | None = None,
          ks: list[int] | None = None, runs_dir: str = "runs", callbacks: list | None = None) -> TrainResult:
    """Train on ``sequences`` (leave-one-out split) and return the best-on-validation model.

    ``parent`` (the promoted model) is warm-started from only when ``train_config.warm_start``.
    The run's state lives under ``runs_dir/run_name`` below the storage root (a run of that name
    that did not finish resumes from its latest checkpoint); ``callbacks`` are Ray Train
    ``UserCallback``s (``seqrec tune`` passes one that reports each epoch to its Tune trial).
    """
    check_choices(train_config, "train")
    started = time.perf_counter()
    parent = parent if train_config.warm_start else None
    vocab = build_vocabulary(sequences, prepare_config, parent)
    vocab.counts = item_counts(sequences, vocab)
    text_features = text_features_fn(vocab) if text_features_fn else None
    model = initial_model(vocab, model_config, parent, text_features)
    warm_from = parent.version if parent is not None and same_architecture(parent.model, model) else None
    datasets = make_datasets(sequences, vocab, model_config.max_len, train_config.num_workers,
                             windows=train_config.windows == "all")
    train_rows = datasets["train"].count()
    if train_rows == 0:
        raise InputError("no user has enough history to train on (need at least 4 known items: 2 to learn "
                         "from, 1 for validation, 1 for test)")
    inputs = WorkerInputs(
        train_config=train_config, model_config=model.config.to_dict(), ks=ks or [10, 20],
        initial_state=ray.put({k: v.contiguous() for k, v in model.state_dict().items()}),
        train_rows=train_rows, item_counts=vocab.counts)
    log.info("training %s model: %d rows, %d items, %d workers, up to %d epochs -> run %s",
             model_config.kind, train_rows, vocab.num_items, train_config.num_workers, train_config.epochs,
             storage.uri(runs_dir, run_name))
    state = _fit(storage, runs_dir, run_name, train_config, inputs, datasets, model, callbacks)
    if model.text_projection is not None and train_config.cold_items == "learned":
        _place_cold_items(model, vocab, sequences, model_config, train_config)
    model.eval()
    best_val = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    log.info("training done: best epoch %d, %s %.4f, %.1f s", state.best_epoch, SELECTION_METRIC,
             best_val.get(SELECTION_METRIC, float("nan")), time.perf_counter() - started)
    return TrainResult(model=model, vocab=vocab, history=state.history, best_epoch=state.best_epoch,
                       best_val=best_val, run_name=run_name, wall_s=time.perf_counter() - started,
                       parent=warm_from, restores=state.restores)


def _fit(storage: Storage, runs_dir: str, run_name: str, train_config: TrainConfig, inputs: WorkerInputs,
         datasets: dict[str, ray.data.Dataset], model: SeqRecModel, callbacks: list | None):
    """Run the workers; load the best weights of the run's last checkpoint into ``model``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, inputs),
        scaling_config=ScalingConfig(num_workers=train_config.num_workers, use_gpu=train_config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage.path(runs_dir), callbacks=callbacks,
            storage_filesystem=storage.filesystem if storage.is_s3 else None,
            failure_config=FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker group, "Reporting training result N") stay in its log
            # files; seqrec's worker logs go through the root logger and are not affected.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        saved = load_checkpoint(directory, resume=False)
    model.load_state_dict(saved.best_weights)
    return saved.state


def _place_cold_items(model: SeqRecModel, vocab: Vocabulary, sequences: pa.Table, model_config: ModelConfig,
                      train_config: TrainConfig) -> None:
    """Fit rows for the items without any from their text, on a sample of users' training rows."""
    sample = sequences.select(["item_ids", "event_types"])
    if sample.num_rows > PLACEMENT_USERS:                          # the fit needs examples, not everyone
        rng = np.random.default_rng(train_config.seed)
        sample = sample.take(np.sort(rng.choice(sample.num_rows, PLACEMENT_USERS, replace=False)))
    rows = EncodeSplit(vocab, model_config.max_len, holdout=2)(sample)
    fit = place_untrained_items(model, rows["items"], rows["event_types"],
                                without_id_rows(model, vocab.counts), seed=train_config.seed)
    if fit["items"]:
        log.info("%d items with no training interaction placed from their text (%d examples, "
                 "loss %.3f -> %.3f)", fit["items"], fit["examples"], fit["loss_before"], fit["loss_after"])
