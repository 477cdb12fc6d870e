"""Benchmark training on ML-1M at the published SASRec setting through the real Ray Train stage.

Imports the SASRec-format ML-1M file (``seqrec.importers.import_dataset("sasrec", ...)``) into a
temporary storage root, prepares sequences with max length 200, and trains with
:func:`seqrec.training.train` (Ray Train, Accelerate): max length 200, hidden 64, 2 blocks, 1 head,
full-softmax cross-entropy, global batch 128. For each ``--workers`` count it reports training
sequences/second, seconds/epoch (with and without the per-epoch validation) and the peak memory of
all local Ray processes, and, within a ``--max-minutes`` budget, the time to reach validation
NDCG@10 >= ``--target-ndcg`` (null when not reached).

Reference point: a public reference SASRec (full CE, 2 threads, batch 128) trains one ML-1M epoch
in about 41 s (~146 sequences/s) on this kind of machine.

Examples::

    python benchmarks/training.py --workers 1 2 --epochs 3
    python benchmarks/training.py --workers 1 --max-minutes 30        # also: minutes to NDCG@10 0.18
    python benchmarks/training.py --smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness

log = logging.getLogger("benchmarks.training")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m" / "ml-1m.txt.gz"
DATE = "2024-01-01"  # the importers' default partition


def load_sequences(storage, data: str, fmt: str, max_len: int, titles: str | None = None):
    """Import ``data`` below ``storage``, prepare sequences for the newest day, return them."""
    from seqrec.config import PrepareConfig
    from seqrec.importers import import_dataset
    from seqrec.prepare import event_dates, prepare, read_sequences

    started = time.perf_counter()
    imported = import_dataset(fmt, data, storage, titles=titles)
    date = event_dates(storage)[-1]
    prepare_config = PrepareConfig(max_len=max_len)
    prepared = prepare(storage, date, prepare_config)
    sequences = read_sequences(storage, date, columns=["user_id", "item_ids", "event_types"])
    info = {
        "events": imported.events_written,
        "users": prepared.users,
        "items": prepared.items,
        "import_prepare_s": round(time.perf_counter() - started, 1),
    }
    return sequences, prepare_config, date, info


def train_config_for(workers: int, epochs: int, args):
    from seqrec.config import TrainConfig

    cpus = args.cpus or os.cpu_count() or 1
    # One logical Ray CPU per worker (whole-CPU workers that take every CPU starve the dataset tasks),
    # but the machine's cores shared out as torch threads: 1 worker x 2 threads, 2 workers x 1 thread.
    return TrainConfig(
        num_workers=workers,
        cpus_per_worker=1.0,
        torch_threads=max(1, cpus // workers),
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        loss="ce",
        patience=max(epochs, 1),
        warm_start=False,
        seed=args.seed,
    )


def model_config_for(args):
    from seqrec.config import ModelConfig

    return ModelConfig(
        kind="causal",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_len=args.max_len,
        dropout=args.dropout,
        use_event_types=False,
        scale_embeddings=args.scale_embeddings,
    )


def first_epoch_reaching(history: list[dict], setup_s: float, target: float) -> dict | None:
    """Minutes from the start of ``train()`` to the end of the first epoch with val NDCG@10 >= target.

    Per-epoch times come from the run's history (``epoch_s``: training + validation); ``setup_s``
    (vocabulary, datasets, starting the workers, and the teardown) is charged before the first epoch,
    so the figure errs on the slow side.
    """
    elapsed = setup_s
    for entry in history:
        elapsed += entry["epoch_s"]
        if entry.get("val_ndcg@10", float("-inf")) >= target:  # epochs without validation lack it
            return {"epoch": entry["epoch"], "minutes": round(elapsed / 60, 2)}
    return None


def run_training(storage, sequences, prepare_config, workers: int, epochs: int, args, name: str) -> dict:
    from seqrec.training import train

    train_config = train_config_for(workers, epochs, args)
    with harness.ProcessTreeMemory() as memory:
        result = train(
            storage,
            sequences,
            model_config=model_config_for(args),
            train_config=train_config,
            prepare_config=prepare_config,
            run_name=name,
            ks=[10, 20],
        )
    history = result.history
    setup_s = result.wall_s - sum(h["epoch_s"] for h in history)
    # Epoch 0 includes one-off work (first batches through a cold pipeline): measured, but left out
    # of the steady-state means when there is more than one epoch.
    steady = history[1:] if len(history) > 1 else history
    seq_per_s = sum(h["train_seq_per_s"] for h in steady) / len(steady)
    train_rows = sequences.num_rows
    reached = first_epoch_reaching(history, setup_s, args.target_ndcg)
    usage = memory.result()
    return {
        "workers": workers,
        "torch_threads": train_config.torch_threads,
        "epochs": len(history),
        "seq_per_s": round(seq_per_s, 1),
        "epoch_s": round(sum(h["epoch_s"] for h in steady) / len(steady), 1),
        "train_only_epoch_s": round(train_rows / seq_per_s, 1),
        "peak_mem_gib": usage["peak_mem_gib"],
        "peak_rss_sum_gib": usage["peak_rss_gib"],
        "peak_object_store_gib": usage["peak_object_store_gib"],
        "best_val_ndcg@10": round(
            max((h["val_ndcg@10"] for h in history if "val_ndcg@10" in h), default=float("nan")), 4
        ),
        f"minutes_to_ndcg_{args.target_ndcg:g}": reached["minutes"] if reached else None,
        "reached_at_epoch": reached["epoch"] if reached else None,
        "wall_s": round(result.wall_s, 1),
        "setup_s": round(setup_s, 1),
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
        "cpu_s_by_process": usage["cpu_s_by_process"],
        "cpu_s_other_processes": usage["cpu_s_other_processes"],
        "cpu_s_available": usage["cpu_s_available"],
    }


def write_tiny_sasrec(
    path: Path, users: int = 300, items: int = 120, mean_events: int = 25, seed: int = 7
) -> Path:
    """A small SASRec-format file (``user item`` lines, time-ordered) from seqrec's synthetic generator."""
    import numpy as np

    from seqrec.synthetic import SyntheticSpec, generate_events

    events, _ = generate_events(
        SyntheticSpec(num_users=users, num_items=items, mean_events=mean_events, bad_rows=0, seed=seed)
    )
    events = events.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    lines = np.char.add(
        np.char.add(events["user_id"].to_numpy().astype(str), " "), events["item_id"].to_numpy().astype(str)
    )
    path.write_text("\n".join(lines.tolist()) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help=f"SASRec-format file (default {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts (default 1 2)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run (default 3)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="time budget of a convergence run (for --target-ndcg) per worker count in "
        "--converge-workers; 0 (default): no convergence run, only what the throughput runs reach",
    )
    parser.add_argument(
        "--converge-workers",
        type=int,
        nargs="+",
        default=None,
        help="worker counts given a convergence run (default: the fastest throughput one)",
    )
    parser.add_argument(
        "--target-ndcg", type=float, default=0.18, help="validation NDCG@10 to reach (default 0.18)"
    )
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--scale-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="item embeddings x sqrt(hidden), as SASRec (default on)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--cpus", type=int, default=0, help="cores shared out as torch threads (default: all)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other worker counts already in the JSON file (replace same workers)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny version on synthetic data written in SASRec format (for tests)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/training.json, training-smoke.json for --smoke)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_len, args.hidden, args.layers = 2, 20, 16, 1
        args.batch_size, args.workers = 64, [1]
    return args


def main(argv: list[str] | None = None) -> int:
    import ray

    from seqrec.runtime import init_ray
    from seqrec.storage import Storage

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    name = "training" + ("-smoke" if args.smoke else "")
    out = Path(args.out) if args.out else harness.RESULTS / f"{name}.json"
    root = tempfile.mkdtemp(prefix="seqrec-bench-training-")
    storage = Storage(root)
    started_ray = not ray.is_initialized()
    rows = []
    try:
        data = args.data
        if args.smoke and args.data == str(DEFAULT_DATA):
            data = str(write_tiny_sasrec(Path(root) / "tiny.txt"))
        sequences, prepare_config, _, dataset = load_sequences(storage, data, "sasrec", args.max_len)
        init_ray()
        for workers in args.workers:
            row = run_training(
                storage, sequences, prepare_config, workers, args.epochs, args, f"throughput-{workers}w"
            )
            rows.append(row)
            print(harness.table([row], list(row)[:8]), file=sys.stderr, flush=True)
        target_key = f"minutes_to_ndcg_{args.target_ndcg:g}"
        if args.max_minutes > 0:
            fastest = max(rows, key=lambda r: r["seq_per_s"])
            for workers in args.converge_workers or [fastest["workers"]]:
                measured = next((r for r in rows if r["workers"] == workers), fastest)
                epochs = max(1, math.floor(args.max_minutes * 60 / measured["epoch_s"]))
                run = run_training(
                    storage, sequences, prepare_config, workers, epochs, args, f"converge-{workers}w"
                )
                row = next((r for r in rows if r["workers"] == workers), None)
                if row is None:
                    row = {**run, "history": run["history"]}
                    rows.append(row)
                row[target_key] = run[target_key]
                row["converge_run"] = {
                    k: run[k]
                    for k in (
                        "epochs",
                        "wall_s",
                        "best_val_ndcg@10",
                        target_key,
                        "reached_at_epoch",
                        "history",
                    )
                }
                row["converge_run"]["budget_minutes"] = args.max_minutes
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    if args.merge and out.exists():
        measured = {r["workers"] for r in rows}
        rows = sorted(
            [r for r in json.loads(out.read_text())["rows"] if r["workers"] not in measured] + rows,
            key=lambda r: r["workers"],
        )
    print(
        harness.table(
            rows,
            [
                "workers",
                "torch_threads",
                "epochs",
                "seq_per_s",
                "epoch_s",
                "train_only_epoch_s",
                "peak_mem_gib",
                "best_val_ndcg@10",
                target_key,
            ],
        )
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    path = harness.write_results(
        name,
        {
            "settings": settings,
            "dataset": dataset,
            "reference": {
                "what": "public reference SASRec, full CE, 2 threads, batch 128, one ML-1M epoch",
                "epoch_s": 41,
                "seq_per_s": 146,
            },
            "rows": rows,
        },
        out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
