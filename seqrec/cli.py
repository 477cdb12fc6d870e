"""``seqrec <stage>``: the command line of every job (``jobs/*.py`` call into here).

Each command parses its arguments, builds the typed config (defaults <- ``--config`` YAML <-
``--set section.key=value``), prints it and the storage root, and calls its stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

from seqrec.config import Config, fields_set, load_config
from seqrec.storage import Storage

log = logging.getLogger("seqrec")

DEFAULT_ROOT = "seqrec-data"
EPILOG = """\
storage root: a local directory (default ./seqrec-data) or s3://bucket/prefix on any S3-compatible
store; the endpoint comes from AWS_ENDPOINT_URL and credentials from the standard AWS chain.
Layout below the root: events/ items/ sequences/ quarantine/ models/ runs/ recommendations/ reports/.
"""


def _yesterday() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def _common(parser: argparse.ArgumentParser, date: bool = True) -> None:
    parser.add_argument("--root", default=DEFAULT_ROOT, help="storage root (default: ./%(default)s)")
    if date:
        parser.add_argument("--date", default=None, help="the night, YYYY-MM-DD (default: yesterday, UTC)")
    parser.add_argument("--config", default=None, help="YAML file with any of the sections prepare/model/train/eval/score")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    parser.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqrec", description="Nightly transformer sequential recommendations on Ray.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("nightly", help="prepare -> train -> evaluate -> promote -> score -> publish -> report")
    _common(p)
    p.add_argument("--demo", action="store_true",
                   help="first write the embedded synthetic dataset under the root (ending on --date)")
    p.add_argument("--show", type=int, default=5, help="print this many recommendation rows at the end")

    p = sub.add_parser("tune", help="search training settings on validation (Ray Tune); writes the chosen config")
    _common(p)
    p.add_argument("--name", default=None,
                   help="experiment under tune/ (default: the date); running the same name again resumes it")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="wall clock for the search (default: 60)")
    p.add_argument("--trials", type=int, default=16, help="settings to try, budget permitting (default: 16)")
    p.add_argument("--concurrency", type=int, default=0, help="trials at once (default: as the cluster's CPUs allow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the chosen config to this local YAML file")

    p = sub.add_parser("prepare", help="events -> per-user sequences; bad rows to quarantine/")
    _common(p)

    p = sub.add_parser("train", help="train a candidate on the night's sequences and save it under models/")
    _common(p)
    p.add_argument("--promote", action="store_true", help="also make it the live model")

    p = sub.add_parser("evaluate", help="leave-one-out metrics of a model (default: the promoted one)")
    _common(p)
    p.add_argument("--model", default=None, help="model version under models/ (default: the promoted one)")

    p = sub.add_parser("score", help="score every user and publish recommendations/dt=DATE atomically")
    _common(p)
    p.add_argument("--model", default=None, help="model version under models/ (default: the promoted one)")

    p = sub.add_parser("generate", help="write the embedded synthetic events dataset under the root")
    _common(p, date=False)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--end-date", default="2024-01-07")

    p = sub.add_parser("import", help="import a public benchmark file into events/ (and items/)")
    _common(p, date=False)
    p.add_argument("format", choices=["sasrec", "s3rec", "movielens"])
    p.add_argument("path", help="the benchmark file (or MovieLens directory)")
    p.add_argument("--titles", default=None, help="item titles TSV (e.g. ml-1m/sas_item_titles.tsv)")
    p.add_argument("--date", default="2024-01-01", help="partition for files without timestamps")

    p = sub.add_parser("show", help="print rows of a published recommendation table")
    _common(p)
    p.add_argument("--rows", type=int, default=10)
    return parser


def _storage(args) -> Storage:
    storage = Storage(args.root)
    storage.ensure_bucket() if storage.is_s3 and args.command in ("generate", "import") else None
    print(f"seqrec {args.command}: storage root {storage.uri()}", file=sys.stderr)
    return storage


def _config(args) -> Config:
    config = load_config(args.config, args.overrides)
    print(f"seqrec {args.command} config:\n{config.dumps()}", file=sys.stderr)
    return config


def _model_version(storage: Storage, requested: str | None) -> str:
    from seqrec import artifact

    version = requested or artifact.promoted_version(storage)
    if not version:
        raise SystemExit(f"no model promoted under {storage.uri('models')}; train one first or pass --model")
    return version


def show(storage: Storage, date: str, rows: int) -> None:
    from seqrec.publish import read_partition

    table = read_partition(storage, "recommendations", date)
    if table is None:
        print(f"no published recommendations for {date} under {storage.uri('recommendations')}")
        return
    print(f"recommendations for {date}: {table.num_rows} users at {storage.uri('recommendations', f'dt={date}')}")
    for row in table.sort_by("user_id").slice(0, rows).to_pylist():
        items = ", ".join(str(i) for i in row["items"])
        print(f"  user {row['user_id']}: [{items}]  ({row['source']}, {row['model_version']})")


def main(argv: list[str] | None = None) -> int:
    from seqrec.runtime import init_ray, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    storage = _storage(args)
    date = getattr(args, "date", None) or _yesterday()

    if args.command == "generate":
        from seqrec.synthetic import SyntheticSpec, write_synthetic

        write_synthetic(storage, SyntheticSpec(num_users=args.users, num_items=args.items, days=args.days,
                                               end_date=args.end_date))
        return 0
    if args.command == "import":
        from seqrec.importers import import_dataset

        report = import_dataset(args.format, args.path, storage, titles=args.titles, date=args.date)
        print(json.dumps(report.__dict__, default=str, indent=2))
        return 0
    if args.command == "show":
        show(storage, date, args.rows)
        return 0

    config = _config(args)
    if args.command == "prepare":
        from seqrec.prepare import prepare

        print(json.dumps(prepare(storage, date, config.prepare).as_dict(), indent=2))
        return 0

    init_ray(args.ray_address)
    if args.command == "nightly":
        from seqrec.nightly import run_nightly

        if args.demo:
            from seqrec.synthetic import SyntheticSpec, write_synthetic

            if getattr(args, "date", None) is None:
                date = SyntheticSpec().end_date
            write_synthetic(storage, SyntheticSpec(end_date=date))
        result = run_nightly(storage, date, config, explicit=fields_set(args.config, args.overrides))
        print(f"\nnight {date}: {result.decision}")
        print(f"report: {result.report}")
        show(storage, date, args.show)
        return 0
    if args.command == "tune":
        from seqrec.tune import TuneSettings, search, table

        settings = TuneSettings(name=args.name or date, budget_minutes=args.budget_minutes, trials=args.trials,
                                concurrency=args.concurrency, seed=args.seed)
        report = search(storage, date, config, settings, fixed=fields_set(None, args.overrides),
                        explicit=fields_set(args.config, args.overrides))
        print(table(report.trials, list(report.space)))
        print(f"\npreset {report.preset}; {len(report.trials)} trials in {report.wall_minutes:.1f} min"
              f"{' (restored)' if report.restored else ''}; best val NDCG@10 {report.best.val_ndcg:.4f}")
        if args.out:
            Path(args.out).write_bytes(storage.read_bytes("tune", settings.name, "chosen.yaml"))
            print(f"chosen config: {args.out} (and {report.chosen_config})")
        else:
            print(f"chosen config: {report.chosen_config}")
        print(f"report: {storage.uri('tune', settings.name, 'report.json')}")
        return 0
    if args.command == "train":
        from seqrec import artifact
        from seqrec.candidate import train_candidate
        from seqrec.data import SEQUENCE_COLUMNS
        from seqrec.evaluate import summary_table
        from seqrec.prepare import read_sequences

        sequences = read_sequences(storage, date, columns=SEQUENCE_COLUMNS)
        candidate = train_candidate(storage, date, config, sequences)
        print(summary_table(candidate.metrics, "val"), summary_table(candidate.metrics, "test"), sep="\n")
        if args.promote:
            artifact.promote(storage, candidate.version, "promoted by hand (seqrec train --promote)")
        print(f"model {candidate.version}: {candidate.location}")
        return 0
    if args.command == "evaluate":
        from seqrec import artifact
        from seqrec.evaluate import evaluate, summary_table
        from seqrec.data import SEQUENCE_COLUMNS
        from seqrec.prepare import read_sequences

        version = _model_version(storage, args.model)
        model = artifact.load(storage, version)
        sequences = read_sequences(storage, date, columns=SEQUENCE_COLUMNS)
        metrics = evaluate(model.model, model.vocab, sequences, config.eval)
        print(summary_table(metrics, "val"), summary_table(metrics, "test"), sep="\n")
        return 0
    if args.command == "score":
        from seqrec.score import score

        report = score(storage, date, _model_version(storage, args.model), config.score)
        print(json.dumps(report.__dict__, indent=2))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
