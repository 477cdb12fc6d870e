"""What ``seqrec show`` tells a person beside the raw table: item titles and the gate's decision.

Both come from files a night already writes (the catalogue ``items/*.parquet`` and
``reports/dt=D/report.json``); either may be missing, and then ``show`` prints ids alone.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seqrec.storage import Storage

TITLE_CHARS = 48  # a title is cut to this many characters so one item fits a line


def item_titles(storage: Storage, item_ids: list[Any]) -> dict[Any, str]:
    """``item_id -> text`` for the given ids, from the catalogue's ``text`` column ({} without one)."""
    titles: dict[Any, str] = {}
    wanted = set(item_ids)
    for path in storage.list_files("items", suffix=".parquet"):
        schema = pq.read_schema(path, filesystem=storage.filesystem)
        if "text" not in schema.names or "item_id" not in schema.names:
            continue
        table = pq.read_table(path, columns=["item_id", "text"], filesystem=storage.filesystem)
        try:
            table = table.filter(pc.is_in(table["item_id"], value_set=pa.array(sorted(wanted, key=str))))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass  # ids of another type than the catalogue's: no match to find
        for item, text in zip(table["item_id"].to_pylist(), table["text"].to_pylist()):
            if item in wanted and text and str(text).strip():
                titles[item] = _shorten(str(text))
    return titles


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def format_rows(storage: Storage, rows: list[dict[str, Any]], with_titles: bool = True) -> list[str]:
    """Lines for published recommendation rows: one per user, then one per item when titles exist
    (and ``with_titles``)."""
    titles = item_titles(storage, [item for row in rows for item in row["items"]]) if with_titles else {}
    lines = []
    for row in rows:
        source = ", ".join(str(row[c]) for c in ("source", "model_version") if row.get(c) is not None)
        if not titles:
            items = ", ".join(str(i) for i in row["items"])
            lines.append(f"  user {row['user_id']}: [{items}]  ({source})")
            continue
        lines.append(f"  user {row['user_id']} ({source}):")
        scores = row.get("scores") or [None] * len(row["items"])
        for rank, (item, score) in enumerate(zip(row["items"], scores), 1):
            shown = f"{score:7.3f}" if isinstance(score, float) else ""
            lines.append(f"    {rank:2d}. {str(item):>8} {shown}  {titles.get(item, '(no title)')}")
    return lines


def night_decision(storage: Storage, date: str) -> str | None:
    """The promotion gate's decision for ``date`` in words, from the night's report (None without one)."""
    if not storage.exists("reports", f"dt={date}", "report.json"):
        return None
    report = storage.read_json("reports", f"dt={date}", "report.json")
    ndcg = report.get("val_ndcg@10") or {}
    scores = ", ".join(f"{who} {value:.4f}" for who, value in ndcg.items() if isinstance(value, (int, float)))
    line = f"gate: {report.get('decision', 'no decision recorded')}"
    if scores:
        line += f" [val NDCG@10: {scores}]"
    if report.get("live_model"):
        line += f"; live model {report['live_model']}"
    return line
