"""seqrec.data: the item vocabulary and the left-padded index arrays the model reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from seqrec.data import Vocabulary, encode, left_pad, list_parts, window_index

TYPES = ["view", "click", "cart"]


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------
def test_build_int_ids_sorted_unique():
    vocab = Vocabulary.build(pa.chunked_array([pa.array([30, 10, 20]), pa.array([10, 30])]), TYPES)
    assert vocab.items.to_pylist() == [10, 20, 30]
    assert vocab.num_items == 3
    assert vocab.event_types == TYPES
    np.testing.assert_array_equal(vocab.lookup(pa.array([10, 20, 30, 99, None], pa.int64())), [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(vocab.lookup(pa.chunked_array([pa.array([30]), pa.array([10])])), [3, 1])
    assert vocab.original(np.array([3, 1])).to_pylist() == [30, 10]


def test_build_string_ids():
    vocab = Vocabulary.build(pa.array(["b", "a", "c", "a"]), TYPES)
    assert vocab.items.to_pylist() == ["a", "b", "c"]
    lookup = vocab.lookup(pa.array(["c", "zzz", "a", "", None]))
    assert lookup.dtype == np.int64
    np.testing.assert_array_equal(lookup, [3, 0, 1, 0, 0])
    # Integer ids looked up in a text vocabulary are compared as text.
    np.testing.assert_array_equal(
        Vocabulary.build(pa.array(["1", "2"]), TYPES).lookup(pa.array([2, 3])), [2, 0]
    )


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ([5, 1, 3], [4, 1, 9, 2, 9], [1, 3, 5, 2, 4, 9]),
        (["m", "c"], ["a", "z", "c"], ["c", "m", "a", "z"]),
    ],
    ids=["int", "string"],
)
def test_extend_keeps_indices_and_appends_new(old, new, expected):
    vocab = Vocabulary.build(pa.array(old), TYPES)
    before = {v: int(i) for v, i in zip(old, vocab.lookup(pa.array(old)))}
    grown = vocab.extend(pa.array(new))
    assert grown.items.to_pylist() == expected
    after = grown.lookup(pa.array(old))
    assert {v: int(i) for v, i in zip(old, after)} == before  # existing indices unchanged
    new_only = [v for v in expected if v not in old]
    assert sorted(grown.lookup(pa.array(new_only)).tolist()) == list(
        range(len(set(old)) + 1, len(expected) + 1)
    )
    assert grown.event_types == TYPES
    assert vocab.items.to_pylist() == sorted(set(old))  # the original is not mutated


def test_extend_with_nothing_new_is_identity():
    vocab = Vocabulary.build(pa.array([1, 2, 3]), TYPES)
    assert vocab.extend(pa.array([3, 1])).items.to_pylist() == [1, 2, 3]


def test_event_type_lookup():
    vocab = Vocabulary.build(pa.array([1]), TYPES)
    np.testing.assert_array_equal(
        vocab.lookup_event_types(pa.array(["cart", "view", "hover", None])), [3, 1, 0, 0]
    )


@pytest.mark.parametrize("ids", [[7, 3, 5], ["x", "a", "m"]], ids=["int", "string"])
def test_table_round_trip_with_counts(ids):
    vocab = Vocabulary.build(pa.array(ids), TYPES)
    vocab.counts = np.array([0, 4, 0, 9], dtype=np.int64)
    table = vocab.to_table()
    assert table.column_names == ["item_id", "index", "count"]
    assert table["index"].to_pylist() == [1, 2, 3]
    assert table["count"].to_pylist() == [4, 0, 9]

    shuffled = table.take(pa.array([2, 0, 1]))  # row order must not matter
    back = Vocabulary.from_table(shuffled, TYPES)
    assert back.items.to_pylist() == vocab.items.to_pylist()
    assert back.items.type == vocab.items.type
    np.testing.assert_array_equal(back.counts, vocab.counts)
    np.testing.assert_array_equal(back.lookup(pa.array(ids)), vocab.lookup(pa.array(ids)))
    np.testing.assert_allclose(back.popularity(), [-1.0, np.log1p(4), 0.0, np.log1p(9)], rtol=1e-6)


def test_table_without_counts():
    vocab = Vocabulary.build(pa.array([1, 2]), TYPES)
    assert vocab.to_table()["count"].to_pylist() == [0, 0]
    back = Vocabulary.from_table(vocab.to_table().drop_columns(["count"]), TYPES)
    assert back.counts is None
    assert back.popularity().tolist() == [-1.0, 0.0, 0.0]


def test_from_table_rejects_gaps_in_indices():
    table = pa.table({"item_id": [1, 2], "index": pa.array([1, 3], pa.int64())})
    with pytest.raises(ValueError, match="1..N"):
        Vocabulary.from_table(table, TYPES)


# --------------------------------------------------------------------------------------------
# left_pad / encode
# --------------------------------------------------------------------------------------------
def ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([v for r in rows for v in r], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return values, offsets


def test_left_pad_right_aligns_and_keeps_newest():
    values, offsets = ragged([[1, 2, 3, 4, 5], [6], [], [7, 8]])
    out = left_pad(values, offsets, width=3)
    np.testing.assert_array_equal(out, [[3, 4, 5], [0, 0, 6], [0, 0, 0], [0, 7, 8]])
    assert out.dtype == np.int64


def test_left_pad_drop_last():
    values, offsets = ragged([[1, 2, 3, 4, 5], [6], [7, 8]])
    np.testing.assert_array_equal(
        left_pad(values, offsets, width=3, drop_last=1), [[2, 3, 4], [0, 0, 0], [0, 0, 7]]
    )
    np.testing.assert_array_equal(
        left_pad(values, offsets, width=4, drop_last=2), [[0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0]]
    )


def test_left_pad_keep_filters_before_drop_last():
    values, offsets = ragged([[1, 2, 3, 4], [5, 6]])
    keep = np.array([True, False, True, True, False, True])
    np.testing.assert_array_equal(left_pad(values, offsets, width=3, keep=keep), [[1, 3, 4], [0, 0, 6]])
    np.testing.assert_array_equal(
        left_pad(values, offsets, width=3, drop_last=1, keep=keep), [[0, 1, 3], [0, 0, 0]]
    )


def test_left_pad_matches_a_python_reference():
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, 100, rng.integers(0, 12))) for _ in range(50)]
    values, offsets = ragged(rows)
    keep = rng.random(len(values)) < 0.8
    for width in (1, 4, 15):
        for drop_last in (0, 1, 2):
            expected = np.zeros((len(rows), width), dtype=np.int64)
            start = 0
            for r, row in enumerate(rows):
                kept = [v for v, k in zip(row, keep[start : start + len(row)]) if k]
                start += len(row)
                kept = kept[: max(len(kept) - drop_last, 0)][-width:]
                if kept:
                    expected[r, width - len(kept) :] = kept
            np.testing.assert_array_equal(left_pad(values, offsets, width, drop_last, keep), expected)


def test_list_parts_honours_slices():
    column = pa.array([[1, 2], [3], None, [4, 5, 6]], pa.list_(pa.int64())).slice(1)
    flat, offsets = list_parts(column)
    assert flat.to_pylist() == [3, 4, 5, 6]
    np.testing.assert_array_equal(offsets, [0, 1, 1, 4])


def test_encode_drops_unknown_items_and_aligns_types():
    vocab = Vocabulary.build(pa.array(["a", "b", "c"]), TYPES)
    batch = pa.table(
        {
            "user_id": ["u1", "u2", "u3"],
            "item_ids": pa.array([["a", "x", "b", "c"], ["c"], ["x", "y"]], pa.list_(pa.string())),
            "event_types": pa.array(
                [["view", "cart", "click", "hover"], ["cart"], ["view", "view"]], pa.list_(pa.string())
            ),
        }
    )
    enc = encode(batch, vocab, width=3)
    np.testing.assert_array_equal(enc.items, [[1, 2, 3], [0, 0, 3], [0, 0, 0]])
    np.testing.assert_array_equal(enc.event_types, [[1, 2, 0], [0, 0, 3], [0, 0, 0]])  # "hover" -> 0
    np.testing.assert_array_equal(enc.lengths, [3, 1, 0])

    held_out = encode(batch, vocab, width=3, drop_last=1)
    np.testing.assert_array_equal(held_out.items, [[0, 1, 2], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(held_out.event_types, [[0, 1, 2], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(held_out.lengths, [2, 0, 0])


def test_encode_without_event_types_and_sliced_batch():
    vocab = Vocabulary.build(pa.array([10, 20, 30]), TYPES)
    batch = pa.table({"item_ids": pa.array([[10], [20, 30, 10], [30, 99]], pa.list_(pa.int64()))}).slice(1)
    enc = encode(batch, vocab, width=2)
    np.testing.assert_array_equal(enc.items, [[3, 1], [0, 3]])
    np.testing.assert_array_equal(enc.event_types, [[0, 0], [0, 0]])
    np.testing.assert_array_equal(enc.lengths, [2, 1])


def adjacent_pairs(rows) -> list[tuple[int, int]]:
    return [(a, b) for row in rows for a, b in zip(row[:-1], row[1:])]


def test_windows_cover_every_next_item_pair_exactly_once():
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(1, 1000, rng.integers(0, 40))) for _ in range(60)]
    values, offsets = ragged(rows)
    for width in (2, 3, 7, 41):
        for drop_last in (0, 2):
            index, window_offsets = window_index(offsets, width, drop_last)
            windows = [list(values[index[a:b]]) for a, b in zip(window_offsets[:-1], window_offsets[1:])]
            assert all(1 <= len(w) <= width for w in windows)
            kept = [row[: max(len(row) - drop_last, 0)] for row in rows]
            assert sorted(adjacent_pairs(windows)) == sorted(adjacent_pairs(kept))
            assert len(windows) == sum(max(1, -(-(len(r) - 1) // (width - 1))) for r in kept if r)  # fewest


def test_encode_windows_newest_first_after_unknown_items_and_holdout():
    vocab = Vocabulary.build(pa.array(list(range(1, 10))), TYPES)
    batch = pa.table(
        {"item_ids": pa.array([[1, 2, 99, 3, 4, 5, 6, 7], [], [8], [1, 2, 3]], pa.list_(pa.int64()))}
    )
    enc = encode(batch, vocab, width=3, drop_last=1, windows=True)
    np.testing.assert_array_equal(enc.items, [[4, 5, 6], [2, 3, 4], [0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(encode(batch, vocab, width=3, drop_last=1).items[0], [4, 5, 6])


@pytest.mark.parametrize(
    "items, values, expected",
    [
        (pa.array([30, 10, 20], pa.int64()), pa.array([20, 99, 30, 10, 20], pa.int64()), [3, 0, 1, 2, 3]),
        (pa.array(["b", "a"]), pa.array(["a", "zz", "b"]), [2, 0, 1]),
        (pa.array([30, 10, 20], pa.int64()), pa.array([10, None, 30], pa.int64()), [2, 0, 1]),  # nulls
        (pa.array([30, 10, 20], pa.int64()), pa.array([10, 30], pa.int32()), [2, 1]),  # cast
    ],
)
def test_lookup_matches_arrow_index_in_and_reuses_its_index(items, values, expected):
    vocab = Vocabulary(items=items, event_types=["view"])
    assert vocab.lookup(values).tolist() == expected
    assert vocab.lookup(pa.chunked_array([values])).tolist() == expected  # second call: cached index


def test_data_shape_of_sequences():
    from seqrec.data import data_shape

    sequences = pa.table(
        {
            "item_ids": [[1, 2, 3], [2, 4], [5, 1, 2, 3, 4, 6], [7]],
            "event_types": [["view"] * 3, ["view", "cart"], ["view"] * 6, ["click"]],
        }
    )
    shape = data_shape(sequences)
    assert (shape.users, shape.items, shape.interactions, shape.length_max, shape.event_types) == (
        4,
        7,
        12,
        6,
        3,
    )
    assert shape.length_p50 == 2.5 and shape.interactions_per_item == pytest.approx(12 / 7)
