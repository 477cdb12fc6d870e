"""The nightly job: prepare -> train -> evaluate -> score -> publish -> promote -> report.

The candidate is always saved under ``models/<version>/``; it becomes the live model only when its
validation NDCG@10 on tonight's data is not worse than the promoted model's (measured on the same
users, same protocol, in one pass of the evaluation actor pool over a hash sample of
at most ``eval.max_users`` users, with standard errors) by more than ``eval.promote_tolerance``.
Otherwise tonight is scored with the promoted model and the report says why.
Promotion is the night's last step, after the table is published: a night that fails before then
leaves the live model, ``PROMOTED.json`` and every published table as they were, and its report
says which stage failed.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from seqrec import artifact as artifacts
from seqrec.candidate import Candidate, train_candidate
from seqrec.config import Config, DataShape, apply_overrides, suggested
from seqrec.evaluate import not_worse, summary_table
from seqrec.lease import hold_night
from seqrec.prepare import PrepareReport, prepare
from seqrec.report import write_report
from seqrec.runtime import timed
from seqrec.score import ScoreReport, score
from seqrec.storage import Storage
from seqrec.training.datasets import stored_data_shape

log = logging.getLogger("seqrec.nightly")


class NightFailed(RuntimeError):
    """A stage of the night failed after training; nothing the night would change was changed."""


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


def val_ndcg(metrics: dict[str, Any] | None, who: str = "model") -> tuple[float | None, float | None]:
    """Validation NDCG@10 and its standard error, or (None, None) without metrics."""
    if metrics is None:
        return None, None
    return metrics["val"][who]["ndcg@10"], metrics["val"].get("stderr", {}).get(who, {}).get("ndcg@10")


def promotion_decision(candidate: Candidate, tolerance: float) -> tuple[bool, str]:
    """Whether the candidate becomes the live model, and the sentence the report gives for it."""
    candidate_ndcg, candidate_se = val_ndcg(candidate.metrics)
    live_ndcg, live_se = val_ndcg(candidate.live_metrics)
    promoted = not_worse(candidate_ndcg, live_ndcg, tolerance)
    ours = f"{candidate_ndcg:.4f} ± {candidate_se:.4f}"
    if live_ndcg is None:
        return promoted, f"promoted: first model (val NDCG@10 {ours})"
    theirs = f"{live_ndcg:.4f} ± {live_se:.4f}"
    if promoted:
        return promoted, f"promoted: val NDCG@10 {ours} vs live {theirs} (tolerance {tolerance})"
    return promoted, (
        f"kept {candidate.live_version}: candidate val NDCG@10 {ours} is worse than live "
        f"{theirs} by more than the tolerance {tolerance}"
    )


def suggest_settings(config: Config, shape: DataShape, explicit: set[str]) -> tuple[Config, dict[str, Any]]:
    """``config`` with :func:`seqrec.config.suggest`'s settings for data of this ``shape`` in the
    fields the user did not set (``explicit``), and those changes (logged, printed, in the report)."""
    changes = suggested(config, shape, explicit)
    if changes:
        message = (
            f"settings from the data's shape ({shape.users} users, {shape.items} items, median "
            f"history {shape.length_p50:.0f}, p95 {shape.length_p95:.0f}; fields you set are kept): "
            + ", ".join(f"{k}={v}" for k, v in changes.items())
        )
        log.info(message)
        print(f"seqrec nightly: {message}", file=sys.stderr)
    return apply_overrides(config, changes), changes


def run_nightly(
    storage: Storage, date: str, config: Config, explicit: set[str] | None = None
) -> NightlyResult:
    """The night for ``date``, under its lease: a second run of the same date stops before writing
    anything. With ``explicit`` (the fields the user set), the fields outside it take the settings
    suggested by the data's shape; None keeps ``config`` as given."""
    with hold_night(storage, date, config.publish.lease_ttl_s):
        return _run_night(storage, date, config, explicit)


def _run_night(storage: Storage, date: str, config: Config, explicit: set[str] | None) -> NightlyResult:
    timings: dict[str, float] = {}
    started_at = dt.datetime.now(dt.UTC)
    with timed(timings, "prepare"):
        prepared = prepare(storage, date, config.prepare)
    suggestions: dict[str, Any] = {}
    if explicit is not None:
        # One pass of Ray Data tasks over the stored sequences: the driver never holds them.
        config, suggestions = suggest_settings(config, stored_data_shape(storage, date), explicit)

    candidate = train_candidate(storage, date, config, compare_with_live=True, timings=timings)
    promoted, decision = promotion_decision(candidate, config.eval.promote_tolerance)
    log.info("%s\n%s", summary_table(candidate.metrics, "val"), summary_table(candidate.metrics, "test"))
    log.info(decision)
    candidate_ndcg = candidate.metrics["val"]["model"]["ndcg@10"]
    live = candidate.version if promoted else candidate.live_version
    live_metrics = candidate.live_metrics
    report = {
        "date": date,
        "started_at": started_at.isoformat(),
        "candidate": candidate.version,
        "live_model": live,
        "promoted": promoted,
        "decision": decision,
        "counts": prepared.as_dict(),
        "timings_s": timings,
        "val_ndcg@10": {
            "candidate": candidate_ndcg,
            "live": live_metrics["val"]["model"]["ndcg@10"] if live_metrics else None,
            "popularity": candidate.metrics["val"]["popularity"]["ndcg@10"],
        },
        "val_ndcg@10_stderr": {
            "candidate": val_ndcg(candidate.metrics)[1],
            "live": val_ndcg(live_metrics)[1],
            "popularity": val_ndcg(candidate.metrics, "popularity")[1],
        },
        "training": candidate.result.summary(),
        "candidate_metrics": candidate.metrics,
        "live_metrics": live_metrics,
        "config": config.to_dict(),
        "suggested_settings": suggestions,
    }
    try:
        with timed(timings, "score"):
            scored = score(storage, date, live, config.score, config.publish)
    except Exception as exc:
        failure = f"score failed: {type(exc).__name__}: {exc}"
        report.update(
            status="failed",
            failed_stage="score",
            error=failure,
            promoted=False,
            live_model=candidate.live_version,
            decision=f"not promoted ({failure})" if promoted else decision,
        )
        write_report(storage, report, candidate.result.history)
        raise NightFailed(
            f"night {date}: {failure}; nothing was published or promoted, the live model stays "
            f"{candidate.live_version or '(none)'}"
        ) from exc
    if promoted:  # last: only a published night changes the live model
        artifacts.promote(storage, candidate.version, decision, {"val_ndcg@10": candidate_ndcg})

    report.update(status="ok", recommendations=asdict(scored))
    location = write_report(storage, report, candidate.result.history)
    return NightlyResult(
        date=date,
        candidate=candidate.version,
        live_model=live,
        promoted=promoted,
        decision=decision,
        prepare=prepared,
        metrics=candidate.metrics,
        recommendations=scored,
        report=location,
        timings_s=timings,
    )
