"""The command line: user errors are one line and exit 2, bugs keep their traceback, show exits 1
when nothing is published, and ``python -m seqrec`` / ``--version`` work."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec import __version__
from seqrec.cli import main
from seqrec.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DAY = "2024-01-07"


def _events(root: Path, table: pa.Table) -> None:
    directory = root / "events" / f"dt={DAY}"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "part-00000.parquet")


def _ts(n: int) -> pa.Array:
    return pa.array([dt.datetime(2024, 1, 7, 12, tzinfo=dt.UTC)] * n, pa.timestamp("us", tz="UTC"))


# Tests that reach a stage pass ray_local: prepare runs as Ray tasks, and the CLI joins the session's
# Ray instead of starting its own.
def _user_error(capsys, argv: list[str], *expected: str) -> str:
    """Run ``seqrec argv``; it must exit 2 with one ``seqrec: error:`` line naming ``expected``."""
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("seqrec: error:")]
    assert status == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_bad_date_is_one_line(capsys, tmp_path):
    _user_error(
        capsys,
        ["prepare", "--root", str(tmp_path), "--date", "2024-13-45"],
        "--date '2024-13-45' is not a date",
        "YYYY-MM-DD",
    )


def test_bad_override_is_one_line(capsys, tmp_path):
    _user_error(
        capsys,
        ["prepare", "--root", str(tmp_path), "--date", DAY, "--set", "train.epochs=abc"],
        "config train.epochs: expected int, got 'abc'",
    )
    _user_error(
        capsys,
        ["prepare", "--root", str(tmp_path), "--set", "train.epoch=3"],
        "unknown config key 'train.epoch'",
    )
    _user_error(
        capsys,
        ["prepare", "--root", str(tmp_path), "--config", str(tmp_path / "nope.yaml")],
        "cannot read config file",
        "nope.yaml",
    )


def test_missing_ts_column_is_one_line(capsys, tmp_path, ray_local):
    _events(tmp_path, pa.table({"user_id": [1, 2], "item_id": [3, 4]}))
    _user_error(
        capsys,
        ["prepare", "--root", str(tmp_path), "--date", DAY],
        "missing required column(s) ['ts']",
        "part-00000.parquet",
    )


def test_every_row_rejected_is_one_line(capsys, tmp_path, ray_local):
    _events(
        tmp_path, pa.table({"user_id": pa.array([None, None], pa.int64()), "item_id": [3, 4], "ts": _ts(2)})
    )
    _user_error(capsys, ["prepare", "--root", str(tmp_path), "--date", DAY], "rejected")


def test_missing_root_is_one_line_and_not_created(capsys, tmp_path):
    root = tmp_path / "nonexistent"
    for command in ("score", "prepare", "show", "evaluate", "nightly"):
        _user_error(
            capsys, [command, "--root", str(root), "--date", DAY], f"storage root {root} does not exist"
        )
    assert not root.exists()


def test_missing_model_is_one_line(capsys, tmp_path):
    (tmp_path / "events").mkdir()
    _user_error(capsys, ["score", "--root", str(tmp_path), "--date", DAY], "no model promoted", "--model")
    _user_error(
        capsys,
        ["evaluate", "--root", str(tmp_path), "--date", DAY, "--model", "2024-01-01-x"],
        "no model '2024-01-01-x'",
    )


def test_verbose_adds_the_traceback(capsys, tmp_path):
    assert main(["prepare", "-v", "--root", str(tmp_path), "--date", "2024-13-45"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("seqrec: error: --date")


def test_date_from_the_environment(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQREC_DATE", "2024-01-32")
    _user_error(capsys, ["prepare", "--root", str(tmp_path)], "SEQREC_DATE '2024-01-32' is not a date")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, ray_local):
    import seqrec.prepare

    def broken(*args, **kwargs):
        raise KeyError("a bug, not the user's doing")

    monkeypatch.setattr(seqrec.prepare, "prepare", broken)
    (tmp_path / "events").mkdir()
    with pytest.raises(KeyError, match="a bug"):
        main(["prepare", "--root", str(tmp_path), "--date", DAY])


def test_error_classes_stay_what_callers_catch():
    from seqrec.artifact import ArtifactError
    from seqrec.config import load_config
    from seqrec.prepare import InputError

    for error in (InputError, ArtifactError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
    with pytest.raises(ValueError):
        load_config(None, ["train.epochs=abc"])


def test_show_with_nothing_published_exits_1(capsys, tmp_path):
    (tmp_path / "recommendations").mkdir()
    assert main(["show", "--root", str(tmp_path), "--date", DAY]) == 1
    err = capsys.readouterr().err
    assert f"no published recommendations for {DAY}" in err


def test_version_and_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "seqrec", "--version"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"seqrec {__version__}")
    done = subprocess.run(
        [sys.executable, "-m", "seqrec", "prepare", "--date", "2024-02-30", "--root", "/"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "seqrec: error: --date '2024-02-30' is not a date (day is out of range for month); "
        "use YYYY-MM-DD, e.g. 2024-01-07"
    ]


def _published(tmp_path: Path, titles: bool) -> None:
    from seqrec.publish import publish_partition
    from seqrec.storage import Storage

    storage = Storage(str(tmp_path))
    table = pa.table(
        {
            "user_id": [2, 1],
            "items": [[11, 12], [12, 13]],
            "scores": [[0.9, 0.5], [0.8, 0.25]],
            "source": ["model", "popularity"],
            "model_version": ["v1", "v1"],
        }
    )

    def write(directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, f"{directory}/part-0.parquet")

    publish_partition(storage, "recommendations", DAY, write, {})
    if titles:
        (tmp_path / "items").mkdir()
        catalogue = pa.table(
            {"item_id": [11, 12, 13], "text": ["The Matrix (1999)", "Toy Story (1995)", None]}
        )
        pq.write_table(catalogue, tmp_path / "items" / "items.parquet")
    report = {
        "date": DAY,
        "decision": "kept v0: candidate val NDCG@10 0.1 is worse than live 0.2",
        "live_model": "v0",
        "val_ndcg@10": {"candidate": 0.1, "live": 0.2, "popularity": 0.05},
    }
    storage.write_json(report, "reports", f"dt={DAY}", "report.json")


def test_show_names_items_and_explains_the_gate(capsys, tmp_path):
    (tmp_path / f"recommendations/dt={DAY}").mkdir(parents=True)
    _published(tmp_path, titles=True)
    assert main(["show", "--root", str(tmp_path), "--date", DAY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "gate: kept v0: candidate val NDCG@10 0.1 is worse than live 0.2" in out[1]
    assert "live 0.2000" in out[1] and "live model v0" in out[1]
    assert out[2] == "  user 1 (popularity, v1):"
    assert out[3].split() == ["1.", "12", "0.800", "Toy", "Story", "(1995)"]
    assert out[4].split() == ["2.", "13", "0.250", "(no", "title)"]
    assert out[5] == "  user 2 (model, v1):"
    assert out[6].split() == ["1.", "11", "0.900", "The", "Matrix", "(1999)"]


def test_show_without_catalogue_prints_ids(capsys, tmp_path):
    (tmp_path / f"recommendations/dt={DAY}").mkdir(parents=True)
    _published(tmp_path, titles=False)
    assert main(["show", "--root", str(tmp_path), "--date", DAY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "  user 1: [12, 13]  (popularity, v1)"
