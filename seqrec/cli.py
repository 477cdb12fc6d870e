"""``seqrec <stage>``: the command line of every job (``jobs/*.py`` call into here).

Each command parses its arguments, builds the typed config (defaults <- ``--config`` YAML <-
``--set section.key=value``), prints the storage root and the config, and calls its stage.

Exit status: 0 done; 1 ``seqrec show`` found nothing published for the date; 2 a mistake the user
can fix (a bad argument or config, missing data or model), printed as one line
``seqrec: error: ...`` (``-v`` adds the traceback); 75 another run holds the night's lease (one line
naming it: try again once that run is done). Any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from seqrec.buildinfo import code_version
from seqrec.config import Config, config_changes, fields_set, load_config
from seqrec.errors import ConfigError, NotFoundError, UserError
from seqrec.storage import Storage

log = logging.getLogger("seqrec")

DEFAULT_ROOT = "seqrec-data"
EPILOG = """\
storage root: a local directory (default ./seqrec-data) or s3://bucket/prefix on any S3-compatible
store; the endpoint comes from AWS_ENDPOINT_URL and credentials from the standard AWS chain.
Layout below the root: events/ items/ sequences/ quarantine/ models/ runs/ recommendations/ (a Delta
table) leases/ reports/.
"""


def _yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def _common(parser: argparse.ArgumentParser, date: bool = True) -> None:
    parser.add_argument("--root", default=DEFAULT_ROOT, help="storage root (default: ./%(default)s)")
    if date:
        parser.add_argument(
            "--date", default=None, help="the night, YYYY-MM-DD (default: $SEQREC_DATE, else yesterday, UTC)"
        )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file with any of the sections prepare/model/train/eval/score/publish",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqrec",
        description="Nightly transformer sequential recommendations on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"seqrec {code_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "nightly", help="prepare -> train -> evaluate -> promote -> score -> publish -> report"
    )
    _common(p)
    p.add_argument(
        "--demo",
        action="store_true",
        help="first write the embedded synthetic dataset under the root (ending on --date)",
    )
    p.add_argument("--show", type=int, default=5, help="print this many recommendation rows at the end")

    p = sub.add_parser(
        "tune", help="search training settings on validation (Ray Tune); writes the chosen config"
    )
    _common(p)
    p.add_argument(
        "--name",
        default=None,
        help="experiment under tune/ (default: the date); running the same name again resumes it",
    )
    p.add_argument(
        "--budget-minutes", type=float, default=60.0, help="wall clock for the search (default: 60)"
    )
    p.add_argument("--trials", type=int, default=16, help="settings to try, budget permitting (default: 16)")
    p.add_argument(
        "--concurrency", type=int, default=0, help="trials at once (default: as the cluster's CPUs allow)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the chosen config to this local YAML file")

    p = sub.add_parser("prepare", help="events -> per-user sequences; bad rows to quarantine/")
    _common(p)

    p = sub.add_parser("train", help="train a candidate on the night's sequences and save it under models/")
    _common(p)
    p.add_argument("--promote", action="store_true", help="also make it the live model")

    p = sub.add_parser(
        "evaluate",
        help="leave-one-out metrics of a model (default: the promoted one) on the gate's hash sample "
        "of users (eval.max_users, eval.max_rankings_per_user; --set eval.max_users=0: all)",
    )
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

    p = sub.add_parser("show", help="print rows of a published recommendation table (exit 1 if none)")
    _common(p)
    p.add_argument("--rows", type=int, default=10)
    p.add_argument(
        "--as-of",
        default=None,
        metavar="VERSION|TIMESTAMP",
        help="read an earlier snapshot: a table version or an ISO time such as 2024-01-08T03:00:00Z",
    )
    p.add_argument("--history", action="store_true", help="also list the date's commits (snapshots)")

    p = sub.add_parser("rollback", help="restore the rows a date had before its latest commit (a new commit)")
    _common(p)
    return parser


def _night(value: str | None, flag: str = "--date") -> str:
    """``value`` checked as a YYYY-MM-DD date; a typo is the user's to fix, not a traceback."""
    if value is None:
        value = os.environ.get("SEQREC_DATE") or None  # how a scheduler passes the date (k8s/rayjob.yaml)
        flag = "SEQREC_DATE"
    if value is None:
        return _yesterday()
    try:
        if len(value) != 10:
            raise ValueError("expected YYYY-MM-DD")
        return dt.date.fromisoformat(value).isoformat()
    except ValueError as exc:
        raise ConfigError(f"{flag} {value!r} is not a date ({exc}); use YYYY-MM-DD, e.g. 2024-01-07") from exc


def _creates_data(args) -> bool:
    return args.command in ("generate", "import") or (args.command == "nightly" and args.demo)


def _storage(args) -> Storage:
    if not _creates_data(args) and "://" not in args.root and not Path(args.root).expanduser().exists():
        # Checked before Storage(), which would create the directory and hide the typo.
        raise NotFoundError(
            f"storage root {args.root} does not exist; check --root (or create data there "
            "with `seqrec generate`, `seqrec import` or `seqrec nightly --demo`)"
        )
    storage = Storage(args.root)
    if storage.is_s3 and _creates_data(args):
        storage.ensure_bucket()
    elif storage.is_s3 and not _creates_data(args) and not storage.exists():
        raise NotFoundError(
            f"storage root {storage.uri()} holds nothing (or its bucket does not exist); "
            "check --root and AWS_ENDPOINT_URL"
        )
    print(f"seqrec {args.command}: storage root {storage.uri()} (seqrec {code_version()})", file=sys.stderr)
    return storage


def _config(args) -> Config:
    """The config, announced in one line: where it came from and what differs from the defaults.

    That line and the code version determine the whole config; the full dump is logged at DEBUG
    (``-v``) and, for the nightly, written to the night's report.json.
    """
    config = load_config(args.config, args.overrides)
    changed = " ".join(f"{key}={value}" for key, value in config_changes(config).items()) or "none"
    source = ", ".join(filter(None, [args.config, *(f"--set {o}" for o in args.overrides)])) or "defaults"
    print(
        f"seqrec {args.command} config ({source}); differs from the defaults in: {changed}", file=sys.stderr
    )
    log.debug("config:\n%s", config.dumps())
    return config


def _model_version(storage: Storage, requested: str | None) -> str:
    from seqrec import artifact

    version = requested or artifact.promoted_version(storage)
    if not version:
        raise NotFoundError(
            f"no model promoted under {storage.uri('models')}; train one first "
            "(`seqrec train --promote` or `seqrec nightly`) or pass --model VERSION"
        )
    if not storage.exists("models", version, "config.json"):
        raise NotFoundError(
            f"no model {version!r} under {storage.uri('models')}; pass --model with one of "
            f"{storage.list_dirs('models')[-5:]} (the newest five)"
        )
    return version


def show(
    storage: Storage,
    date: str,
    rows: int,
    explain: bool = True,
    as_of: str | None = None,
    with_history: bool = False,
) -> bool:
    """Print the night's rows (at snapshot ``as_of``, the latest by default) and, with ``explain``,
    item titles (when the catalogue has them) and the gate's decision; with ``with_history`` the
    date's commits first. False when nothing is published for ``date``."""
    from seqrec.explain import format_rows, night_decision
    from seqrec.publish import history, read_recommendations

    table = read_recommendations(storage, date, as_of)
    if with_history:
        for c in history(storage, date):
            print(
                f"  version {c['version']}: {c.get('operation')} at {c.get('committed_at')}, "
                f"{c.get('rows')} rows, model {c.get('model_version')}"
            )
    where = storage.uri("recommendations") + (f" as of {as_of}" if as_of else "")
    if table is None:
        print(f"seqrec show: no published recommendations for {date} in {where}", file=sys.stderr)
        return False
    print(f"recommendations for {date}: {table.num_rows} users in {where}")
    decision = night_decision(storage, date) if explain else None
    if decision:
        print(decision)
    shown = table.sort_by("user_id").slice(0, rows).to_pylist()
    for line in format_rows(storage, shown, with_titles=explain):
        print(line)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 nothing to show, 2 a user error)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ.setdefault("SEQREC_RAY_VERBOSE", "1")  # -v: Ray's chatter too (read when ray is imported)
    from seqrec.runtime import setup_logging

    setup_logging(args.verbose)
    from seqrec.lease import LeaseHeld, LeaseLost

    try:
        return run(args)
    except (LeaseHeld, LeaseLost) as exc:  # another run has the night: one line, no traceback
        print(f"seqrec: error: {_one_line(exc)}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again once the other run is done
    except UserError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"seqrec: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    # An error raised inside a Ray task arrives wrapped with the remote traceback; say the cause only.
    cause = getattr(exc, "cause", None)
    return " ".join(str(cause if isinstance(cause, UserError) else exc).split())


def _generate_command(args, storage: Storage, date: str) -> int:
    from seqrec.synthetic import SyntheticSpec, write_synthetic

    write_synthetic(
        storage,
        SyntheticSpec(
            num_users=args.users,
            num_items=args.items,
            days=args.days,
            end_date=_night(args.end_date, "--end-date"),
        ),
    )
    return 0


def _import_command(args, storage: Storage, date: str) -> int:
    from seqrec.importers import import_dataset

    report = import_dataset(args.format, args.path, storage, titles=args.titles, date=date)
    print(json.dumps(report.__dict__, default=str, indent=2))
    return 0


def _show_command(args, storage: Storage, date: str) -> int:
    return 0 if show(storage, date, args.rows, as_of=args.as_of, with_history=args.history) else 1


def _rollback_command(args, storage: Storage, date: str, config: Config) -> int:
    from seqrec.lease import hold_night
    from seqrec.publish import rollback

    with hold_night(storage, date, config.publish.lease_ttl_s):
        snapshot = rollback(storage, date, config.publish)
    print(
        f"rolled {date} back to the rows of version {snapshot.metadata['restored_version']}: "
        f"{snapshot.rows} rows, now version {snapshot.version}"
    )
    return 0


def _prepare_command(args, storage: Storage, date: str, config: Config) -> int:
    from seqrec.prepare import prepare
    from seqrec.runtime import init_ray

    init_ray(args.ray_address)  # the stage runs as Ray tasks: join --ray-address's cluster
    print(json.dumps(prepare(storage, date, config.prepare).as_dict(), indent=2))
    return 0


def _nightly_command(args, storage: Storage, date: str, config: Config) -> int:
    from seqrec.nightly import run_nightly
    from seqrec.report import timings_table

    if args.demo:
        from seqrec.synthetic import SyntheticSpec, write_synthetic

        if getattr(args, "date", None) is None:
            date = SyntheticSpec().end_date
        write_synthetic(storage, SyntheticSpec(end_date=date))
    result = run_nightly(storage, date, config, explicit=fields_set(args.config, args.overrides))
    print(f"\nnight {date}: {result.decision}")
    print(f"report: {result.report}")
    show(storage, date, args.show, explain=False)  # titles and the gate's reasons: `seqrec show`
    print(timings_table(result.timings_s))
    return 0


def _tune_command(args, storage: Storage, date: str, config: Config) -> int:
    from seqrec.tune import TuneSettings, search, table

    settings = TuneSettings(
        name=args.name or date,
        budget_minutes=args.budget_minutes,
        trials=args.trials,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    report = search(
        storage,
        date,
        config,
        settings,
        fixed=fields_set(None, args.overrides),
        explicit=fields_set(args.config, args.overrides),
    )
    print(table(report.trials, list(report.space)))
    print(
        f"\npreset {report.preset}; {len(report.trials)} trials in {report.wall_minutes:.1f} min"
        f"{' (restored)' if report.restored else ''}; best val NDCG@10 {report.best.val_ndcg:.4f}"
    )
    if args.out:
        Path(args.out).write_bytes(storage.read_bytes("tune", settings.name, "chosen.yaml"))
        print(f"chosen config: {args.out} (and {report.chosen_config})")
    else:
        print(f"chosen config: {report.chosen_config}")
    print(f"report: {storage.uri('tune', settings.name, 'report.json')}")
    return 0


def _train_command(args, storage: Storage, date: str, config: Config) -> int:
    from seqrec import artifact
    from seqrec.candidate import train_candidate
    from seqrec.evaluate import summary_table

    candidate = train_candidate(storage, date, config)
    print(summary_table(candidate.metrics, "val"), summary_table(candidate.metrics, "test"), sep="\n")
    if args.promote:
        artifact.promote(storage, candidate.version, "promoted by hand (seqrec train --promote)")
    print(f"model {candidate.version}: {candidate.location}")
    return 0


def _evaluate_command(args, storage: Storage, date: str, config: Config) -> int:
    version = args.model
    from seqrec.evaluate import Judged, evaluate_models, summary_table

    judged = [Judged(version, version)]
    metrics = evaluate_models(storage, date, judged, config.eval, config.score)[version]
    print(summary_table(metrics, "val"), summary_table(metrics, "test"), sep="\n")
    return 0


def _score_command(args, storage: Storage, date: str, config: Config) -> int:
    version = args.model
    from seqrec.score import score

    report = score(storage, date, version, config.score, config.publish)
    print(json.dumps(report.__dict__, indent=2))
    return 0


_STORAGE_COMMANDS = {"generate": _generate_command, "import": _import_command, "show": _show_command}
_CONFIG_COMMANDS = {"rollback": _rollback_command, "prepare": _prepare_command}
_RAY_COMMANDS = {
    "nightly": _nightly_command,
    "tune": _tune_command,
    "train": _train_command,
    "evaluate": _evaluate_command,
    "score": _score_command,
}


def run(args) -> int:
    date = _night(getattr(args, "date", None))
    storage = _storage(args)
    if args.command in _STORAGE_COMMANDS:
        return _STORAGE_COMMANDS[args.command](args, storage, date)
    config = _config(args)
    if args.command in _CONFIG_COMMANDS:
        return _CONFIG_COMMANDS[args.command](args, storage, date, config)
    # Checked before Ray starts: a missing model is the user's to fix, in a second rather than a minute.
    if args.command in ("evaluate", "score"):
        args.model = _model_version(storage, args.model)
    from seqrec.runtime import init_ray

    init_ray(args.ray_address, state_api=args.command == "tune")
    return _RAY_COMMANDS[args.command](args, storage, date, config)


if __name__ == "__main__":
    sys.exit(main())
