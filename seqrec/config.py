"""Typed configuration of every stage.

One dataclass per stage, gathered in :class:`Config`. A YAML file gives any subset of fields,
``--set section.field=value`` on the command line overrides them, and every job prints the result.
Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from seqrec.errors import ConfigError


@dataclass
class PrepareConfig:
    max_len: int = 200  # sequences keep the newest ``max_len`` events
    event_types: list[str] = field(default_factory=lambda: ["view", "click", "cart", "purchase"])
    default_event_type: str = "interaction"  # used when the events have no event_type column
    min_ts: str = "2000-01-01"  # earlier timestamps are absurd: quarantined
    max_future_days: int = 1  # timestamps beyond the day after ``date`` are quarantined
    lookback_days: int = 0  # 0: all history under events/; else the last N days
    incremental: bool = True  # extend yesterday's sequences with today's events
    # Users are hashed into this many buckets; one Ray task merges a bucket with that bucket of
    # yesterday's sequences, so a task holds ~1/buckets of all history. Changing it re-buckets once.
    buckets: int = 64
    rows_per_task: int = 1_000_000  # event rows one validation task reads (whole row groups)
    cpus_per_task: float = 0.5  # fractional: whole-CPU tasks would starve actors on 2 cores
    # An unreadable (truncated, corrupt) events file: fail naming it, or move it to
    # quarantine/dt=D/_files/ with its reason and go on (counted as files_quarantined).
    bad_files: Literal["fail", "quarantine"] = "fail"


@dataclass
class ModelConfig:
    kind: str = "causal"  # causal (SASRec/GPT-2 style) | bidirectional (BERT4Rec style)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    use_event_types: bool = True
    text_encoder: str | None = None  # HF encoder path, "minilm" for the packaged all-MiniLM-L6-v2
    # Multiply item embeddings by sqrt(hidden_size) before positions are added, as SASRec and the
    # Transformer do: with N(0, 0.02) init, the item signal then dominates the position signal.
    # Measured on ML-1M (benchmarks/training.py, 2 workers): val NDCG@10 0.120 after 7 epochs, 0.108 without.
    scale_embeddings: bool = True
    # An ensemble of this many towers, each hidden_size wide and trained on its own loss, scored by
    # the sum of their scores (see seqrec.model). Costs members x the compute of one model.
    members: int = 1


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 20
    batch_size: int = 128  # global batch, split across workers
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = (
        "constant"  # cosine: after warmup, decay to 0 over train.epochs
    )
    loss: str = "ce"  # ce | sampled (log-q corrected) | gbce
    num_negatives: int = 256  # for sampled / gbce
    negatives: Literal["popularity", "uniform"] = "popularity"  # for sampled; popularity is log-q corrected
    gbce_t: float = 0.75
    mask_prob: float = 0.2  # bidirectional model: share of positions masked
    # DuoRec-style contrastive regulariser (Qiu et al., WSDM 2022): each row goes through the
    # encoder twice (two dropout draws) and an InfoNCE term, weighted by ``contrastive_weight``,
    # pulls the two states of a position together and apart from the other sampled positions,
    # counting positions with the same next item as positives too (DuoRec's supervised
    # augmentation). 0: off. Costs a second encoder pass; the item loss is computed once.
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 1.0
    # Decay of an exponential moving average of the weights, which is what is validated, selected
    # and returned (seqrec.training.averaging). 0: off, the last step's weights.
    weight_average: float = 0.0
    # Text-aware models: share of items whose id embedding is dropped at each step (input and
    # output side alike), so that the text projection alone learns to place an item. On ML-1M 0.3
    # cost 6% NDCG@10 overall for new items' Recall@10 0.054 (cold_items=learned: 0.036 at no cost).
    id_dropout: float = 0.0
    # Text-aware models, after training: items with no training interaction are represented by a
    # projection of their text fitted to rank like trained items ("learned", see
    # seqrec.training.cold_items.place_untrained_items), or by the model's text projection alone
    # ("text").
    cold_items: Literal["learned", "text"] = "learned"
    # all: a history longer than model.max_len is cut into windows that are all trained on (every
    # next-item pair once); newest: only its newest max_len items, as SASRec's reference code does.
    # Matters only where prepare.max_len keeps more than model.max_len.
    windows: Literal["all", "newest"] = "all"
    patience: int = 3  # early stopping on validation NDCG@10
    eval_every: int = 1  # validate every N epochs (patience counts validations)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with native bf16; else no
    max_failures: int = 1
    seed: int = 42
    warm_start: bool = True  # fine-tune from the promoted model when there is one
    # A warm-start night trains on the users with events since the promoted model's training data
    # ("changed") plus a replay sample of the others, so its cost follows the night's new data;
    # "all": every user, as a cold night does.
    warm_start_users: Literal["changed", "all"] = "changed"
    # Warm-start nights: users without new events replayed per user with new events (a hash sample
    # of the others, another each night). Relative to the news, not a share of all users: a share
    # made replay, and the night's cost, grow with the user base (10% of 1M users with 150k active
    # replayed 85k users, 36% of the night's rows). Forgetting is caught by the promotion gate,
    # which judges a sample of all users, not only the changed ones.
    replay_ratio: float = 0.2
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    max_minutes: float = 0.0  # stop training after this many minutes (0: no limit)
    log_every_s: float = 30.0  # rank 0 logs training progress this often
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20])
    batch_size: int = 512
    # Users in the gate's sample, a stable hash of user_id (0: all). Sampling keeps evaluation's cost
    # flat in users; each metric's standard error is reported beside it.
    max_users: int = 100_000
    # ... and at most this many full-catalogue rankings per user of the night (each judged model and
    # split is one: 3 on a warm night; scoring makes 1), so the gate costs less than scoring: half its
    # rankings leave room for loading two models per actor (0: no bound); but never fewer than
    # min_users users. max_users=0 evaluates everyone regardless.
    max_rankings_per_user: float = 0.5
    # (A warm night's training validates on the users of the sample it trains on, or on the whole
    # sample where fewer than min_users of them are trained on: too few to stop on.)
    min_users: int = 10_000
    promote_tolerance: float = 0.0  # promote unless val NDCG@10 is worse by more than this


@dataclass
class ScoreConfig:
    k: int = 10
    batch_size: int = 1024
    num_actors: int = 1
    cpus_per_actor: float = 0.5  # fractional: whole-CPU actors starve read tasks on 2 cores
    gpus_per_actor: float = 0.0
    torch_threads: int = 1
    item_chunk: int = 16384  # top-k over the catalogue in chunks of this many items
    num_blocks: int = 0  # 0: one block per actor x 4
    # Object-store memory the scoring pipeline may hold (GiB; 0: Ray Data's default share). Without
    # a cap the reader runs ahead of the actors and queued blocks grow with the number of users.
    object_store_gib: float = 0.5
    rows_per_file: int = 250_000  # users per published Parquet file (a hint to Ray Data's writer)


@dataclass
class PublishConfig:
    # delta: a Delta Lake table, one atomic commit per night, history for --as-of and rollback.
    # parquet: plain Hive-style Parquet + _SUCCESS, for readers without Delta (not atomic for them).
    format: Literal["delta", "parquet"] = "delta"
    lease_ttl_s: float = 600.0  # a night's lease not renewed for this long is taken over
    history_days: float = 30.0  # snapshots older than this may be vacuumed (no --as-of, rollback)


@dataclass
class Config:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_changes(config: Config) -> dict[str, Any]:
    """``section.key -> value`` of every field that differs from its default."""
    defaults = Config().to_dict()
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        for key, value in values.items()
        if defaults[section][key] != value
    }


def _check_choice(value: Any, typ: Any, where: str) -> None:
    if get_origin(typ) is Literal and value not in get_args(typ):
        raise ConfigError(f"config {where} must be one of {list(get_args(typ))}, got {value!r}")


def check_choices(section: Any, name: str) -> None:
    """Refuse a ``Literal`` field outside its choices in a section built in code (files and
    overrides are checked as they are read)."""
    hints = get_type_hints(type(section))
    for f in fields(section):
        _check_choice(getattr(section, f.name), hints[f.name], f"{name}.{f.name}")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if get_origin(typ) is Literal:
        _check_choice(value, typ, where)
        return value
    if isinstance(value, str) and typ is not str:
        value = yaml.safe_load(value)  # "3" -> 3, "[10, 20]" -> [10, 20], "null" -> None
    origin = getattr(typ, "__origin__", None)
    if typ is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as text
        except ValueError:
            pass
    if typ in (int, float) and isinstance(value, bool):
        raise ConfigError(
            f"config {where}: expected {typ.__name__}, got {value!r}"
        )  # bool is an int in Python
    if typ is float and isinstance(value, int):
        return float(value)
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"config {where}: expected {typ.__name__}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config {where}: expected a list, got {value!r}")
        (item_type,) = getattr(typ, "__args__", (Any,))
        if item_type in (int, float, str, bool):
            return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# Keys that older configs may still hold, with what to write instead.
REPLACED = {
    "train.replay_share": "use train.replay_ratio, replayed users per user with new events "
    "(a share of all users made the warm night's cost grow with the user base)",
}


def _update(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    for key, value in values.items():
        if prefix + key in REPLACED:
            raise ConfigError(f"config key {prefix + key!r} is gone: {REPLACED[prefix + key]}")
        if key not in known:
            raise ConfigError(f"unknown config key {prefix + key!r}; known: {sorted(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config {prefix}{key} must be a mapping")
            _update(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{prefix}{key}"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides."""
    config = Config()
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        _update(config, data, "")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, _, name = key.partition(".")
        _update(config, {section: {name: value}} if name else {section: value}, "")
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    config = Config()
    _update(config, data, "")
    return config


def config_json(config: Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def apply_overrides(config: Config, values: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``{"section.field": value}`` set (typed values, checked as in files)."""
    out = copy.deepcopy(config)
    for key, value in values.items():
        section, _, name = key.partition(".")
        _update(out, {section: {name: value}}, "")
    return out


def fields_set(path: str | Path | None = None, overrides: list[str] | None = None) -> set[str]:
    """``section.field`` names a YAML file and ``--set`` overrides give explicitly (they always win)."""
    names: set[str] = set()
    data = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    for section, values in data.items() if isinstance(data, dict) else ():
        names.update(f"{section}.{key}" for key in (values or {}))
    names.update(item.partition("=")[0].strip() for item in overrides or [])
    return names


# --------------------------------------------------------------------------------------------
# Settings from the data's shape
# --------------------------------------------------------------------------------------------
@dataclass
class DataShape:
    """What the right recipe depends on, measured on the prepared sequences (``seqrec.data.data_shape``)."""

    users: int
    items: int
    interactions: int
    length_p50: float
    length_p95: float
    length_max: int
    event_types: int = 1

    @property
    def interactions_per_item(self) -> float:
        return self.interactions / max(self.items, 1)


# model.max_len candidates: SASRec's 50 (Amazon) to 200 (ML-1M); shorter saves little on sparse data.
CONTEXT_LENGTHS = (50, 100, 200)
LARGE_CATALOGUE = 20_000  # items; above it the full softmax dominates each step


def context_length(shape: DataShape) -> int:
    """The shortest candidate that holds 95% of the histories whole."""
    return next((n for n in CONTEXT_LENGTHS if n >= shape.length_p95), CONTEXT_LENGTHS[-1])


def suggest(shape: DataShape) -> dict[str, Any]:
    """Settings for a dataset nobody tuned, as ``{"section.field": value}``.

    Each rule follows a recipe measured on validation in ``benchmarks/configs/`` (one member):
    short, sparse histories (Amazon categories: median under 20 items, under 30 interactions per
    item) get beauty.yaml's one block, dropout 0.2 and patience 8, and a weight average of 0.99
    (validation NDCG@10 on both Beauty files: 0.0406 -> 0.0427 and 0.0697 -> 0.0725); long, dense
    ones (median 50 and more, ML-1M) get ml-1m.yaml's two blocks, dropout 0.1 and patience 10. A
    catalogue above ``LARGE_CATALOGUE`` items trains on sampled softmax over 4,096 uniform negatives
    (Beauty: close to the full softmax on validation, as good on test, in a third of the time).
    Data of neither kind keeps the defaults.
    """
    out: dict[str, Any] = {"model.max_len": context_length(shape)}
    if shape.event_types <= 1:
        out["model.use_event_types"] = False  # one type carries no signal
    if shape.items > LARGE_CATALOGUE:
        out.update({"train.loss": "sampled", "train.negatives": "uniform", "train.num_negatives": 4096})
    if shape.length_p50 < 20 and shape.interactions_per_item < 30:
        out.update(
            {"model.num_layers": 1, "model.dropout": 0.2, "train.patience": 8, "train.weight_average": 0.99}
        )
    elif shape.length_p50 >= 50:
        out.update({"model.num_layers": 2, "model.dropout": 0.1, "train.patience": 10})
    return out


def suggested(config: Config, shape: DataShape, explicit: set[str]) -> dict[str, Any]:
    """The suggestions for fields the user did not set that change ``config``."""
    out = {}
    for key, value in suggest(shape).items():
        section, _, name = key.partition(".")
        if (
            key not in explicit
            and section not in explicit
            and getattr(getattr(config, section), name) != value
        ):
            out[key] = value
    return out
