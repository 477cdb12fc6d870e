"""seqrec.config: YAML + --set overrides, type coercion, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seqrec.config import (
    Config,
    DataShape,
    TrainConfig,
    apply_overrides,
    check_choices,
    config_from_dict,
    config_json,
    fields_set,
    load_config,
    suggest,
    suggested,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.train.loss == "ce" and config.eval.ks == [10, 20]


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 4\n  lr: 0.01\nmodel:\n  kind: bidirectional\n")
    config = load_config(
        path,
        [
            "train.epochs=3",
            "eval.ks=[5, 10]",
            "model.text_encoder=minilm",
            "train.use_gpu=true",
            "prepare.event_types=[view, buy]",
        ],
    )
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)  # override wins over YAML
    assert config.train.lr == 0.01  # YAML wins over default
    assert config.model.kind == "bidirectional"
    assert config.eval.ks == [5, 10]
    assert config.model.text_encoder == "minilm"
    assert config.train.use_gpu is True
    assert config.prepare.event_types == ["view", "buy"]
    assert config.train.batch_size == 128  # untouched default


def test_float_coercion(tmp_path):
    config = load_config(None, ["train.lr=1", "train.weight_decay=1e-4", "eval.promote_tolerance=0.5"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.weight_decay == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as text
    assert config.eval.promote_tolerance == 0.5
    assert load_config(write(tmp_path, "train:\n  lr: 2e-3\n")).train.lr == pytest.approx(2e-3)


def test_null_for_optional_field():
    config = load_config(None, ["model.text_encoder=minilm", "model.text_encoder=null"])
    assert config.model.text_encoder is None


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epochz=3", "train.epochz"),
        ("trian.epochs=3", "trian"),
        ("model.hidden=64", "model.hidden"),
    ],
)
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_a_replaced_key_names_its_replacement(tmp_path):
    """An older config's train.replay_share fails with one line that says what to write instead."""
    with pytest.raises(ValueError, match="'train.replay_share' is gone: use train.replay_ratio"):
        load_config(None, ["train.replay_share=0.1"])
    with pytest.raises(ValueError, match="use train.replay_ratio"):
        load_config(write(tmp_path, "train:\n  replay_share: 0.1\n"))
    assert load_config(None, ["train.replay_ratio=0.5"]).train.replay_ratio == 0.5


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'score.topk'"):
        load_config(write(tmp_path, "score:\n  topk: 5\n"))


@pytest.mark.parametrize(
    "override,where",
    [
        ("train.epochs=many", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.epochs=null", "train.epochs"),
        ("train.lr=fast", "train.lr"),
        ("train.use_gpu=3", "train.use_gpu"),
        ("eval.ks=10", "eval.ks"),
        ("eval.ks=[10, ten]", r"eval.ks\[1\]"),
        ("score.k=[1, 2]", "score.k"),
    ],
)
def test_wrong_type_is_an_error(override, where):
    with pytest.raises(ValueError, match=f"config {where}"):
        load_config(None, [override])


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(ValueError, match="config model.kind: expected str"):
        load_config(write(tmp_path, "model:\n  kind: 3\n"))
    with pytest.raises(ValueError, match="config train must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(ValueError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_malformed_override():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["train.epochs"])


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_dump_round_trip(tmp_path):
    config = load_config(None, ["train.epochs=2", "eval.ks=[1, 5]", "model.kind=bidirectional"])
    again = load_config(write(tmp_path, config.dumps()))
    assert again == config
    assert config_from_dict(yaml.safe_load(config.dumps())) == config
    assert config_json(again) == config_json(config)


def test_defaults_are_not_shared_between_configs():
    a = load_config(None, ["eval.ks=[1]"])
    assert Config().eval.ks == [10, 20]
    assert a.eval.ks == [1]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_repository_configs_load(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value


def test_there_are_repository_configs():
    assert CONFIGS, "configs/*.yaml is empty"


@pytest.mark.parametrize(
    "override",
    ["train.windows=everything", "train.lr_schedule=linear", "train.negatives=hard", "train.cold_items=null"],
)
def test_a_value_outside_its_choices_is_refused_when_read(override):
    with pytest.raises(ValueError, match=rf"config {override.split('=')[0]} must be one of"):
        load_config(overrides=[override])


def test_choices_are_kept_and_checked_for_configs_built_in_code():
    assert (
        load_config(overrides=["train.windows=newest", "train.lr_schedule=cosine"]).train.windows == "newest"
    )
    check_choices(TrainConfig(), "train")
    with pytest.raises(ValueError, match=r"train.windows must be one of \['all', 'newest'\]"):
        check_choices(TrainConfig(windows="some"), "train")


# Shapes of the benchmark files (seqrec.data.data_shape of their imported sequences).
S3REC_BEAUTY = DataShape(
    users=22363, items=12101, interactions=198502, length_p50=6.0, length_p95=21.0, length_max=204
)
ML_1M = DataShape(
    users=6040, items=3416, interactions=999611, length_p50=96.0, length_p95=556.0, length_max=2277
)
BERT4REC_BEAUTY = DataShape(
    users=40226, items=54542, interactions=353962, length_p50=6.0, length_p95=20.0, length_max=293
)


def test_suggestions_follow_the_measured_recipes_for_each_kind_of_data():
    beauty, ml = suggest(S3REC_BEAUTY), suggest(ML_1M)
    assert beauty == {
        "model.max_len": 50,
        "model.use_event_types": False,
        "model.num_layers": 1,
        "model.dropout": 0.2,
        "train.patience": 8,
        "train.weight_average": 0.99,
    }  # beauty.yaml, one member, with the weight average
    assert ml == {
        "model.max_len": 200,
        "model.use_event_types": False,
        "model.num_layers": 2,
        "model.dropout": 0.1,
        "train.patience": 10,
    }  # ml-1m.yaml, one member
    big = suggest(BERT4REC_BEAUTY)  # 54k items
    assert (big["train.loss"], big["train.negatives"], big["train.num_negatives"]) == (
        "sampled",
        "uniform",
        4096,
    )
    medium = DataShape(
        users=1000, items=400, interactions=30_000, length_p50=30, length_p95=60, length_max=90, event_types=4
    )
    assert suggest(medium) == {"model.max_len": 100}  # the defaults otherwise
    for suggestion in (beauty, ml, big):
        apply_overrides(Config(), suggestion)  # all valid config values


def test_suggestions_never_replace_what_the_user_set(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 3\ntrain:\n  epochs: 4\n")
    explicit = fields_set(path, ["model.dropout=0.4", "train.lr=0.01"])
    assert explicit == {"model.num_layers", "train.epochs", "model.dropout", "train.lr"}
    config = load_config(path, ["model.dropout=0.4", "train.lr=0.01"])
    changes = suggested(config, S3REC_BEAUTY, explicit)
    assert changes == {
        "model.max_len": 50,
        "model.use_event_types": False,
        "train.patience": 8,
        "train.weight_average": 0.99,
    }
    applied = apply_overrides(config, changes)
    assert (applied.model.num_layers, applied.model.dropout, applied.model.max_len) == (3, 0.4, 50)
    assert config.model.max_len == 200  # the original is untouched
    assert suggested(applied, S3REC_BEAUTY, explicit) == {}  # nothing left to change
    with pytest.raises(ValueError, match="train.lr_schedule"):
        apply_overrides(config, {"train.lr_schedule": "linear"})  # checked as files are
