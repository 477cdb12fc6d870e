"""One path to a candidate model: train -> save -> evaluate -> metrics.

Both ``seqrec train`` and the nightly job call :func:`train_candidate`, so a candidate is made the
same way whichever started it, with one warm-start rule: fine-tune from the promoted model when
there is one and ``train.warm_start`` is set. The candidate is saved before it is evaluated: the
evaluation actor pool (:func:`seqrec.evaluate.evaluate_models`) loads it from its artifact, and
judges the live model in the same pass; ``metrics.json`` is completed afterwards.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from seqrec import artifact as artifacts
from seqrec.config import Config
from seqrec.evaluate import Judged, evaluate_models, gate_sample_size, night_users, rankings_per_user
from seqrec.runtime import timed
from seqrec.storage import Storage
from seqrec.training import TrainResult, train

log = logging.getLogger("seqrec.candidate")


@dataclass
class Candidate:
    version: str
    result: TrainResult
    metrics: dict[str, Any]  # the candidate's evaluation (val and test)
    live_version: str | None  # the promoted model when the candidate was made
    live: artifacts.Artifact | None  # loaded when warm-started from
    live_metrics: dict[str, Any] | None  # the live model's validation metrics, when compared
    parent: str | None  # the model it was warm-started from
    location: str  # where the artifact was saved


def text_features_for(config: Config, storage: Storage):
    """The item-text feature function for training, or None when the model is id-only."""
    if not config.model.text_encoder:
        return None
    from seqrec.text import item_text_features

    return lambda vocab: item_text_features(storage, vocab, config.model.text_encoder)


def candidate_artifact(
    storage: Storage,
    date: str,
    config: Config,
    result: TrainResult,
    version: str,
    parent: str | None,
    metrics: dict[str, Any],
) -> artifacts.Artifact:
    """The trained candidate with its metrics and manifest (data snapshot, parent, code, config)."""
    return artifacts.Artifact(
        version=version,
        model=result.model,
        vocab=result.vocab,
        metrics={
            **metrics,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "training": result.summary(),
        },
        manifest={
            "training_data": storage.uri("sequences", f"dt={date}"),
            "training_date": date,
            "parent": parent,
            "code_version": artifacts.code_version(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "config": config.to_dict(),
            "train_run": storage.uri("runs", result.run_name),
        },
    )


def train_candidate(
    storage: Storage,
    date: str,
    config: Config,
    *,
    compare_with_live: bool = False,
    timings: dict[str, float] | None = None,
) -> Candidate:
    """Train a candidate on ``sequences/dt=date`` (read from storage on the cluster), evaluate it
    and save it under ``models/``.

    ``compare_with_live`` also evaluates the promoted model on the same validation targets (the
    promotion gate's input). ``timings`` collects the ``train`` and ``evaluate`` wall seconds.
    """
    timings = {} if timings is None else timings
    live_version = artifacts.promoted_version(storage)
    live = artifacts.load(storage, live_version) if live_version and config.train.warm_start else None
    version = artifacts.new_version(date)
    judged = [Judged("candidate", version)]
    if compare_with_live and live_version:
        judged.append(Judged("live", live_version, splits=("val",)))
    # Training validates on the gate's hash sample (on a warm night, on the users of it it trains
    # on, unless fewer than eval.min_users), so it chooses its checkpoint on users the gate judges.
    users = night_users(storage, date)
    validation_users = gate_sample_size(config.eval, users, rankings_per_user(judged))
    with timed(timings, "train"):
        # From storage (Ray Data), not from the table evaluation reads: see seqrec.training.datasets.
        result = train(
            storage,
            date,
            model_config=config.model,
            train_config=config.train,
            prepare_config=config.prepare,
            run_name=f"train-{version}",
            parent=live,
            text_features_fn=text_features_for(config, storage),
            ks=config.eval.ks,
            validation_users=validation_users,
            min_validation_users=config.eval.min_users,
        )
    parent_version = result.parent  # None when training fell back to scratch (another architecture)
    artifact = candidate_artifact(storage, date, config, result, version, parent_version, {})
    location = artifacts.save(storage, artifact)
    with timed(timings, "evaluate"):
        evaluation = evaluate_models(storage, date, judged, config.eval, config.score, users)
    metrics, live_metrics = evaluation["candidate"], evaluation.get("live")
    artifacts.write_metrics(
        storage,
        version,
        {**artifact.metrics, **metrics, "live_val": live_metrics["val"] if live_metrics else None},
    )
    return Candidate(
        version=version,
        result=result,
        metrics=metrics,
        live_version=live_version,
        live=live,
        live_metrics=live_metrics,
        parent=parent_version,
        location=location,
    )
