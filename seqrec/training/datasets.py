"""Training rows for the workers: sequences -> fixed-width index rows, streamed by Ray Data.

Leave-one-out: a user's last item is the test target and the second-to-last the validation target;
training rows hold neither (``holdout=2``), validation rows end on the second-to-last item.

The stage reads ``sequences/dt=D`` from storage with Ray Data (:func:`read_sequences_dataset`). One
pass of :class:`BlockStats` over the blocks yields, per block, its distinct items with their
training counts and the numbers of users and rows; the driver adds these up
(:func:`combine_stats`): catalogue-sized, never user-sized. The encoded rows then stream to the
workers, re-read each epoch, so neither the driver nor the object store holds all of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from seqrec.config import DataShape
from seqrec.data import Vocabulary, encode, evaluation_rows, list_parts, longest, sampled, window_index
from seqrec.errors import InputError
from seqrec.storage import Storage, read_parquet_batches

ENCODE_BATCH_ROWS = 4096
# A stats row holds its block's distinct items (up to the whole catalogue): rows are merged this
# many at a time in Ray Data tasks before the driver adds them up. Without it, 1M users and 100k
# items sent the driver 244 catalogue-sized rows, +264 MiB at its peak; with it +7 MiB.
STATS_ROWS_PER_MERGE = 16
TRAINING_HOLDOUT = 2  # test and validation targets
VALIDATION_HOLDOUT = 1
MIN_TRAINING_LEN = 2  # a row needs an input and a label
# Ray Data tasks of the input pipeline reserve no CPU: they run beside training workers that hold
# every CPU of a small node (a task that waits for a free CPU there waits forever), and their
# vectorised encoding costs little next to a training step.
INPUT_TASK_CPUS = 0.0
# The names of the datasets Ray Train hands the workers (ray.train.get_dataset_shard).
TRAIN_SHARD = "train"
VALIDATION_SHARD = "val"


class EncodeSplit:
    """Ray Data batch function: sequences -> fixed-width training rows.

    ``holdout`` newest items are removed first (2 for training). Rows have ``width + 1`` columns
    (inputs and shifted labels); with ``windows`` a longer history gives one row per window
    (:func:`seqrec.data.window_index`). Validation rows come from :func:`seqrec.data.evaluation_rows`.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        width: int,
        holdout: int,
        min_len: int = MIN_TRAINING_LEN,
        windows: bool = False,
    ):
        self.vocab, self.width, self.holdout = vocab, width, holdout
        self.min_len, self.windows = min_len, windows

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        enc = encode(batch, self.vocab, self.width + 1, drop_last=self.holdout, windows=self.windows)
        keep = enc.lengths >= self.min_len
        return {"items": enc.items[keep], "event_types": enc.event_types[keep]}


def item_counts(sequences: pa.Table, vocab: Vocabulary, holdout: int = TRAINING_HOLDOUT) -> np.ndarray:
    """Interactions per vocabulary index in the training part (for popularity and log-q)."""
    enc = encode(sequences.select(["item_ids"]), vocab, width=max(longest(sequences), 1), drop_last=holdout)
    return np.bincount(enc.items.ravel(), minlength=vocab.num_items + 1).astype(np.int64)


def rows_per_user(
    offsets: np.ndarray,
    row_width: int,
    windows: bool,
    holdout: int = TRAINING_HOLDOUT,
    min_len: int = MIN_TRAINING_LEN,
) -> np.ndarray:
    """(users,) how many rows :class:`EncodeSplit` makes of each sequence with these list ``offsets``.

    Every item of tonight's sequences is in tonight's vocabulary, so lengths alone decide.
    """
    users = len(offsets) - 1
    if windows:
        index, window_offsets = window_index(offsets, row_width, holdout)
        long_enough = np.diff(window_offsets) >= min_len
        first_value = index[window_offsets[:-1][long_enough]]  # each kept window's oldest value
        owner = np.searchsorted(offsets, first_value, side="right") - 1
        return np.bincount(owner, minlength=users).astype(np.int64)
    lengths = np.maximum(np.diff(offsets) - holdout, 0)
    return (np.minimum(lengths, row_width) >= min_len).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Which users a night trains on
# --------------------------------------------------------------------------------------------
def unit_hash(values: pa.Array | pa.ChunkedArray, salt: str) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per value (user id), the same on every machine.

    pandas' fixed-key hash of the id (as the gate's sample, :func:`seqrec.data.user_sample`), mixed
    with the salt by SplitMix64's finaliser, so that each salt (night) draws another sample.
    Vectorised: 1M ids in milliseconds, where a blake2b per id took 0.77 s, three times a warm night.
    """
    key = np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little"))
    z = pd.util.hash_array(values.to_numpy(zero_copy_only=False)) ^ key
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# The replay sample is cut at a multiple of 1/REPLAY_BINS of the hash range, chosen after the stats
# pass has counted the users (and their rows) in each bin: the sample's size and rows are then known
# exactly before training, in the same single pass.
REPLAY_BINS = 1024


@dataclass
class UserSelection:
    """A warm-start night's training users: those with events since the parent's training data, plus
    a replay sample of the others, ``replay_ratio`` replayed users per user with new events (a
    different sample each night, ``salt``), so that fine-tuning on the news does not forget everyone
    else, while the night's cost follows its news and not the size of the user base.

    ``replay_below`` is the hash threshold of the sample, set from the stats pass's counts
    (:meth:`SequenceStats.replay_cut`); until then nobody is replayed.
    """

    since: dt.datetime  # events at or after this are new to the parent
    replay_ratio: float
    salt: str
    replay_below: float = 0.0

    def changed(self, batch: pa.Table) -> np.ndarray:
        """bool per user of ``batch`` (needs ``ts``): has events at or after ``since``."""
        flat_ts, offsets = list_parts(batch["ts"])
        lengths = np.diff(offsets)
        newest = np.full(len(lengths), np.iinfo(np.int64).min)
        has = lengths > 0
        stamps = pc.cast(flat_ts, pa.timestamp("us", tz="UTC")).cast(pa.int64())
        stamps = stamps.to_numpy(zero_copy_only=False)
        newest[has] = stamps[offsets[1:][has] - 1]  # lists are oldest first
        return newest >= int(self.since.timestamp() * 1_000_000)

    def masks(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(changed, replayed) bool per user of ``batch`` (needs ``user_id`` and ``ts``)."""
        changed = self.changed(batch)
        replayed = ~changed & (unit_hash(batch["user_id"], self.salt) < self.replay_below)
        return changed, replayed


class SelectUsers:
    """Ray Data batch function: only the selected users' sequences."""

    def __init__(self, selection: UserSelection):
        self.selection = selection

    def __call__(self, batch: pa.Table) -> pa.Table:
        changed, replayed = self.selection.masks(batch)
        return batch.filter(pa.array(changed | replayed))


# --------------------------------------------------------------------------------------------
# One pass for the vocabulary, the counts and the plan
# --------------------------------------------------------------------------------------------
class BlockStats:
    """Ray Data batch function: one row per block with its distinct items, their interactions in
    the training part, its users, and the users and training rows to train on: all users on a full
    night; with a ``selection``, the changed users, and the others counted by replay-hash bin
    (``REPLAY_BINS``), from which the driver cuts the replay sample (:meth:`SequenceStats.replay_cut`)."""

    def __init__(self, row_width: int, windows: bool, selection: UserSelection | None = None):
        self.row_width, self.windows, self.selection = row_width, windows, selection

    def __call__(self, batch: pa.Table) -> pa.Table:
        flat, offsets = list_parts(batch["item_ids"])
        lengths = np.diff(offsets)
        position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
        in_training = position < np.repeat(lengths - TRAINING_HOLDOUT, lengths)
        per_item = (
            pa.table({"item_id": flat, "count": pa.array(in_training.astype(np.int64))})
            .group_by("item_id")
            .aggregate([("count", "sum")])
        )
        rows = rows_per_user(offsets, self.row_width, self.windows)
        replay_users = replay_rows = np.zeros(0, np.int64)
        if self.selection is not None:
            changed = self.selection.changed(batch)
            others = ~changed
            # A unit hash is below 1, so its bin is below REPLAY_BINS; bin < k <=> hash < k / REPLAY_BINS.
            hashes = unit_hash(batch["user_id"].filter(pa.array(others)), self.selection.salt)
            bins = (hashes * REPLAY_BINS).astype(np.int64)
            replay_users = np.bincount(bins, minlength=REPLAY_BINS).astype(np.int64)
            replay_rows = np.bincount(bins, weights=rows[others], minlength=REPLAY_BINS).astype(np.int64)
        else:
            changed = np.ones(len(lengths), bool)
        ids = pa.ListArray.from_arrays(
            pa.array([0, per_item.num_rows], pa.int32()), per_item["item_id"].combine_chunks()
        )
        counts = pa.ListArray.from_arrays(
            pa.array([0, per_item.num_rows], pa.int32()),
            per_item["count_sum"].combine_chunks().cast(pa.int64()),
        )
        return pa.table(
            {
                "item_ids": ids,
                "counts": counts,
                "users": [len(lengths)],
                "longest": [int(lengths.max()) if len(lengths) else 0],
                "changed_users": [int(changed.sum())],
                "rows": [int(rows[changed].sum())],
                "replay_users": _bins(replay_users),
                "replay_rows": _bins(replay_rows),
            }
        )


def _bins(counts: np.ndarray) -> pa.ListArray:
    """One row holding per-bin counts (empty on a full night), typed so that every block's agree."""
    return pa.array([counts], pa.list_(pa.int64()))


def _bin_sums(column: pa.ChunkedArray) -> np.ndarray:
    """Rows of equal-length int64 lists (or all empty) -> their element-wise sum."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1).sum(axis=0).astype(np.int64) if len(flat) else np.zeros(0, np.int64)


def merge_block_stats(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: :class:`BlockStats` rows added up into one (interactions summed by
    item), so that few catalogue-sized rows reach the driver (see STATS_ROWS_PER_MERGE)."""
    per_item = (
        pa.table({"item_id": pc.list_flatten(batch["item_ids"]), "count": pc.list_flatten(batch["counts"])})
        .group_by("item_id")
        .aggregate([("count", "sum")])
    )
    offsets = pa.array([0, per_item.num_rows], pa.int32())
    return pa.table(
        {
            "item_ids": pa.ListArray.from_arrays(offsets, per_item["item_id"].combine_chunks()),
            "counts": pa.ListArray.from_arrays(offsets, per_item["count_sum"].combine_chunks()),
            "users": [int(pc.sum(batch["users"]).as_py() or 0)],
            "longest": [int(pc.max(batch["longest"]).as_py() or 0)],
            "changed_users": [int(pc.sum(batch["changed_users"]).as_py() or 0)],
            "rows": [int(pc.sum(batch["rows"]).as_py() or 0)],
            "replay_users": _bins(_bin_sums(batch["replay_users"])),
            "replay_rows": _bins(_bin_sums(batch["replay_rows"])),
        }
    )


@dataclass
class SequenceStats:
    item_ids: pa.Array  # every distinct item of the night's sequences
    counts: np.ndarray  # their interactions in the training part, aligned
    users: int  # users in the sequences
    longest: int  # longest history
    changed_users: int  # users trained on because of new events (all on a full night)
    rows: int  # training rows of the users trained on
    replayed_users: int = 0  # users trained on as replay (warm-start nights, after replay_cut)
    # Warm-start nights: the users without new events, and their rows, by replay-hash bin.
    replay_users_by_bin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    replay_rows_by_bin: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def counts_by_index(self, vocab: Vocabulary) -> np.ndarray:
        """(N+1,) interactions per vocabulary index (0 for padding and for items absent tonight)."""
        counts = np.zeros(vocab.num_items + 1, dtype=np.int64)
        index = vocab.lookup(self.item_ids)
        counts[index[index > 0]] = self.counts[index > 0]
        return counts

    def replay_cut(self, ratio: float) -> tuple[float, SequenceStats]:
        """The replay sample closest to ``ratio`` x the changed users, in whole hash bins: its hash
        threshold (for :class:`UserSelection`) and these stats with its users and rows added."""
        if not len(self.replay_users_by_bin):
            return 0.0, self
        users = np.concatenate([[0], np.cumsum(self.replay_users_by_bin)])
        rows = np.concatenate([[0], np.cumsum(self.replay_rows_by_bin)])
        bins = int(np.argmin(np.abs(users - ratio * self.changed_users)))  # first such: fewest users
        cut = dataclasses.replace(self, replayed_users=int(users[bins]), rows=self.rows + int(rows[bins]))
        return bins / REPLAY_BINS, cut


def combine_stats(blocks: ray.data.Dataset, compact_every: int = 32) -> SequenceStats:
    """Add up :class:`BlockStats` rows in the driver, compacting items as it goes (catalogue-sized)."""
    pending: list[pa.Table] = []
    users = longest_seen = changed = rows = 0
    replay_users = replay_rows = np.zeros(0, np.int64)

    def compact(tables: list[pa.Table]) -> pa.Table:
        merged = pa.concat_tables(tables)
        return merged.group_by("item_id").aggregate([("count", "sum")]).rename_columns(["item_id", "count"])

    def add(total: np.ndarray, more: np.ndarray) -> np.ndarray:  # every block has 0 or REPLAY_BINS bins
        return total + more if len(total) else more

    for batch in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(batch.num_rows):
            pending.append(
                pa.table({"item_id": batch["item_ids"][i].values, "count": batch["counts"][i].values})
            )
        users += int(pc.sum(batch["users"]).as_py() or 0)
        longest_seen = max(longest_seen, int(pc.max(batch["longest"]).as_py() or 0))
        changed += int(pc.sum(batch["changed_users"]).as_py() or 0)
        rows += int(pc.sum(batch["rows"]).as_py() or 0)
        replay_users = add(replay_users, _bin_sums(batch["replay_users"]))
        replay_rows = add(replay_rows, _bin_sums(batch["replay_rows"]))
        if len(pending) >= compact_every:
            pending = [compact(pending)]
    if not pending:
        raise ValueError("the sequences hold no users")
    items = compact(pending)
    return SequenceStats(
        item_ids=items["item_id"].combine_chunks(),
        counts=items["count"].to_numpy().astype(np.int64),
        users=users,
        longest=longest_seen,
        changed_users=changed,
        rows=rows,
        replay_users_by_bin=replay_users,
        replay_rows_by_bin=replay_rows,
    )


class ShapeStats:
    """Ray Data batch function: one row per block with its users' history lengths, its distinct
    items and its distinct event types (the inputs of :func:`stored_data_shape`)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        flat, offsets = list_parts(batch["item_ids"])
        items = pc.unique(flat)
        types = pa.array([], pa.string())
        if "event_types" in batch.column_names:
            types = pc.unique(list_parts(batch["event_types"])[0]).cast(pa.string())
        return pa.table(
            {
                "lengths": [np.diff(offsets).astype(np.int32)],
                "item_ids": pa.ListArray.from_arrays(pa.array([0, len(items)], pa.int32()), items),
                "event_types": pa.ListArray.from_arrays(pa.array([0, len(types)], pa.int32()), types),
            }
        )


def merge_shape_stats(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: :class:`ShapeStats` rows merged into one (lengths concatenated,
    items and event types made distinct again), as :func:`merge_block_stats` does for training."""

    def one(values: pa.Array) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)

    return pa.table(
        {
            "lengths": one(pc.list_flatten(batch["lengths"]).combine_chunks()),
            "item_ids": one(pc.unique(pc.list_flatten(batch["item_ids"]))),
            "event_types": one(pc.unique(pc.list_flatten(batch["event_types"]))),
        }
    )


def stored_data_shape(storage: Storage, date: str) -> DataShape:
    """:func:`seqrec.data.data_shape` of ``sequences/dt=date``, computed on the cluster.

    Ray Data tasks reduce each block to its history lengths and distinct items; the driver holds
    one int32 per user and the catalogue, never the sequences.
    """
    blocks = (
        read_sequences_dataset(storage, date, ["item_ids", "event_types"])
        .map_batches(
            ShapeStats(), batch_format="pyarrow", batch_size=ENCODE_BATCH_ROWS, num_cpus=INPUT_TASK_CPUS
        )
        .map_batches(
            merge_shape_stats,
            batch_format="pyarrow",
            batch_size=STATS_ROWS_PER_MERGE,
            num_cpus=INPUT_TASK_CPUS,
        )
    )
    lengths: list[np.ndarray] = []
    items: list[pa.Array] = []
    types: set[str] = set()
    for batch in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
        lengths += [np.asarray(v.values, dtype=np.int32) for v in batch["lengths"].combine_chunks()]
        items.append(pc.list_flatten(batch["item_ids"]).combine_chunks())
        types.update(v for v in pc.list_flatten(batch["event_types"]).to_pylist() if v is not None)
        if len(items) >= 32:
            items = [pc.unique(pa.concat_arrays(items))]
    every = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    p50, p95 = np.percentile(every, [50, 95]) if len(every) else (0.0, 0.0)
    return DataShape(
        users=len(every),
        items=len(pc.unique(pa.concat_arrays(items))) if items else 0,
        interactions=int(every.sum(dtype=np.int64)),
        length_p50=float(p50),
        length_p95=float(p95),
        length_max=int(every.max(initial=0)),
        event_types=max(len(types), 1),
    )


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def read_sequences_dataset(
    storage: Storage, date: str, columns: list[str], rows_per_block: int = ENCODE_BATCH_ROWS
) -> ray.data.Dataset:
    """``sequences/dt=date`` as a Ray dataset of ``columns``, read ``rows_per_block`` users at a time
    (:func:`seqrec.storage.read_parquet_batches`: bounded memory per read task, as scoring reads)."""
    files = storage.list_files("sequences", f"dt={date}", suffix=".parquet")
    if not files:
        raise InputError(
            f"no sequences for {date} under {storage.uri('sequences')}; run `seqrec prepare --date {date}`"
        )
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_parquet_batches,
        fn_kwargs=dict(root=storage.root, rows=rows_per_block, columns=columns),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=INPUT_TASK_CPUS,
    )


def table_dataset(sequences: pa.Table, columns: list[str]) -> ray.data.Dataset:
    """An in-memory table (tests, benchmarks) as the same kind of dataset, in blocks of users."""
    present = [c for c in columns if c in sequences.column_names]
    blocks = max(1, -(-sequences.num_rows // ENCODE_BATCH_ROWS))
    return ray.data.from_arrow(
        [sequences.select(present).slice(i * ENCODE_BATCH_ROWS, ENCODE_BATCH_ROWS) for i in range(blocks)]
    )


def sequence_stats(
    source: ray.data.Dataset, row_width: int, windows: bool, selection: UserSelection | None = None
) -> SequenceStats:
    blocks = source.map_batches(
        BlockStats(row_width, windows, selection),
        batch_format="pyarrow",
        batch_size=ENCODE_BATCH_ROWS,
        num_cpus=INPUT_TASK_CPUS,
    ).map_batches(
        merge_block_stats, batch_format="pyarrow", batch_size=STATS_ROWS_PER_MERGE, num_cpus=INPUT_TASK_CPUS
    )
    return combine_stats(blocks)


def make_datasets(
    source: ray.data.Dataset,
    vocab: Vocabulary,
    max_len: int,
    longest_history: int,
    windows: bool = False,
    selection: UserSelection | None = None,
    validation_fraction: float = 1.0,
    validate_selected: bool = True,
) -> dict[str, ray.data.Dataset]:
    """``{"train": training rows, "val": validation rows}`` of the selected users, streamed (lazy).

    ``validation_fraction`` < 1: validation rows of the users in the gate's hash sample only
    (:func:`seqrec.data.sampled`; the same users the evaluation stage judges at the same fraction).
    ``validate_selected=False``: validation rows of every user, selected or not.
    """
    everyone = source
    if selection is not None:
        source = source.map_batches(
            SelectUsers(selection),
            batch_format="pyarrow",
            batch_size=ENCODE_BATCH_ROWS,
            num_cpus=INPUT_TASK_CPUS,
        )
    validation_source = source if validate_selected else everyone
    if validation_fraction < 1.0:
        validation_source = validation_source.map_batches(
            sampled,
            fn_kwargs={"fraction": validation_fraction},
            batch_format="pyarrow",
            batch_size=ENCODE_BATCH_ROWS,
            num_cpus=INPUT_TASK_CPUS,
        )
    # A projection is a Ray Data task too: without num_cpus it waits for a CPU the workers hold.
    columns = ["item_ids", "event_types"]
    source = source.select_columns(columns, num_cpus=INPUT_TASK_CPUS)
    validation_source = validation_source.select_columns(columns, num_cpus=INPUT_TASK_CPUS)
    training_rows = source.map_batches(
        EncodeSplit(vocab, max_len, holdout=TRAINING_HOLDOUT, windows=windows),
        batch_format="pyarrow",
        batch_size=ENCODE_BATCH_ROWS,
        num_cpus=INPUT_TASK_CPUS,
    )
    validation_rows = validation_source.map_batches(
        evaluation_rows,
        fn_kwargs={
            "vocab": vocab,
            "width": max_len,
            "holdout": VALIDATION_HOLDOUT,
            "seen_width": max(longest_history - VALIDATION_HOLDOUT, 1),
        },
        batch_format="pyarrow",
        batch_size=ENCODE_BATCH_ROWS,
        num_cpus=INPUT_TASK_CPUS,
    )
    return {TRAIN_SHARD: training_rows, VALIDATION_SHARD: validation_rows}


def placement_sample(source: ray.data.Dataset, users: int, size: int, seed: int) -> pa.Table:
    """At most about ``size`` users' ``item_ids``/``event_types``, sampled at random from ``source``."""
    sampled = source.select_columns(["item_ids", "event_types"], num_cpus=INPUT_TASK_CPUS)
    if users > size:
        sampled = sampled.random_sample(min(1.0, 1.2 * size / users), seed=seed).limit(size)
    tables = list(sampled.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(tables) if tables else pa.table({"item_ids": [], "event_types": []})
