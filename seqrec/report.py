"""The night's report under ``reports/dt=YYYY-MM-DD/``: what happened and whether it was good.

``report.json`` holds the data counts, per-stage timings, candidate vs promoted vs popularity
metrics and the promotion decision; ``report.md`` says the same for people; ``training.png`` plots
the candidate's training curves and ``history.png`` the promoted metric across nights. The plots
need matplotlib (the ``report`` extra); without it the report is written without them and says so.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from seqrec.storage import Storage

log = logging.getLogger("seqrec.report")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def training_plot(history: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(title="training loss", xlabel="epoch")
    right.plot(epochs, [h.get("val_ndcg@10", float("nan")) for h in history], marker="o", label="NDCG@10")
    right.plot(epochs, [h.get("val_hr@10", float("nan")) for h in history], marker="o", label="HR@10")
    right.set(title="validation", xlabel="epoch")
    right.legend()
    data = _png(fig)
    plt.close(fig)
    return data


def history_plot(nights: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    dates = [n["date"] for n in nights]
    for who in ("candidate", "live", "popularity"):
        ax.plot(
            dates, [n.get("val_ndcg@10", {}).get(who, float("nan")) for n in nights], marker="o", label=who
        )
    ax.set(title="validation NDCG@10 by night", xlabel="night")
    ax.legend()
    fig.autofmt_xdate()
    data = _png(fig)
    plt.close(fig)
    return data


def metric_history(storage: Storage, upto: str) -> list[dict[str, Any]]:
    nights = []
    for directory in storage.list_dirs("reports"):
        date = directory.removeprefix("dt=")
        if date <= upto and storage.exists("reports", directory, "report.json"):
            report = storage.read_json("reports", directory, "report.json")
            nights.append({"date": date, "val_ndcg@10": report.get("val_ndcg@10", {})})
    return nights


def markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"# seqrec nightly report {report['date']}",
        "",
        f"- live model: `{report['live_model']}` ({report['decision']})",
        f"- events read {c['rows_read']} = kept {c['rows_kept']} + quarantined {c['rows_quarantined']} "
        f"+ duplicates {c['duplicates_dropped']}; users {c['users']} (new {c['new_users']}), "
        f"items {c['items']} (new {c['new_items']})",
        f"- recommendations: {report.get('recommendations', {}).get('rows', 0)} users at "
        f"`{report.get('recommendations', {}).get('location', '')}`",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["timings_s"].items()]
    lines += ["", "| validation NDCG@10 | value |", "|---|---|"]
    lines += [f"| {who} | {value:.4f} |" for who, value in report["val_ndcg@10"].items() if value is not None]
    if report.get("plots"):
        lines += ["", f"Plots {report['plots']}."]
    return "\n".join(lines) + "\n"


def timings_table(timings: dict[str, float]) -> str:
    """The night's stages and their wall time, with the total, as a small text table."""
    width = max([len(stage) for stage in timings] + [len("total")])
    lines = [f"{'stage':<{width}}  seconds"]
    lines += [f"{stage:<{width}}  {seconds:7.1f}" for stage, seconds in timings.items()]
    lines.append(f"{'total':<{width}}  {sum(timings.values()):7.1f}")
    return "\n".join(lines)


def plotting_available() -> bool:
    """matplotlib is the optional extra ``seqrec[report]``: a cluster that only scores needs none."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_report(storage: Storage, report: dict[str, Any], history: list[dict[str, Any]]) -> str:
    date = report["date"]
    plots = plotting_available()
    if not plots:
        report = {**report, "plots": "skipped: matplotlib is not installed (pip install 'seqrec[report]')"}
        log.warning("report without plots: matplotlib is not installed (pip install 'seqrec[report]')")
    storage.write_json(report, "reports", f"dt={date}", "report.json")
    storage.write_bytes(markdown(report).encode(), "reports", f"dt={date}", "report.md")
    if plots and history:
        storage.write_bytes(training_plot(history), "reports", f"dt={date}", "training.png")
    if plots:
        plot = history_plot(metric_history(storage, date))
        storage.write_bytes(plot, "reports", f"dt={date}", "history.png")
    location = storage.uri("reports", f"dt={date}")
    log.info("report -> %s", location)
    return location
