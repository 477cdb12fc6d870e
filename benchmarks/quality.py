"""Benchmark recommendation quality on a public dataset: import, prepare, train, evaluate.

Runs the real stages: :func:`seqrec.importers.import_dataset` -> :func:`seqrec.prepare.prepare`
-> :func:`seqrec.training.train` (model selection on validation NDCG@10 only) ->
:func:`seqrec.evaluate.evaluate` on the test targets (leave-one-out, full-catalogue ranking, history
excluded), and prints the model's and the popularity baseline's HR@10, NDCG@10, MRR, HR@20,
NDCG@20, with the epochs trained and the wall minutes.

``--cold-start`` compares an id-only model with a text-aware one (``model.text_encoder=minilm``,
item titles through :func:`seqrec.text.item_text_features`) on items never seen in training: 10% of
the items, chosen at random (``--seed``), are removed from every sequence except where they are a
user's last item (the test target), so training and validation never see them. Reported:
Recall@10 (= HR@10, one relevant item) on the test users whose target is a withheld item, and the
usual metrics over all test users.

Examples::

    python benchmarks/quality.py --data ../shared/data/ml-1m/ml-1m.txt.gz --format sasrec \\
        --titles ../shared/data/ml-1m/sas_item_titles.tsv --config benchmarks/configs/ml-1m.yaml
    python benchmarks/quality.py --data ../shared/data/beauty-bert4rec/beauty.txt.gz --format sasrec \\
        --config benchmarks/configs/beauty.yaml
    python benchmarks/quality.py --data ../shared/data/ml-1m/ml-1m.txt.gz --format sasrec \\
        --titles ../shared/data/ml-1m/sas_item_titles.tsv --config benchmarks/configs/ml-1m.yaml \\
        --cold-start --set model.members=1
    python benchmarks/quality.py --smoke [--cold-start]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

log = logging.getLogger("benchmarks.quality")

COLUMNS = ["model", "hr@10", "ndcg@10", "mrr", "hr@20", "ndcg@20", "epochs", "wall_minutes"]
SMOKE_OVERRIDES = [
    "prepare.max_len=20",
    "model.max_len=20",
    "model.hidden_size=16",
    "model.num_layers=1",
    "train.num_workers=1",
    "train.epochs=2",
    "train.batch_size=64",
    "train.torch_threads=2",
]


def dataset_name(path: str) -> str:
    """``.../ml-1m/ml-1m.txt.gz`` -> ``ml-1m``; ``.../amazon-s3rec/Beauty.txt.gz`` -> ``beauty``."""
    stem = Path(path).name if Path(path).is_dir() else Path(path).name.split(".")[0]
    return re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-") or "dataset"


def withhold_items(sequences: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Drop a random ``fraction`` of the items from every sequence except as its last (test) item.

    Returns the filtered sequences and the withheld item ids. Every list column (items, event
    types, timestamps) is filtered alike.
    """
    items = pc.unique(pc.list_flatten(sequences["item_ids"])).to_numpy()
    rng = np.random.default_rng(seed)
    withheld = np.sort(rng.choice(items, size=max(1, round(fraction * len(items))), replace=False))
    column = sequences["item_ids"].combine_chunks()
    flat = pc.list_flatten(column)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    is_last = np.zeros(len(flat), dtype=bool)
    is_last[ends[lengths > 0] - 1] = True
    keep = ~pc.is_in(flat, value_set=pa.array(withheld)).to_numpy(zero_copy_only=False) | is_last
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    offsets = pa.array(
        np.concatenate([[0], np.cumsum(np.bincount(row_of[keep], minlength=len(lengths)))]).astype(np.int32)
    )
    columns = {}
    for name in sequences.column_names:
        col = sequences[name].combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values = pc.list_flatten(col).filter(pa.array(keep))
            columns[name] = pa.ListArray.from_arrays(offsets, values)
        else:
            columns[name] = col
    return pa.table(columns), withheld


def last_items(sequences: pa.Table) -> np.ndarray:
    column = sequences["item_ids"].combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat[np.cumsum(lengths) - 1]


def row_of(name: str, metrics: dict, epochs: int | None, wall_s: float | None, **extra) -> dict:
    row = {
        "model": name,
        **{
            k: round(float(metrics[k]), 4)
            for k in ("hr@10", "ndcg@10", "mrr", "hr@20", "ndcg@20")
            if k in metrics
        },
    }
    row.update(
        {"epochs": epochs, "wall_minutes": round(wall_s / 60, 2) if wall_s is not None else None, **extra}
    )
    return row


def train_and_evaluate(storage, sequences, config, label: str, eval_sets: dict[str, pa.Table]) -> dict:
    """Train ``config`` on ``sequences``; evaluate on each named table of ``eval_sets`` (test split)."""
    from seqrec.candidate import text_features_for
    from seqrec.evaluate import evaluate
    from seqrec.training import train

    started = time.perf_counter()
    result = train(
        storage,
        sequences,
        model_config=config.model,
        train_config=config.train,
        prepare_config=config.prepare,
        run_name=f"quality-{label}-{int(time.time())}",
        text_features_fn=text_features_for(config, storage),
        ks=config.eval.ks,
    )
    metrics = {
        name: evaluate(result.model, result.vocab, table, config.eval, splits=("test",))
        for name, table in eval_sets.items()
    }
    return {"result": result, "metrics": metrics, "wall_s": time.perf_counter() - started}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", help="dataset file (sasrec, s3rec) or MovieLens directory (movielens)")
    parser.add_argument("--format", choices=["sasrec", "s3rec", "movielens"], default="sasrec")
    parser.add_argument(
        "--titles", default=None, help="item titles TSV (sasrec/s3rec), e.g. ml-1m/sas_item_titles.tsv"
    )
    parser.add_argument("--config", default=None, help="YAML config (e.g. benchmarks/configs/ml-1m.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override, repeatable (e.g. --set train.epochs=50)",
    )
    parser.add_argument(
        "--name", default=None, help="dataset name in the results file (default: from --data)"
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="withhold 10%% of items from training; compare id-only vs text-aware (minilm) models",
    )
    parser.add_argument("--withhold", type=float, default=0.1, help="share of items withheld by --cold-start")
    parser.add_argument(
        "--text-encoder", default="minilm", help="encoder of the text-aware model (default minilm)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the withheld-item draw")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny synthetic data in SASRec format (with titles) and a tiny model (for tests)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/quality-<dataset>[-cold-start].json)",
    )
    args = parser.parse_args(argv)
    if not args.data and not args.smoke:
        parser.error("--data is required (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    import ray
    from training import load_sequences, write_tiny_sasrec

    from seqrec.config import load_config
    from seqrec.runtime import init_ray
    from seqrec.storage import Storage

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A quality number is a full evaluation: every user, not the nightly gate's sample.
    overrides = ["eval.max_users=0"] + (SMOKE_OVERRIDES if args.smoke else []) + args.overrides
    config = load_config(args.config, overrides)
    if (config.model.text_encoder or args.cold_start) and not (args.titles or (args.smoke and not args.data)):
        raise SystemExit(
            "a text-aware model (model.text_encoder, --cold-start) needs item titles: pass --titles "
            "(e.g. ../shared/data/ml-1m/sas_item_titles.tsv), or --set model.text_encoder=null "
            "for an id-only model"
        )
    print(config.dumps(), file=sys.stderr)
    root = tempfile.mkdtemp(prefix="seqrec-bench-quality-")
    storage = Storage(root)
    started_ray = not ray.is_initialized()
    try:
        data, titles = args.data, args.titles
        if args.smoke and not data:
            data = str(write_tiny_sasrec(Path(root) / "tiny.txt"))
            titles = titles or str(write_titles(Path(root) / "tiny_titles.tsv"))
        name = args.name or ("smoke" if args.smoke and not args.data else dataset_name(data))
        sequences, prepare_config, _, dataset = load_sequences(
            storage, data, args.format, config.prepare.max_len, titles=titles
        )
        config.prepare = (
            prepare_config if config.prepare.max_len == prepare_config.max_len else config.prepare
        )
        init_ray()
        rows = []
        if not args.cold_start:
            run = train_and_evaluate(storage, sequences, config, "model", {"all": sequences})
            test = run["metrics"]["all"]["test"]
            label = (
                f"{config.model.kind} h{config.model.hidden_size} L{config.model.num_layers}"
                + (f" x{config.model.members} ensemble" if config.model.members > 1 else "")
                + (f" +text:{config.model.text_encoder}" if config.model.text_encoder else "")
            )
            rows.append(
                row_of(
                    label,
                    test["model"],
                    len(run["result"].history),
                    run["wall_s"],
                    best_epoch=run["result"].best_epoch,
                    val_ndcg10=round(run["result"].best_val.get("val_ndcg@10", float("nan")), 4),
                    users=test["users"],
                )
            )
            rows.append(row_of("popularity", test["popularity"], 0, None, users=test["users"]))
            out_name = f"quality-{name}"
        else:
            rows, dataset["withheld_items"] = cold_start(storage, sequences, config, args)
            out_name = f"quality-{name}-cold-start"
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    columns = COLUMNS + (["recall@10_withheld", "withheld_users"] if args.cold_start else [])
    print(harness.table(rows, columns))
    path = harness.write_results(
        out_name,
        {
            "dataset": {"name": name, "path": str(data), "format": args.format, **dataset},
            "protocol": "leave-one-out; last item = test, second-to-last = validation (model selection); "
            "full-catalogue ranking, the user's history excluded; metrics averaged over test users",
            "config": config.to_dict(),
            "overrides": overrides,
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


def cold_start(storage, sequences: pa.Table, config, args) -> tuple[list[dict], int]:
    """Id-only vs text-aware model on withheld items; returns table rows and the number withheld."""
    filtered, withheld = withhold_items(sequences, args.withhold, args.seed)
    targets = last_items(filtered)
    cold_users = filtered.filter(pa.array(np.isin(targets, withheld)))
    eval_sets = {"all": filtered, "withheld": cold_users}
    log.warning(
        "cold start: %d of %d items withheld; %d test users have a withheld target",
        len(withheld),
        len(pc.unique(pc.list_flatten(sequences["item_ids"]))),
        cold_users.num_rows,
    )
    rows = []
    variants = [("id-only", None), (f"text:{args.text_encoder}", args.text_encoder)]
    for label, encoder in variants:
        variant = copy.deepcopy(config)
        variant.model.text_encoder = encoder
        run = train_and_evaluate(storage, filtered, variant, label, eval_sets)
        test, cold = run["metrics"]["all"]["test"], run["metrics"]["withheld"]["test"]
        rows.append(cold_row(label, test, cold, "model", run["result"], run["wall_s"]))
        if encoder is None:
            pop_all, pop_cold = test, cold
        elif variant.train.cold_items == "learned":
            # The same model with the never-trained items' id rows at zero (train.cold_items=text):
            # what the learned placement of new items adds.
            rows.append(
                text_alone_row(
                    run["result"], variant, eval_sets, f"{label}, new items by text projection alone"
                )
            )
    rows.append(cold_row("popularity", pop_all, pop_cold, "popularity"))
    return rows, int(len(withheld))


def cold_row(
    label: str, test: dict, cold: dict, scorer: str, result=None, wall_s: float | None = None
) -> dict:
    """A table row: ``scorer`` ("model" or "popularity") over all test users and the withheld ones."""
    extra = {"best_epoch": result.best_epoch} if result is not None else {}
    return row_of(
        label,
        test[scorer],
        len(result.history) if result is not None else 0,
        wall_s,
        **extra,
        users=test["users"],
        **{
            "recall@10_withheld": round(cold[scorer]["hr@10"], 4),
            "ndcg@10_withheld": round(cold[scorer]["ndcg@10"], 4),
            "withheld_users": cold["users"],
        },
    )


def text_alone_row(result, config, eval_sets: dict[str, pa.Table], label: str) -> dict:
    from seqrec.evaluate import evaluate
    from seqrec.training.cold_items import never_trained

    model = copy.deepcopy(result.model)
    untrained = torch.from_numpy(never_trained(result.vocab.counts))
    with torch.no_grad():
        model.item_embedding.weight[: len(untrained)][untrained] = 0.0
    metrics = {
        name: evaluate(model, result.vocab, table, config.eval, splits=("test",))["test"]
        for name, table in eval_sets.items()
    }
    return cold_row(label, metrics["all"], metrics["withheld"], "model", result)


def write_titles(path: Path, items: int = 120, seed: int = 7) -> Path:
    """Titles for :func:`training.write_tiny_sasrec`'s items, in ``sas_item_titles.tsv`` layout."""
    from seqrec.synthetic import item_titles

    lines = ["sas_item_id\tmovielens_movie_id\ttitle\tgenres"]
    lines += [f"{i + 1}\t{i + 1}\t{title}\tSynthetic" for i, title in enumerate(item_titles(items, seed))]
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
