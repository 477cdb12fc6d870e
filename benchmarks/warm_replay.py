"""Benchmark what a warm-start night's replay sample is worth on real data with drift.

MovieLens-100K has real timestamps (Sept 1997 - Apr 1998), so a warm night sees real news: users
arrive, rate in bursts and leave. A model is trained cold on the events up to ``--cold-date`` and
promoted; then, on the sequences of ``--warm-date`` (a month later by default: 174 of 736 users
with new events, 89 of them new users), it is fine-tuned with several ``train.replay_ratio`` values,
on every user (``train.warm_start_users=all``), and retrained from scratch (``train.warm_start=false``).
Each candidate is evaluated on the warm night's validation targets of all users, the same users
the promotion gate judges, beside the parent (the cold model) on the same users: a small replay
that forgets shows there as a drop on the users without news.

It runs the ``seqrec`` CLI as a user would (import, prepare, train, evaluate) and parses the
validation table each command prints. One run per variant: the tables' standard errors (about
0.008 NDCG@10 on 735 users) are the scale of what this can tell apart.

    python benchmarks/warm_replay.py --data ../shared/data/ml-100k
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import harness

MODEL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.max_len=200",
    "model.dropout=0.2",
    "prepare.max_len=200",
    "prepare.min_ts=1990-01-01",  # ML-100K is from 1997-98; the default floor is 2000
    "train.loss=ce",
    "train.epochs=60",
    "train.patience=5",
    "train.batch_size=128",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.log_every_s=600",
]
VARIANTS = {
    "replay_ratio=0": ["train.replay_ratio=0"],
    "replay_ratio=0.2 (default)": ["train.replay_ratio=0.2"],
    "replay_ratio=1": ["train.replay_ratio=1"],
    "warm, all users": ["train.warm_start_users=all"],
    "retrain from scratch": ["train.warm_start=false"],
}


def seqrec(*args: str, overrides: list[str]) -> str:
    sets = [a for o in overrides for a in ("--set", o)]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "seqrec", *args, *sets], capture_output=True, text=True, env=os.environ
    )
    if done.returncode:
        raise SystemExit(f"seqrec {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return f"\n{done.stdout}\n{done.stderr}\nwall_s {time.perf_counter() - started:.1f}"


def parse(output: str) -> dict:
    """The val table's model NDCG@10 and its standard error, and the training line's users."""
    table = output[output.index("\nval (") :]
    ndcg = float(re.search(r"\nmodel\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)", table).group(1))
    stderr = float(re.search(r"\n\s+± s\.e\.\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)", table).group(1))
    row = {"val_ndcg@10": ndcg, "val_ndcg@10_stderr": stderr, "wall_s": float(output.rsplit("wall_s ", 1)[1])}
    trained = re.search(r"training \w+ model on (\d+) of (\d+) users \(([^)]*)\)", output)
    if trained:
        row.update(users_trained=int(trained.group(1)), users=int(trained.group(2)), why=trained.group(3))
    done = re.search(r"training done \((\w+)\): best epoch (\d+) of (\d+)", output)
    if done:
        row.update(stopped=done.group(1), best_epoch=int(done.group(2)), epochs=int(done.group(3)))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/ml-100k", help="the ML-100K directory (u.data, u.item)")
    p.add_argument("--cold-date", default="1998-01-31")
    p.add_argument("--warm-date", default="1998-02-28")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="seqrec-replay-") as root:
        r = ["--root", root]
        seqrec("import", "movielens", args.data, *r, overrides=[])
        for date in (args.cold_date, args.warm_date):
            seqrec("prepare", *r, "--date", date, overrides=["prepare.incremental=false", *MODEL])
        rows["parent (cold, on its own night)"] = parse(
            seqrec("train", *r, "--date", args.cold_date, "--promote", overrides=MODEL)
        )
        warm_parent = seqrec("evaluate", *r, "--date", args.warm_date, overrides=MODEL)
        rows["parent on the warm night"] = parse(warm_parent)
        for name, extra in VARIANTS.items():
            rows[name] = parse(seqrec("train", *r, "--date", args.warm_date, overrides=[*MODEL, *extra]))
            print(f"{name}: {rows[name]}", flush=True)
    columns = ["variant", "users_trained", "users", "val_ndcg@10", "val_ndcg@10_stderr", "epochs", "wall_s"]
    print(harness.table([{"variant": name, **row} for name, row in rows.items()], columns))
    path = harness.write_results(
        "warm-replay-ml100k",
        {"cpu": harness.cpu(), "settings": {**vars(args), "model": MODEL}, "rows": rows},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
