"""Every error code a feeder or analyst can meet is documented where they look for it."""

from __future__ import annotations

import re
from pathlib import Path

from core.errors import Code

DOCS = Path(__file__).resolve().parents[1] / "docs"
INGEST_CODES = sorted(v for k, v in vars(Code).items() if k.isupper() and v != Code.SINK_REJECTED)


def test_feeders_doc_has_a_row_for_every_code() -> None:
    text = (DOCS / "feeders.md").read_text()
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.M))
    assert set(INGEST_CODES) <= rows, sorted(set(INGEST_CODES) - rows)


def test_analytics_doc_lists_every_transfer_status() -> None:
    text = (DOCS / "analytics.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| `transfer_status` |"))
    listed = set(re.findall(r"`([A-Z_]+)`", line))
    missing = set(INGEST_CODES) - {Code.INVALID_JSON} - listed  # INVALID_JSON writes no log row
    assert not missing, sorted(missing)
