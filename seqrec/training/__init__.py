"""Stage 2: fine-tune the recommender with Ray Train (data-parallel) and Accelerate.

One module per concern:

* :mod:`~seqrec.training.datasets`: sequences -> the index rows the workers read;
* :mod:`~seqrec.training.warm_start`: the vocabulary and the model a night starts from;
* :mod:`~seqrec.training.cold_items`: items without interactions: out of the softmax, placed from text;
* :mod:`~seqrec.training.loop`: the per-worker loop;
* :mod:`~seqrec.training.checkpoints`: the checkpoint files a run reports;
* :mod:`~seqrec.training.driver`: :func:`train`, the stage itself.

Leave-one-out: a user's last item is the test target and the second-to-last the validation target;
training sees neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seqrec.training.driver import TrainResult, train

__all__ = ["TrainResult", "train"]


def __getattr__(name: str):
    """``train`` and ``TrainResult`` on first use: the Ray Data tasks of the input pipeline import
    :mod:`~seqrec.training.datasets` (numpy and pyarrow only), and importing the driver here would
    make every such process import torch and transformers first (about 5 s per process)."""
    if name in __all__:
        from seqrec.training import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
