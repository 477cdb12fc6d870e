"""Ray Train's train function: what a worker unpickles, kept free of the model code.

Unpickling a train function imports the module it lives in. The loop (:mod:`seqrec.training.loop`)
imports the model and with it ``transformers``: about 3.4 s in every worker process on this 2-core
machine, during which the workers' input pipeline had not started yet (the first batch then took
another 3.6 s on the demo night, and 15 s at 1M users on an AVX2-only host). :func:`train_worker`
lives here, without torch or the model: it asks for the first epoch's first batch on a thread, which
starts the pipeline, and imports the loop while those rows are read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from seqrec.config import TrainConfig
from seqrec.training.datasets import TRAIN_SHARD


@dataclass
class WorkerInputs:
    """Everything a worker needs, built once by the driver (:func:`seqrec.training.driver.train`)."""

    train_config: TrainConfig
    model_config: dict[str, Any]  # SeqRecConfig.to_dict() of the initial model
    initial_state: Any  # ray.ObjectRef of its weights: put once, read by every rank
    train_rows: int  # training rows over all workers (sets the schedule)
    item_counts: np.ndarray  # (N+1,) training interactions per index
    ks: list[int] = field(default_factory=lambda: [10, 20])
    never_recommend: np.ndarray | None = None  # (N+1,) bool: masked in validation as the gate masks


def per_worker_batch(train_config: TrainConfig, world: int) -> int:
    return max(1, train_config.batch_size // world)


def epoch_batches(shard, train_config: TrainConfig, epoch: int, rank: int, world: int) -> Iterator[dict]:
    """One epoch of this rank's training batches (int64 tensors on the CPU, locally shuffled)."""
    import torch  # already imported by Ray Train's torch backend in a worker

    batch = per_worker_batch(train_config, world)
    return iter(
        shard.iter_torch_batches(
            batch_size=batch,
            dtypes=torch.long,
            local_shuffle_buffer_size=batch * 4,
            local_shuffle_seed=train_config.seed + epoch * 131 + rank,
        )
    )


class Prefetched:
    """An epoch's batches whose first one is fetched on a thread from the moment this is made."""

    def __init__(self, batches: Iterator[dict]):
        self._batches, self._first, self._error = batches, None, None
        self._thread = threading.Thread(target=self._fetch, name="seqrec-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = [next(self._batches)]
        except StopIteration:
            self._first = []
        except BaseException as error:  # re-raised in the training thread
            self._error = error

    def __iter__(self) -> Iterator[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._batches


def train_worker(inputs: WorkerInputs) -> None:
    """The function every Ray Train worker runs (see the module docstring)."""
    context = ray.train.get_context()
    first_epoch = None
    if ray.train.get_checkpoint() is None:  # a restored run starts at its checkpoint's epoch
        shard = ray.train.get_dataset_shard(TRAIN_SHARD)
        batches = epoch_batches(
            shard, inputs.train_config, 0, context.get_world_rank(), context.get_world_size()
        )
        first_epoch = Prefetched(batches)
    from seqrec.training.loop import train_loop_per_worker

    train_loop_per_worker(inputs, first_epoch)
