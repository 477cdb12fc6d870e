"""What a night prints: seqrec's own story, Ray's real warnings, not Ray's known-harmless chatter.

Three mechanisms, each Ray's documented one for its kind of line:

* lines that Ray *workers* print reach the driver through ``log_to_driver``; the driver drops the
  ones matching ``RAY_DEDUP_LOGS_SKIP_REGEX`` (read when ``ray`` is imported, so
  :func:`quiet_ray_environment` runs before that; when ray was imported first,
  :func:`quiet_ray_driver` hands the driver's deduplicators the pattern). The worker's own log files
  under the Ray session keep them.
* Ray Data's per-dataset INFO lines ("Starting execution of Dataset ...") go to its console
  handler at WARNING through ``RAY_DATA_LOGGING_CONFIG`` (``ray_data_logging.yaml``); its
  ``ray-data.log`` file keeps everything.
* Ray Train's INFO lines (worker group started, "Reporting training result N") are held back by
  ``ray.train.LoggingConfig(log_level="WARNING")`` in seqrec.train; seqrec's own worker logs
  ("rank 0 resumed from epoch 3", training progress) go through the root logger and stay.

Only lines listed in :data:`KNOWN_HARMLESS` are dropped, each with the reason it is harmless.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

# (pattern, why it is harmless); the patterns are matched anywhere in a line.
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    (
        r"Failed to query Ray Train Controller actor state",
        "Ray Train's PlacementGroupCleaner polls the state API, which the dashboard serves: a night's "
        "local Ray runs without it, so every poll fails there (on a loaded cluster one may time out; ray "
        "PRs 58515, 61756). The cleaner matters only for a run whose controller died; a night's runs shut "
        "down and free their CPUs, and seqrec tune, whose cut trials need it, starts the dashboard",
    ),
    (
        r"has constructor arguments in the object store and max_restarts > 0",
        "logged once per actor whose constructor arguments Ray keeps in the object store (ray issue 53727); "
        "they stay referenced for the actor's life",
    ),
    (
        r"Progress bars disabled\. To enable",
        "seqrec turns Ray Data's progress bars off when stderr is not a terminal (SEQREC_PROGRESS=1: on)",
    ),
    (
        r"ExecutionOptions\.exclude_resources` is deprecated|self\.exclude_resources = exclude_resources",
        "Ray Train's own DatasetManager sets a Ray Data option that Ray deprecated; nothing seqrec sets",
    ),
    (
        r"Reporting training result \d+: TrainingReport",
        "Ray Train INFO once per report and rank; its logger is named after a file path, so "
        "LoggingConfig(log_level) does not hold it back; seqrec logs the training itself",
    ),
    (
        r"Token authentication is enabled for this Ray cluster",
        "the local single-node Ray seqrec starts makes its own token; on a cluster the operator sets auth up",
    ),
    # Ray Data's per-dataset INFO lines from its coordinator actors (the driver's go to ray-data.log).
    (
        r"(Starting execution of|Execution plan of) Dataset |Dataset \S+ execution finished in",
        "Ray Data INFO: which dataset ran; the session's ray-data.log keeps them",
    ),
)

_DATA_LOGGING_YAML = Path(__file__).with_name("ray_data_logging.yaml")


def harmless_regex() -> str:
    return "|".join(f"(?:{pattern})" for pattern, _ in KNOWN_HARMLESS)


class KnownHarmless(logging.Filter):
    """Drops records whose message matches :data:`KNOWN_HARMLESS`."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._re = re.compile(harmless_regex())

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._re.search(record.getMessage())


def quiet_ray_environment(verbose: bool = False) -> dict[str, str]:
    """Set (unless already set) the environment that quiets Ray in this process and its workers;
    returns it for a runtime_env. Call before ``import ray``; ``verbose`` keeps everything."""
    if verbose:
        return {}
    env = {"RAY_DEDUP_LOGS_SKIP_REGEX": harmless_regex(), "RAY_DATA_LOGGING_CONFIG": str(_DATA_LOGGING_YAML)}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in env}


def quiet_ray_driver() -> None:
    """Filter the known-harmless lines that Ray logs in the driver process itself (not with -v)."""
    if os.environ.get("SEQREC_RAY_VERBOSE") == "1":
        return
    _skip_harmless_worker_lines()
    harmless = KnownHarmless()
    for name in ("ray", "ray.data", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, KnownHarmless) for f in handler.filters):
                handler.addFilter(harmless)


def _skip_harmless_worker_lines() -> None:
    """Make the driver's log deduplicators skip the known-harmless worker lines even when ``ray`` was
    imported before :func:`quiet_ray_environment` set ``RAY_DEDUP_LOGS_SKIP_REGEX`` (Ray reads it
    once, at import: any module importing ray first, seqrec.tune or the user's code, loses it)."""
    try:
        from ray._private import worker
    except ImportError:  # a Ray without these internals keeps its default
        return
    for deduplicator in (worker.stdout_deduplicator, worker.stderr_deduplicator):
        if getattr(deduplicator, "skip_re", "absent") is None:
            deduplicator.skip_re = re.compile(harmless_regex())
