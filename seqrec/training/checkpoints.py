"""The checkpoint a training run reports each epoch: the one place that knows its file names.

A checkpoint holds the current weights and optimizer (to resume after a fault), the weight
average when the run keeps one, the best-so-far weights on validation (what the run returns) and
a small JSON state. Weights are safetensors; the optimizer state is a torch file read with
``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
AVERAGE_FILE = "average.safetensors"
STATE_FILE = "state.json"


@dataclass
class TrainingState:
    epoch: int  # the last finished epoch
    best: float  # its selection metric's best value so far
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    done: bool = False  # the run stopped after this epoch
    restores: list[int] = field(default_factory=list)  # the epoch each restored attempt resumed at
    stopped: str = ""  # why: epochs | patience | max_steps | max_minutes
    steps: int = 0  # optimizer steps taken so far (the step budget counts them)
    average_updates: int = 0  # updates of the weight average so far (its decay warms up over them)


@dataclass
class Checkpoint:
    state: TrainingState
    best_weights: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] | None = None  # None when read without the resume part
    optimizer: dict[str, Any] | None = None
    average: dict[str, torch.Tensor] | None = None  # the weight average, when the run keeps one


def save_checkpoint(
    directory: str | Path,
    state: TrainingState,
    *,
    weights: dict[str, torch.Tensor],
    best_weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    average: dict[str, torch.Tensor] | None = None,
) -> None:
    directory = Path(directory)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / MODEL_FILE))
    if average is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in average.items()}, str(directory / AVERAGE_FILE)
        )
    save_file({k: v.detach().cpu().contiguous() for k, v in best_weights.items()}, str(directory / BEST_FILE))
    torch.save(optimizer, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))


def load_checkpoint(directory: str | Path, *, resume: bool = True) -> Checkpoint:
    """The checkpoint in ``directory``; ``resume=False`` reads only the state and the best weights."""
    directory = Path(directory)
    state = TrainingState(**json.loads((directory / STATE_FILE).read_text()))
    best_weights = load_file(str(directory / BEST_FILE))
    if not resume:
        return Checkpoint(state=state, best_weights=best_weights)
    return Checkpoint(
        state=state,
        best_weights=best_weights,
        weights=load_file(str(directory / MODEL_FILE)),
        optimizer=torch.load(directory / OPTIMIZER_FILE, weights_only=True),
        average=load_file(str(directory / AVERAGE_FILE)) if (directory / AVERAGE_FILE).exists() else None,
    )
