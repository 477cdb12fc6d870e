"""Benchmark the training workers' oneDNN primitive cache: step throughput and memory growth.

Each training batch's loss has its own number of labelled positions, so on CPU (bf16 autocast)
oneDNN creates primitives for a new matmul shape at almost every step and caches them, 1024 by
default. That cache grew each Ray Train worker by about 1.5 GiB over an epoch of the nightly
benchmark. ``seqrec.training.driver`` runs the workers with a smaller cache
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``); this script chooses its size.

For each capacity, in a fresh process (oneDNN reads the variable when it starts), it runs the real
training step (:func:`seqrec.training.loop.training_step_loss`, sampled softmax, bf16 autocast where
the CPU has it, AdamW) on random left-padded batches shaped like the nightly benchmark's (128 rows,
max length 50, 5..50 events each, 100k items, hidden 32, one block), on one torch thread: warm-up
steps, then ``--steps`` timed steps, reporting steps/s and the RSS the timed steps added. The
capacities are interleaved ``--repeats`` times so that the shared machine's load hits each alike.

Examples::

    python benchmarks/onednn_cache.py                     # 1024 (oneDNN's default), 64, 8
    python benchmarks/onednn_cache.py --capacities 1024 64 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness

WARMUP_STEPS = 50


def child(steps: int) -> dict[str, float]:
    import numpy as np
    import psutil
    import torch

    from seqrec.config import TrainConfig
    from seqrec.model import SeqRecConfig, SeqRecModel
    from seqrec.training.loop import resolve_mixed_precision, training_step_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    items_n, rows, width = 100_000, 128, 51
    model = SeqRecModel(
        SeqRecConfig(num_items=items_n, hidden_size=32, num_layers=1, num_heads=1, max_len=50, dropout=0.1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = TrainConfig(loss="sampled", num_negatives=256)
    bf16 = resolve_mixed_precision(config) == "bf16"
    log_q = torch.log(torch.full((items_n + 1,), 1.0 / items_n))
    log_q[0] = float("-inf")
    rng = np.random.default_rng(0)

    def run(k: int) -> None:
        for _ in range(k):
            batch = np.zeros((rows, width), np.int64)
            for r, length in enumerate(rng.integers(5, width, rows)):
                batch[r, width - length :] = rng.integers(1, items_n + 1, length)
            items = torch.from_numpy(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = training_step_loss(model, model, items, (items > 0).long(), config, log_q)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    process = psutil.Process()
    run(WARMUP_STEPS)
    before = process.memory_info().rss
    started = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - started
    return {
        "steps_per_s": round(steps / seconds, 2),
        "rss_growth_gib": round((process.memory_info().rss - before) / harness.GIB, 3),
        "bf16": bf16,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capacities", type=int, nargs="+", default=[1024, 64, 8])
    p.add_argument("--steps", type=int, default=400, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return 0
    rows = []
    for repeat in range(args.repeats):
        for capacity in args.capacities:
            env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(capacity)}
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = {"capacity": capacity, "repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    print(harness.table(rows, ["capacity", "repeat", "steps_per_s", "rss_growth_gib", "bf16"]))
    path = harness.write_results(
        "onednn-cache",
        {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")}, "rows": rows},
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
