"""The transfer log's trace-id de-duplication: one row per transfer outcome.

The ingest stage is at-least-once: after a crash it may put a second copy of a
transfer-log row on ``log_queue`` (same key, so same partition, later offset). The
``dicom_object_meta`` table has DUPLICATE KEY semantics, so a sink loading it skips a row
whose (trace id, transfer status) it has seen within the last
DICOMFLOW_DORIS_DEDUP_WINDOW records of the partition. The UNIQUE KEY tables need no such
rule: a repeated row replaces itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["dedup_key", "dedup_keys", "DedupWindow"]


def dedup_key(row: dict[str, Any]) -> str | None:
    """Identity of a transfer-log row: the transfer and its outcome.

    A replayed copy of the same outcome is a duplicate; a later attempt of the same
    transfer with another outcome (a dead letter replayed after its file was restored)
    is a new fact and is kept.
    """
    trace = row.get("trace_id")
    if not isinstance(trace, str):
        return None
    return f"{trace}|{row.get('transfer_status')}"


def dedup_keys(values: Iterable[bytes]) -> list[str]:
    """The keys of raw source values, in order; values that are not JSON objects have none."""
    keys: list[str] = []
    for value in values:
        try:
            row = orjson.loads(value or b"null")
        except orjson.JSONDecodeError:
            continue
        key = dedup_key(row) if isinstance(row, dict) else None
        if key is not None:
            keys.append(key)
    return keys


class DedupWindow:
    """The last ``size`` keys seen in one partition, oldest first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def remember(self, key: str) -> None:
        self._seen[key] = None
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def seed(self, keys: Iterable[str]) -> None:
        """Fill the window from keys read back from the topic (after a restart or a move).

        Not trimmed here, exactly as before the window was a class: the first
        :meth:`remember` trims it to ``size``.
        """
        for key in keys:
            self._seen[key] = None
