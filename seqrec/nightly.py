"""The nightly job: prepare -> train -> evaluate -> promote -> score -> publish -> report.

The candidate is always saved under ``models/<version>/``; it becomes the live model only when its
validation NDCG@10 on tonight's data is not worse than the promoted model's (measured on the same
data, same protocol) by more than ``eval.promote_tolerance``. Otherwise tonight is scored with the
promoted model and the report says why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from seqrec import artifact as artifacts
from seqrec.config import Config
from seqrec.evaluate import evaluate, not_worse, summary_table
from seqrec.prepare import PrepareReport, prepare, read_sequences
from seqrec.report import write_report
from seqrec.score import ScoreReport, score
from seqrec.storage import Storage
from seqrec.training import train

log = logging.getLogger("seqrec.nightly")


@dataclass
class NightlyResult:
    date: str
    candidate: str
    live_model: str
    promoted: bool
    decision: str
    prepare: PrepareReport
    metrics: dict[str, Any]
    recommendations: ScoreReport
    report: str
    timings_s: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str):
    started = time.perf_counter()
    log.info("== %s ==", stage)
    yield
    timings[stage] = round(time.perf_counter() - started, 2)


def text_features_for(config: Config, storage: Storage):
    """The item-text feature function for training, or None when the model is id-only."""
    if not config.model.text_encoder:
        return None
    from seqrec.text import item_text_features

    return lambda vocab: item_text_features(storage, vocab, config.model.text_encoder)


def train_candidate(storage: Storage, date: str, config: Config, sequences, parent, version: str):
    result = train(storage, sequences, model_config=config.model, train_config=config.train,
                   prepare_config=config.prepare, run_name=f"train-{version}", parent=parent,
                   text_features_fn=text_features_for(config, storage), ks=config.eval.ks)
    return result


def candidate_artifact(storage: Storage, date: str, config: Config, result, version: str, parent: str | None,
                       metrics: dict[str, Any]) -> artifacts.Artifact:
    """The trained candidate with its metrics and manifest (data snapshot, parent, code, config)."""
    return artifacts.Artifact(
        version=version, model=result.model, vocab=result.vocab,
        metrics={**metrics, "best_epoch": result.best_epoch, "history": result.history},
        manifest={"training_data": storage.uri("sequences", f"dt={date}"), "parent": parent,
                  "code_version": artifacts.code_version(), "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "config": config.to_dict(), "train_run": storage.uri("runs", result.run_name)},
    )


def run_nightly(storage: Storage, date: str, config: Config) -> NightlyResult:
    timings: dict[str, float] = {}
    started_at = dt.datetime.now(dt.timezone.utc)
    with _timed(timings, "prepare"):
        prepared = prepare(storage, date, config.prepare)
        sequences = read_sequences(storage, date, columns=["user_id", "item_ids", "event_types"])

    parent_version = artifacts.promoted_version(storage)
    parent = artifacts.load(storage, parent_version) if parent_version else None
    version = artifacts.new_version(date)
    with _timed(timings, "train"):
        result = train_candidate(storage, date, config, sequences, parent, version)

    with _timed(timings, "evaluate"):
        candidate_metrics = evaluate(result.model, result.vocab, sequences, config.eval)
        live_metrics = evaluate(parent.model, parent.vocab, sequences, config.eval, splits=("val",)) if parent else None
    candidate_ndcg = candidate_metrics["val"]["model"]["ndcg@10"]
    live_ndcg = live_metrics["val"]["model"]["ndcg@10"] if live_metrics else None
    promoted = not_worse(candidate_ndcg, live_ndcg, config.eval.promote_tolerance)
    if live_ndcg is None:
        decision = f"promoted: first model (val NDCG@10 {candidate_ndcg:.4f})"
    elif promoted:
        decision = f"promoted: val NDCG@10 {candidate_ndcg:.4f} vs live {live_ndcg:.4f} (tolerance {config.eval.promote_tolerance})"
    else:
        decision = (f"kept {parent_version}: candidate val NDCG@10 {candidate_ndcg:.4f} is worse than live "
                    f"{live_ndcg:.4f} by more than the tolerance {config.eval.promote_tolerance}")
    log.info("%s\n%s", summary_table(candidate_metrics, "val"), summary_table(candidate_metrics, "test"))
    log.info(decision)

    candidate = candidate_artifact(storage, date, config, result, version,
                                   parent_version if parent and config.train.warm_start else None,
                                   {**candidate_metrics, "live_val": live_metrics["val"] if live_metrics else None})
    artifacts.save(storage, candidate)
    if promoted:
        artifacts.promote(storage, version, decision, {"val_ndcg@10": candidate_ndcg})
    live = version if promoted else parent_version

    with _timed(timings, "score"):
        scored = score(storage, date, live, config.score)

    report = {
        "date": date, "started_at": started_at.isoformat(), "candidate": version, "live_model": live,
        "promoted": promoted, "decision": decision, "counts": prepared.as_dict(), "timings_s": timings,
        "val_ndcg@10": {"candidate": candidate_ndcg, "live": live_ndcg,
                        "popularity": candidate_metrics["val"]["popularity"]["ndcg@10"]},
        "candidate_metrics": candidate_metrics, "live_metrics": live_metrics,
        "recommendations": asdict(scored), "config": config.to_dict(),
    }
    location = write_report(storage, report, result.history)
    return NightlyResult(date=date, candidate=version, live_model=live, promoted=promoted, decision=decision,
                         prepare=prepared, metrics=candidate_metrics, recommendations=scored, report=location,
                         timings_s=timings)
