"""Warm starts (the vocabulary grows, known items keep their rows, new ones start from text); the schedule."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import this_jobs_live_actors

from seqrec.artifact import Artifact
from seqrec.config import ModelConfig, PrepareConfig, TrainConfig
from seqrec.data import SEQUENCE_COLUMNS, Vocabulary, data_shape, longest, user_sample
from seqrec.evaluate import evaluation_rows
from seqrec.prepare import prepare, read_sequences
from seqrec.storage import Storage
from seqrec.synthetic import SyntheticSpec, write_synthetic
from seqrec.training import train
from seqrec.training.datasets import (
    BlockStats,
    EncodeSplit,
    SelectUsers,
    UserSelection,
    combine_stats,
    item_counts,
    make_datasets,
    merge_block_stats,
    read_sequences_dataset,
    rows_per_user,
    sequence_stats,
    stored_data_shape,
)
from seqrec.training.loop import lr_factor
from seqrec.training.warm_start import build_vocabulary, initial_model

MODEL = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_len=8, dropout=0.0)


def _parent() -> Artifact:
    vocab = Vocabulary(items=pa.array([10, 20, 30], pa.int64()), event_types=["view", "click"])
    return Artifact(version="v1", model=initial_model(vocab, MODEL, None, None), vocab=vocab)


def test_warm_start_keeps_known_rows_and_appends_new_items():
    parent = _parent()
    grown = parent.vocab.extend(pa.array([40, 10, 5], pa.int64()))
    assert grown.items.to_pylist() == [10, 20, 30, 5, 40]  # known indices unchanged
    model = initial_model(grown, MODEL, parent, None)
    old = parent.model.item_embedding.weight
    new = model.item_embedding.weight
    assert new.shape[0] == grown.num_items + 2
    torch.testing.assert_close(new[:4], old[:4])  # padding + the 3 known items
    torch.testing.assert_close(new[-1], old[-1])  # [MASK]
    for name, value in parent.model.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_new_items_start_from_their_text():
    parent = _parent()
    grown = parent.vocab.extend(pa.array([40], pa.int64()))
    text = torch.randn(grown.num_items + 2, 8)
    model = initial_model(grown, MODEL, parent, text)
    assert torch.count_nonzero(model.item_embedding.weight[4]) == 0  # id part zero: text alone
    expected = model.text_projection(text[4])
    torch.testing.assert_close(model.item_table()[4], expected)


def test_other_architecture_trains_from_scratch():
    parent = _parent()
    other = ModelConfig(hidden_size=32, num_layers=1, num_heads=1, max_len=8)
    model = initial_model(parent.vocab, other, parent, None)
    assert model.config.hidden_size == 32


def test_a_promoted_model_with_another_ensemble_size_is_not_warm_started_from():
    from dataclasses import replace

    parent = _parent()
    model = initial_model(parent.vocab, replace(MODEL, members=2), parent, None)
    assert (model.config.members, model.item_table().shape[1]) == (2, 32)
    assert not torch.equal(
        model.backbone.state_dict()["h.0.attn.c_attn.weight"],
        parent.model.backbone.state_dict()["h.0.attn.c_attn.weight"],
    )


def test_items_never_trained_on_start_from_text_and_stay_out_of_the_softmax():
    import numpy as np

    from seqrec.losses import full_ce
    from seqrec.training.cold_items import never_trained

    vocab = Vocabulary(
        items=pa.array([10, 20, 30], pa.int64()), event_types=["view"], counts=np.array([0, 5, 0, 2])
    )  # item 20 (index 2) never in training
    assert never_trained(vocab.counts).tolist() == [True, False, True, False]
    text = torch.randn(vocab.num_items + 2, 8)
    model = initial_model(vocab, MODEL, None, text)
    weight = model.item_embedding.weight
    assert torch.count_nonzero(weight[2]) == 0 and torch.count_nonzero(weight[1]) > 0
    assert torch.count_nonzero(weight[-1]) > 0  # [MASK] untouched
    without_text = initial_model(vocab, MODEL, None, None)
    assert torch.count_nonzero(without_text.item_embedding.weight[2]) > 0  # id-only: ordinary init

    # In the loss, an excluded item gets no gradient however high it scores.
    hidden = torch.randn(6, 16, requires_grad=True)
    table = model.item_table().detach()[: vocab.num_items + 1].clone().requires_grad_(True)
    labels = torch.tensor([1, 3, 1, 3, 1, 3])
    excluded = torch.from_numpy(never_trained(vocab.counts))
    loss = full_ce(hidden, labels, table, excluded=excluded)
    loss.backward()
    assert table.grad[2].abs().max() == 0 and table.grad[1].abs().max() > 0
    logits = hidden.detach() @ table.detach()[[1, 3]].T
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, (labels == 3).long()))


def test_only_items_without_an_id_row_are_placed_from_text():
    """Quiet tonight but learned before (a warm start kept the row): left alone; new: placed."""
    import numpy as np

    from seqrec.training.cold_items import without_id_rows

    parent = _parent()
    grown = parent.vocab.extend(pa.array([40], pa.int64()))
    grown.counts = np.array([0, 3, 0, 1, 0])  # 20 quiet tonight, 40 new
    model = initial_model(grown, MODEL, parent, torch.randn(grown.num_items + 2, 8))
    assert without_id_rows(model, grown.counts).tolist() == [True, False, False, False, True]


def test_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    factors = [lr_factor(step, warmup=2, total=10, schedule="cosine") for step in range(12)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[6] == pytest.approx(0.5) and factors[10:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # never rises again
    assert [lr_factor(step, 2, 10, "constant") for step in (0, 5, 50)] == [0.5, 1.0, 1.0]


# ============================================================================================
# Training input straight from storage, warm-start nights, budgets and progress (real Ray)
# ============================================================================================
DAYS = SyntheticSpec(num_users=300, num_items=80, mean_events=16, days=2, end_date="2024-03-02", bad_rows=0)
FIRST_DAY, SECOND_DAY = "2024-03-01", "2024-03-02"
SMALL = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_len=10, dropout=0.0)


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    """Sequences of two consecutive nights (the second extends the first) under one root."""
    storage = Storage(str(tmp_path_factory.mktemp("two-nights")))
    write_synthetic(storage, DAYS)
    # As in real logs, only some users are active on a given day: a third of them on the second.
    for path in storage.list_files("events", f"dt={SECOND_DAY}", suffix=".parquet"):
        events = pq.read_table(path)
        pq.write_table(events.filter(pc.equal(pc.bit_wise_and(events["user_id"], 3), 0)), path)
    prepare_config = PrepareConfig(max_len=30, buckets=4)  # few files: Ray Data's cost is per block
    prepare(storage, FIRST_DAY, prepare_config)
    prepare(storage, SECOND_DAY, prepare_config)
    return storage, prepare_config


@pytest.mark.parametrize("windows", [True, False])
def test_vocabulary_counts_and_rows_from_storage_equal_the_in_driver_computation(
    ray_local, two_nights, windows
):
    storage, prepare_config = two_nights
    table = read_sequences(storage, SECOND_DAY, columns=SEQUENCE_COLUMNS)
    expected_vocab = build_vocabulary(table, prepare_config, None)
    expected_counts = item_counts(table, expected_vocab)
    expected_rows = EncodeSplit(expected_vocab, SMALL.max_len, holdout=2, windows=windows)(table)

    # Small blocks and frequent compaction, so that the combining is exercised.
    source = read_sequences_dataset(storage, SECOND_DAY, SEQUENCE_COLUMNS, rows_per_block=40)
    blocks = source.map_batches(BlockStats(SMALL.max_len + 1, windows), batch_format="pyarrow", batch_size=40)
    stats = combine_stats(blocks, compact_every=2)
    # And as the stage computes them: several blocks' rows merged in Ray Data tasks first.
    merged = sequence_stats(source, SMALL.max_len + 1, windows)
    for stats in (stats, merged):
        vocab = build_vocabulary(stats.item_ids, prepare_config, None)
        assert vocab.items.equals(expected_vocab.items)
        assert stats.counts_by_index(vocab)[1:].tolist() == expected_counts[1:].tolist()
        assert (stats.users, stats.longest) == (table.num_rows, longest(table))
        assert stats.rows == len(expected_rows["items"]) and stats.changed_users == table.num_rows

    datasets = make_datasets(source, vocab, SMALL.max_len, stats.longest, windows=windows)
    streamed = np.concatenate([b["items"] for b in datasets["train"].iter_batches(batch_format="numpy")])
    assert sorted(map(tuple, streamed.tolist())) == sorted(map(tuple, expected_rows["items"].tolist()))


def test_merged_block_stats_equal_the_stats_of_one_block():
    """What the stats pass merges on the cluster before the driver sees it: three blocks' rows
    merged into one equal the stats of one block holding all their users."""
    table = pa.table(
        {
            "item_ids": [[1, 2, 3, 4], [2, 2, 5, 6, 7], [9, 1, 2, 8], [3, 3, 3, 3, 3, 3]],
            "event_types": [["view"] * 4, ["view"] * 5, ["view"] * 4, ["view"] * 6],
        }
    )
    stats = BlockStats(row_width=4, windows=True)
    parts = pa.concat_tables([stats(table.slice(0, 1)), stats(table.slice(1, 2)), stats(table.slice(3))])
    merged, whole = merge_block_stats(parts).to_pylist()[0], stats(table).to_pylist()[0]
    for row in (merged, whole):
        row["counts"] = dict(zip(row.pop("item_ids"), row["counts"]))
    assert merged == whole and whole["users"] == 4 and whole["counts"][3] == 4  # training part only


def test_block_stats_keep_text_item_ids_and_merge_the_replay_bins():
    """Item ids may be text (CONTRACTS.md); a warm night's blocks carry per-bin replay counts."""
    since = dt.datetime(2024, 3, 2, tzinfo=dt.UTC)
    old, new = dt.datetime(2024, 3, 1, tzinfo=dt.UTC), dt.datetime(2024, 3, 2, 5, tzinfo=dt.UTC)
    table = pa.table(
        {
            "user_id": ["u1", "u2", "u3"],
            "item_ids": [["a", "b", "c", "d"], ["b", "c", "e"], ["x", "y", "z", "a"]],
            "ts": [[old] * 4, [old, old, new], [old] * 4],
        }
    )
    stats = BlockStats(row_width=4, windows=True, selection=UserSelection(since, 1.0, "2024-03-02"))
    merged = merge_block_stats(pa.concat_tables([stats(table.slice(0, 2)), stats(table.slice(2))]))
    row = merged.to_pylist()[0]
    assert set(row["item_ids"]) == {"a", "b", "c", "d", "e", "x", "y", "z"}
    assert (row["users"], row["changed_users"], sum(row["replay_users"])) == (3, 1, 2)
    assert len(row["replay_users"]) == len(row["replay_rows"]) == 1024 and sum(row["replay_rows"]) == 2


def test_validation_during_training_uses_the_gates_hash_sample(ray_local, two_nights):
    """At a fraction < 1 the per-epoch validation rows are those of the users the evaluation stage
    samples (the same stable hash), so a million-user night validates on the gate's sample
    (``seqrec.evaluate.gate_sample_size``, passed by ``seqrec.candidate.train_candidate``)."""
    storage, prepare_config = two_nights
    table = read_sequences(storage, SECOND_DAY, columns=SEQUENCE_COLUMNS)
    vocab = build_vocabulary(table, prepare_config, None)
    source = read_sequences_dataset(storage, SECOND_DAY, SEQUENCE_COLUMNS)

    def validation_rows(fraction: float) -> int:
        datasets = make_datasets(source, vocab, SMALL.max_len, longest(table), validation_fraction=fraction)
        return sum(len(b["items"]) for b in datasets["val"].iter_batches(batch_format="numpy"))

    users = table.filter(pa.array(user_sample(table["user_id"], 0.3)))
    expected = len(evaluation_rows(users, vocab, SMALL.max_len, 1, longest(table))["items"])
    assert 0 < validation_rows(0.3) == expected < validation_rows(1.0)


def test_the_data_shape_from_storage_equals_the_in_driver_one(ray_local, two_nights):
    """What ``seqrec nightly`` suggests settings from, computed by Ray Data tasks, not the driver."""
    storage, _ = two_nights
    table = read_sequences(storage, SECOND_DAY, columns=SEQUENCE_COLUMNS)
    shape = stored_data_shape(storage, SECOND_DAY)
    assert shape == data_shape(table)
    assert shape.users == 300 and shape.event_types > 1


def _changed_users(storage: Storage) -> set:
    table = read_sequences(storage, SECOND_DAY, columns=["user_id", "ts"])
    start = dt.datetime(2024, 3, 2, tzinfo=dt.UTC)
    return {row["user_id"] for row in table.to_pylist() if row["ts"] and max(row["ts"]) >= start}


def test_warm_start_selects_users_with_new_events_plus_a_replay_sample(ray_local, two_nights):
    storage, _ = two_nights
    changed = _changed_users(storage)
    users = read_sequences(storage, SECOND_DAY, columns=["user_id"]).num_rows
    assert 0 < len(changed) < users
    source = read_sequences_dataset(storage, SECOND_DAY, [*SEQUENCE_COLUMNS, "ts"])
    since = dt.datetime(2024, 3, 2, tzinfo=dt.UTC)
    stats = sequence_stats(source, SMALL.max_len + 1, True, UserSelection(since, 0.0, SECOND_DAY))
    threshold, plain = stats.replay_cut(0.0)
    assert (plain.changed_users, plain.replayed_users, plain.users, threshold) == (
        len(changed),
        0,
        users,
        0.0,
    )

    def selected(threshold: float) -> pa.Table:
        selection = UserSelection(since, 0.5, SECOND_DAY, replay_below=threshold)
        batches = source.map_batches(SelectUsers(selection), batch_format="pyarrow")
        return pa.concat_tables(batches.iter_batches(batch_size=None, batch_format="pyarrow"))

    assert set(selected(threshold)["user_id"].to_pylist()) == changed
    # Replay is sized by the news: about half as many others as changed users at ratio 0.5, and
    # the stats pass's counts of users and rows are exactly what the training input then holds.
    threshold, half = stats.replay_cut(0.5)
    chosen = selected(threshold)
    assert abs(half.replayed_users - 0.5 * len(changed)) <= 2 and half.changed_users == len(changed)
    assert chosen.num_rows == len(changed) + half.replayed_users
    assert changed < set(chosen["user_id"].to_pylist())
    vocab = build_vocabulary(chosen.column("item_ids").combine_chunks().flatten(), PrepareConfig(), None)
    assert half.rows == len(EncodeSplit(vocab, SMALL.max_len, holdout=2, windows=True)(chosen)["items"])
    # Another night (salt), another sample of the same size.
    other = sequence_stats(source, SMALL.max_len + 1, True, UserSelection(since, 0.5, "2024-03-03"))
    threshold_other, other_half = other.replay_cut(0.5)
    again = UserSelection(since, 0.5, "2024-03-03", replay_below=threshold_other)
    other_chosen = pa.concat_tables(
        source.map_batches(SelectUsers(again), batch_format="pyarrow").iter_batches(
            batch_size=None, batch_format="pyarrow"
        )
    )
    assert set(other_chosen["user_id"].to_pylist()) != set(chosen["user_id"].to_pylist())
    assert abs(other_half.replayed_users - half.replayed_users) <= 4


@pytest.mark.parametrize("windows", [True, False])
def test_rows_per_user_is_what_encoding_makes_of_each_user(windows):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, 300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    table = pa.table(
        {
            "item_ids": pa.ListArray.from_arrays(
                pa.array(offsets, pa.int32()), pa.array(rng.integers(1, 50, lengths.sum()))
            ),
        }
    )
    vocab = build_vocabulary(pa.array(np.arange(1, 50)), PrepareConfig(), None)
    per_user = rows_per_user(offsets, 11, windows)
    for user in (0, 7, 123, 299):
        one = EncodeSplit(vocab, 10, holdout=2, windows=windows)(table.slice(user, 1))
        assert per_user[user] == len(one["items"])
    assert per_user.sum() == len(EncodeSplit(vocab, 10, holdout=2, windows=windows)(table)["items"])


def test_a_warm_night_validates_on_everyone_when_it_trains_on_few(ray_local, two_nights):
    """Validation rows: of the selected users by default; of every user with validate_selected=False
    (what training does where fewer than eval.min_users of the gate's sample are trained on)."""
    storage, prepare_config = two_nights
    table = read_sequences(storage, SECOND_DAY, columns=SEQUENCE_COLUMNS)
    vocab = build_vocabulary(table, prepare_config, None)
    source = read_sequences_dataset(storage, SECOND_DAY, [*SEQUENCE_COLUMNS, "ts"])
    selection = UserSelection(dt.datetime(2024, 3, 2, tzinfo=dt.UTC), 0.0, SECOND_DAY)

    def validation_rows(validate_selected: bool) -> int:
        datasets = make_datasets(
            source,
            vocab,
            SMALL.max_len,
            longest(table),
            selection=selection,
            validate_selected=validate_selected,
        )
        return sum(len(b["items"]) for b in datasets["val"].iter_batches(batch_format="numpy"))

    everyone = len(evaluation_rows(table, vocab, SMALL.max_len, 1, longest(table))["items"])
    assert 0 < validation_rows(True) < validation_rows(False) == everyone


def test_a_warm_start_night_trains_on_changed_users_and_stops_at_the_step_budget(ray_local, two_nights):
    storage, prepare_config = two_nights
    first = read_sequences(storage, FIRST_DAY, columns=SEQUENCE_COLUMNS)
    parent_vocab = build_vocabulary(first, prepare_config, None)
    parent = Artifact(
        version="v-first",
        model=initial_model(parent_vocab, SMALL, None, None),
        vocab=parent_vocab,
        manifest={"training_data": storage.uri("sequences", f"dt={FIRST_DAY}")},
    )
    train_config = TrainConfig(
        num_workers=2,
        cpus_per_worker=0.5,
        epochs=5,
        batch_size=32,
        max_steps=3,
        replay_ratio=0.5,
        mixed_precision="no",
        log_every_s=0.0,
    )
    result = train(
        storage,
        SECOND_DAY,
        model_config=SMALL,
        train_config=train_config,
        prepare_config=prepare_config,
        run_name=f"warm-{time.time_ns()}",
        parent=parent,
    )
    changed = _changed_users(storage)
    assert result.changed_users == len(changed) and result.replayed_users > 0
    assert result.users == len(changed) + result.replayed_users
    assert result.users < read_sequences(storage, SECOND_DAY, columns=["user_id"]).num_rows
    assert result.selection.startswith("warm start") and result.stop_reason == "max_steps"
    assert len(result.history) == 1 and "val_ndcg@10" in result.history[0]  # validated when it stopped
    assert result.vocab.items.to_pylist()[: parent_vocab.num_items] == parent_vocab.items.to_pylist()
    summary = result.summary()
    assert summary["rows"] == result.rows > 0 and summary["stop_reason"] == "max_steps"


def test_a_cold_night_from_storage_trains_everyone_and_rank_zero_logs_progress(ray_local, two_nights, caplog):
    storage, prepare_config = two_nights
    caplog.set_level("INFO", logger="seqrec.training")
    train_config = TrainConfig(
        num_workers=2, cpus_per_worker=0.5, epochs=1, batch_size=32, mixed_precision="no", log_every_s=0.0
    )
    run_name = f"cold-{time.time_ns()}"
    import ray

    worker_env: list[dict[str, str]] = []
    watcher = threading.Thread(target=_read_train_worker_env, args=(ray, worker_env), daemon=True)
    watcher.start()
    # The handler before the run: Python's default in a foreground shell, SIG_IGN in a background job.
    sigint_before = signal.getsignal(signal.SIGINT)
    result = train(
        storage,
        SECOND_DAY,
        model_config=SMALL,
        train_config=train_config,
        prepare_config=prepare_config,
        run_name=run_name,
    )
    watcher.join(timeout=5)
    # The workers run with a small oneDNN primitive cache (a cache entry per loss shape grew each
    # worker by ~1.5 GiB over an epoch at 100k users, see benchmarks/README.md).
    assert worker_env and worker_env[0].get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == "64", worker_env
    users = read_sequences(storage, SECOND_DAY, columns=["user_id"]).num_rows
    assert (result.users, result.replayed_users, result.stop_reason) == (users, 0, "epochs")
    assert result.selection.startswith("all users")
    # The driver's line: what is trained on, and that validation covers every user here.
    assert any(
        f"on {users} of {users} users" in r.getMessage() and "validation on all of them" in r.getMessage()
        for r in caplog.records
    ), [r.msg for r in caplog.records]

    # Workers' stderr reaches the driver through Ray's log files (the tests' Ray does not forward it).
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = [
        line
        for f in logs.rglob("*")
        if f.is_file() and f.suffix in (".err", ".out", ".log")
        for line in f.read_text(errors="replace").splitlines()
        if "seqrec.training" in line
    ]
    steps = -(-result.rows // 32)
    assert any(
        f"epoch 1/1 step 1/{steps} " in line and "rows/s" in line and "epoch ETA" in line for line in lines
    ), lines[-20:]
    assert any("epoch 1/1 validated: train loss" in line for line in lines), lines[-20:]

    # The run's controller and dataset actors exit with it, and are not carried through a night's
    # evaluation and scoring: fit() installs a SIGINT handler that holds them until it is replaced.
    deadline = time.time() + 30
    while _alive_run_actors(ray) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive_run_actors(ray)
    assert signal.getsignal(signal.SIGINT) is sigint_before


RUN_ACTORS = {"TrainController", "DatasetManager", "SplitCoordinator"}


def _read_train_worker_env(ray, found: list[dict[str, str]], timeout_s: float = 120.0) -> None:
    """The environment of a live Ray Train worker of this session's job, read from /proc."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        actors = this_jobs_live_actors(ray)
        for pid in [a["Pid"] for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]:
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            found.append(dict(v.split("=", 1) for v in raw.decode(errors="replace").split("\0") if "=" in v))
            return
        time.sleep(0.2)


def _alive_run_actors(ray) -> list[str]:
    """Class names of this test session's live Ray Train controller and training dataset actors."""
    names = [a["ActorClassName"] for a in this_jobs_live_actors(ray)]
    return sorted(name for name in names if name in RUN_ACTORS)


def test_progress_line_and_step_budget():
    from seqrec.training.loop import Budget, progress_line

    line = progress_line(0, 3, 50, 200, 1234.4, 3725)
    assert line == "epoch 1/3 step 50/200 1,234 rows/s epoch ETA 1:02:05"
    budget = Budget(TrainConfig(max_steps=3), steps_done=1)
    assert [budget.spent() for _ in range(2)] == ["", "max_steps"]
    assert Budget(TrainConfig(), steps_done=0).spent() == ""


def test_the_train_function_module_needs_no_model_code():
    """A worker unpickles the train function, importing its module: that must not pull in
    transformers (seconds per worker, before the first batch was asked for)."""
    import subprocess
    import sys

    code = "import sys, seqrec.training.worker; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_first_batch_is_asked_for_on_a_thread_and_every_batch_arrives_in_order():
    from seqrec.training.worker import Prefetched

    asked_from: list[str] = []
    released = threading.Event()

    def batches():
        for i in range(4):
            asked_from.append(threading.current_thread().name)
            if i == 0:
                released.set()
            yield {"i": i}

    prefetched = Prefetched(batches())
    assert released.wait(5)  # fetched before anyone iterates
    assert [b["i"] for b in prefetched] == [0, 1, 2, 3]
    assert asked_from[0] == "seqrec-first-batch" and set(asked_from[1:]) == {threading.main_thread().name}
    assert list(Prefetched(iter([]))) == []

    def failing():
        raise OSError("the split coordinator died")
        yield  # a generator

    with pytest.raises(OSError, match="coordinator died"):
        list(Prefetched(failing()))


def test_the_controller_poll_interval_is_set_for_the_run_only_and_a_jobs_own_value_kept(monkeypatch):
    import os

    from seqrec.training.driver import CONTROLLER_POLL_S, controller_poll_interval

    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(key, raising=False)
    with controller_poll_interval():
        assert os.environ[key] == CONTROLLER_POLL_S
    assert key not in os.environ
    monkeypatch.setenv(key, "3")
    with controller_poll_interval():
        assert os.environ[key] == "3"
    assert os.environ[key] == "3"
