"""An exponential moving average of the weights (``TrainConfig.weight_average``).

Validation, model selection and the returned weights use the average instead of the last step's
weights: the average of the recent steps sits nearer the middle of the basin the optimizer is
circling, which on sparse data moves validation less from epoch to epoch. One model, the same
inference cost; training pays one fused ``lerp`` over the parameters per step.

The decay warms up as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates (as TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``), so the first epochs are not dominated by the
initial weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(
        self,
        model: torch.nn.Module,
        decay: float,
        updates: int = 0,
        average: dict[str, torch.Tensor] | None = None,
    ):
        """``average``/``updates``: a restored average and its update count (None: start from ``model``)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.weight_average must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, updates
        self.average = {k: v.detach().clone().float() for k, v in (average or model.state_dict()).items()}
        # The model's floating tensors, looked up once: the optimizer and load_state_dict update
        # them in place, so each step lerps towards their current values.
        floating = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
        self._averages = [self.average[k] for k in floating]
        self._sources = list(floating.values())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step towards ``model``'s weights (the model the average was made for)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = [v if v.dtype == torch.float32 else v.float() for v in self._sources]
        torch._foreach_lerp_(self._averages, current, 1.0 - decay)
        self.updates += 1

    def state_dict(self, like: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights in ``like``'s dtypes (integer buffers as they are now)."""
        current = like.state_dict()
        return {
            k: self.average[k].to(v.dtype) if v.is_floating_point() else v.clone() for k, v in current.items()
        }

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block, its own again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state_dict(model))
        try:
            yield
        finally:
            model.load_state_dict(own)
