"""``seqrec tune``: a budgeted, resumable search for a training recipe, judged on validation only.

Every trial is the real training stage: a Ray Tune function trainable calls
:func:`seqrec.training.train` with one worker, whose Ray Train ``TorchTrainer`` (Train V2) hands each
epoch's validation metrics to the trial through Tune's ``TuneReportCallback``. That is the
integration Ray 2.60 supports for Train V2 (a trainer object passed to the ``Tuner`` is deprecated
there), and it keeps one training code path: checkpoints, early stopping on validation NDCG@10
and failure handling are the night's. An ASHA scheduler stops weak trials at rungs of epochs,
``--budget-minutes`` is Tune's global ``time_budget_s``, and the experiment lives under
``tune/<name>/`` in the storage root (each trial's training run under
``tune/<name>/runs/<trial id>``), so running the same name again restores it: finished trials are
kept, unfinished ones resume from their last training checkpoint.

The search space is a preset picked from the data's shape (:func:`search_space`), centred on
:func:`seqrec.config.suggest`; the first trial is that starting point, so the search can only
improve on what ``seqrec nightly`` would pick by itself. Fields given with ``--set`` stay fixed.
The chosen config (a complete YAML file for ``--config``) and a report of every trial are written
beside the experiment.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from seqrec.config import (
    CONTEXT_LENGTHS,
    LARGE_CATALOGUE,
    Config,
    DataShape,
    apply_overrides,
    config_from_dict,
    context_length,
    suggested,
)
from seqrec.prepare import InputError
from seqrec.storage import Storage
from seqrec.training.datasets import stored_data_shape
from seqrec.training.loop import SELECTION_METRIC

log = logging.getLogger("seqrec.tune")

# A trial holds train.cpus_per_worker CPUs in all: TRIAL_CPUS for the trial function, which only
# waits on its training run, and the rest for that run's one worker. Reserving TRIAL_CPUS on top
# fitted only one trial of 1.01 CPUs on a 2-CPU machine (15 on a 16-CPU node).
TRIAL_CPUS = 0.01


@dataclass
class TuneSettings:
    name: str  # the experiment: tune/<name>/ below the storage root
    budget_minutes: float = 60.0  # wall clock for the whole search (Tune's time_budget_s)
    trials: int = 16  # trials sampled from the space (fewer if the budget ends first)
    concurrency: int = 0  # trials at once; 0: as many as the cluster's CPUs hold
    grace_epochs: int = 2  # ASHA judges a trial after this many epochs, then at x3 rungs
    seed: int = 0


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def domain(self):
        from ray import tune

        return tune.choice(list(self.values))


@dataclass(frozen=True)
class LogRange:
    low: float
    high: float

    def domain(self):
        from ray import tune

        return tune.loguniform(self.low, self.high)


@dataclass
class SearchSpace:
    preset: str
    fields: dict[str, Choice | LogRange]

    def values_of(self, config: Config) -> dict[str, Any]:
        return {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in self.fields}

    def including(self, config: Config) -> SearchSpace:
        """The same space with ``config``'s value added to each choice that lacks it (the first trial)."""
        fields = dict(self.fields)
        for key, value in self.values_of(config).items():
            domain = fields[key]
            if isinstance(domain, Choice) and value not in domain.values:
                values = (*domain.values, value)
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                fields[key] = Choice(tuple(sorted(values)) if numeric else values)
            elif isinstance(domain, LogRange) and not domain.low <= value <= domain.high:
                fields[key] = LogRange(min(domain.low, value), max(domain.high, value))
        return SearchSpace(preset=self.preset, fields=fields)

    def describe(self) -> dict[str, Any]:
        return {
            key: list(d.values) if isinstance(d, Choice) else {"log_uniform": [d.low, d.high]}
            for key, d in self.fields.items()
        }


def preset(shape: DataShape) -> str:
    """``short-sparse`` (Amazon-like), ``long-dense`` (MovieLens-like) or ``medium``."""
    if shape.length_p50 < 20 and shape.interactions_per_item < 30:
        return "short-sparse"
    if shape.length_p50 >= 50:
        return "long-dense"
    return "medium"


def search_space(shape: DataShape, fixed: set[str] = frozenset()) -> SearchSpace:
    """The settings that matter on this kind of data, sized by its shape; ``fixed`` fields are left out."""
    kind = preset(shape)
    lengths = (20, *CONTEXT_LENGTHS)
    at = lengths.index(context_length(shape))
    lengths = lengths[max(at - 1, 0) : at + 2]
    small = shape.interactions < 100_000
    negatives = tuple(n for n in (256, 1024, 4096) if n < shape.items) or (max(shape.items // 2, 1),)
    # gbce stays a --set option, not a searched one: on S3-Rec Beauty the 9 of 24 trials that drew it
    # validated at NDCG@10 <= 0.0049 after their 2 grace epochs (ce and sampled trials cut there:
    # 0.016-0.040), so ASHA cut every one; they took 14.4 of the search's 86.8 trial-minutes.
    losses = ("sampled",) if shape.items > LARGE_CATALOGUE else ("ce", "sampled")
    patience = {"short-sparse": (5, 8, 12), "long-dense": (5, 10), "medium": (3, 5, 8)}[kind]
    fields: dict[str, Choice | LogRange] = {
        "model.dropout": Choice((0.1, 0.2, 0.3) if kind == "long-dense" else (0.1, 0.2, 0.3, 0.5)),
        "model.hidden_size": Choice((32, 64) if small else (64, 128)),
        "model.num_layers": Choice({"short-sparse": (1, 2), "long-dense": (2, 3), "medium": (1, 2, 3)}[kind]),
        "model.num_heads": Choice((1, 2)),
        "model.max_len": Choice(lengths),
        "train.loss": Choice(losses),
        "train.num_negatives": Choice(negatives),
        "train.negatives": Choice(("uniform", "popularity")),
        "train.lr": LogRange(3e-4, 3e-3),
        "train.weight_decay": Choice((0.0, 0.01, 0.1)),
        "train.patience": Choice(patience),
        # A moving average of the weights (validated and kept in their place): on S3-Rec Beauty
        # 0.998 lifted the best tuned recipe's validation NDCG@10 from 0.0697 to 0.0725.
        "train.weight_average": Choice((0.0, 0.99, 0.998)),
    }
    return SearchSpace(preset=kind, fields={k: v for k, v in fields.items() if k not in fixed})


def trial_config(start: Config, params: dict[str, Any]) -> Config:
    """The config one trial trains with: the sampled ``params`` on ``start``, one worker of
    ``cpus_per_worker`` less the trial function's share (see TRIAL_CPUS), no warm start, validation
    every epoch (ASHA and the report judge each one)."""
    cpus = start.train.cpus_per_worker
    threads = start.train.torch_threads or max(1, round(cpus))
    return apply_overrides(
        start,
        {
            **params,
            "train.num_workers": 1,
            "train.cpus_per_worker": max(cpus - TRIAL_CPUS, TRIAL_CPUS),
            "train.warm_start": False,
            "train.eval_every": 1,
            "train.torch_threads": threads,
        },
    )


def _epoch_callback():
    """Tune's Train V2 bridge, adding ``epochs`` (1-based, across a resumed run) for ASHA's rungs."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], "epochs": metrics[0]["epoch"] + 1}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def run_trial(params: dict[str, Any], *, root: str, date: str, start: dict[str, Any], name: str) -> None:
    """Tune function trainable: train one sampled config with seqrec's training stage."""
    from ray import tune

    from seqrec.candidate import text_features_for
    from seqrec.runtime import configure_ray_data
    from seqrec.training import train

    configure_ray_data(progress=False)  # the trial's datasets are created here, in its own process
    storage = Storage(root)
    config = trial_config(config_from_dict(start), params)
    # The night's path: read from storage by Ray Data tasks that need no CPU. An in-memory table
    # (ray.data.from_arrow) runs 1-CPU tasks, which wait forever beside trials holding the CPUs.
    train(
        storage,
        date,
        model_config=config.model,
        train_config=config.train,
        prepare_config=config.prepare,
        run_name=tune.get_context().get_trial_id(),
        runs_dir=f"tune/{name}/runs",
        text_features_fn=text_features_for(config, storage),
        ks=config.eval.ks,
        validation_users=config.eval.max_users,
        callbacks=[_epoch_callback()],
    )


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    val_ndcg: float  # best validation NDCG@10 over its epochs
    best_epoch: int  # 1-based
    epochs: int
    minutes: float
    stop: str  # completed | patience | cut (ASHA or the budget) | error
    val: dict[str, float] = field(default_factory=dict)  # every validation metric at the best epoch


@dataclass
class TuneReport:
    name: str
    date: str
    storage: str
    preset: str
    shape: dict[str, Any]
    space: dict[str, Any]
    settings: dict[str, Any]
    restored: bool
    wall_minutes: float
    best: TrialRow
    trials: list[TrialRow]
    chosen_config: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(result, max_epochs: int, patience: int) -> TrialRow | None:
    frame = result.metrics_dataframe
    trial = (result.metrics or {}).get("trial_id") or Path(result.path).name
    if frame is None or SELECTION_METRIC not in frame or frame[SELECTION_METRIC].isna().all():
        return None
    best = frame.loc[frame[SELECTION_METRIC].idxmax()]
    epochs, best_epoch = int(frame["epochs"].max()), int(best["epochs"])
    patience = int(result.config.get("train.patience", patience))
    if result.error is not None:
        stop = "error"
    elif epochs >= max_epochs:
        stop = "completed"
    elif patience and epochs - best_epoch >= patience:
        stop = "patience"
    else:
        stop = "cut"
    val = {
        k: float(best[k]) for k in frame.columns if k.startswith("val_") and not math.isnan(float(best[k]))
    }
    return TrialRow(
        trial=str(trial),
        params=dict(result.config),
        val_ndcg=float(best[SELECTION_METRIC]),
        best_epoch=best_epoch,
        epochs=epochs,
        minutes=round(float(frame["time_total_s"].max()) / 60, 2),
        stop=stop,
        val=val,
    )


def _short(key: str) -> str:
    return key.split(".", 1)[1]


def table(rows: list[TrialRow], keys: list[str]) -> str:
    """The trials best first, one line each, with the sampled settings."""
    head = ["trial", "val_ndcg@10", "best_ep", "epochs", "min", "stop", *(_short(k) for k in keys)]

    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [
        [
            r.trial,
            f"{r.val_ndcg:.4f}",
            str(r.best_epoch),
            str(r.epochs),
            f"{r.minutes:.1f}",
            r.stop,
            *(cell(r.params.get(k)) for k in keys),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *lines])


def chosen_yaml(config: Config, best: TrialRow, name: str, date: str, budget: float, trials: int) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tuned = ", ".join(f"{k}={v}" for k, v in best.params.items())
    return (
        f"# Chosen by `seqrec tune` (experiment {name!r}, sequences of {date}, {stamp}) on validation\n"
        f"# only: val NDCG@10 {best.val_ndcg:.4f} at epoch {best.best_epoch} (trial {best.trial}, "
        f"best of {trials} trials in a {budget:g}-minute budget).\n# Tuned: {tuned}\n{config.dumps()}"
    )


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------
def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


def concurrency(settings: TuneSettings, start: Config, cluster_cpus: float) -> int:
    """Trials at once: ``--concurrency``, else as many as the cluster's CPUs hold (a trial holds
    ``train.cpus_per_worker``, see TRIAL_CPUS)."""
    if settings.concurrency:
        return settings.concurrency
    fits = math.floor(cluster_cpus / start.train.cpus_per_worker + 1e-9)
    return max(1, min(settings.trials, fits))


def search(
    storage: Storage,
    date: str,
    base: Config,
    settings: TuneSettings,
    fixed: set[str] = frozenset(),
    explicit: set[str] = frozenset(),
) -> TuneReport:
    """Search on the sequences of ``date``; returns the report and writes it, with the chosen config,
    under ``tune/<name>/``. ``fixed``: fields held at ``base``'s value (``--set``); ``explicit``:
    fields the user set at all (no suggestion replaces them)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    if base.train.epochs < 1 or settings.trials < 1 or settings.budget_minutes <= 0:
        raise InputError("seqrec tune needs train.epochs >= 1, --trials >= 1 and --budget-minutes > 0")
    shape = stored_data_shape(storage, date)  # as the night computes it: the driver holds no sequences
    start = apply_overrides(base, suggested(base, shape, set(explicit) | set(fixed)))
    space = search_space(shape, set(fixed)).including(start)
    first = space.values_of(start)
    log.info(
        "tune %s: %d users, %d items, median history %.0f: preset %s, %d fields searched, start %s",
        settings.name,
        shape.users,
        shape.items,
        shape.length_p50,
        space.preset,
        len(space.fields),
        first,
    )

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(
            run_trial, root=storage.root, date=date, start=start.to_dict(), name=settings.name
        ),
        {"cpu": TRIAL_CPUS},
    )
    path = storage.path("tune", settings.name)
    filesystem = storage.filesystem if storage.is_s3 else None
    restored = ray_tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    if restored:
        log.info(
            "tune %s: restoring the experiment at %s (its trials count and budget are kept)",
            settings.name,
            storage.uri("tune", settings.name),
        )
        tuner = ray_tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            restart_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = ray_tune.Tuner(
            trainable,
            param_space={key: d.domain() for key, d in space.fields.items()},
            tune_config=ray_tune.TuneConfig(
                metric=SELECTION_METRIC,
                mode="max",
                num_samples=settings.trials,
                time_budget_s=settings.budget_minutes * 60,
                trial_dirname_creator=trial_dirname,
                scheduler=ASHAScheduler(
                    time_attr="epochs",
                    max_t=base.train.epochs,
                    reduction_factor=3,
                    grace_period=min(settings.grace_epochs, base.train.epochs),
                ),
                # (Tune's max_concurrent_trials is ignored for this search algorithm: it takes its own.)
                search_alg=BasicVariantGenerator(
                    points_to_evaluate=[first],
                    random_state=settings.seed,
                    max_concurrent=concurrency(settings, start, ray.cluster_resources().get("CPU", 1.0)),
                ),
            ),
            run_config=ray_tune.RunConfig(
                name=settings.name, storage_path=storage.path("tune"), storage_filesystem=filesystem
            ),
        )
    results = tuner.fit()
    rows = [
        row
        for row in (_row(result, base.train.epochs, start.train.patience) for result in results)
        if row is not None
    ]
    if not rows:
        errors = [str(result.error).splitlines()[0] for result in results if result.error is not None]
        cause = f"; first error: {errors[0]}" if errors else ""
        raise RuntimeError(
            f"tune {settings.name}: no trial finished an epoch within "
            f"{settings.budget_minutes:g} minutes{cause}; raise --budget-minutes or lower "
            "train.epochs"
        )
    rows.sort(key=lambda r: -r.val_ndcg)
    best = rows[0]
    chosen = apply_overrides(start, best.params)
    text = chosen_yaml(chosen, best, settings.name, date, settings.budget_minutes, len(rows))
    storage.write_bytes(text.encode(), "tune", settings.name, "chosen.yaml")
    report = TuneReport(
        name=settings.name,
        date=date,
        storage=storage.uri("tune", settings.name),
        preset=space.preset,
        shape={**asdict(shape), "interactions_per_item": round(shape.interactions_per_item, 2)},
        space=space.describe(),
        settings=asdict(settings),
        restored=restored,
        wall_minutes=round((time.perf_counter() - started) / 60, 2),
        best=best,
        trials=rows,
        chosen_config=storage.uri("tune", settings.name, "chosen.yaml"),
    )
    storage.write_json(report.as_dict(), "tune", settings.name, "report.json")
    log.info(
        "tune %s: best trial %s, val NDCG@10 %.4f -> %s",
        settings.name,
        best.trial,
        best.val_ndcg,
        report.chosen_config,
    )
    return report
