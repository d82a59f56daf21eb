"""Doris batch intents: the offset ranges a sink is about to load, recorded before the load.

A batch's Stream Load label is a function of its offset range. Before a batch is loaded
its range is recorded (and acknowledged by the broker), so a restarted worker can rebuild
exactly the same ranges, hence the same labels, and a replay meets ``Label Already
Exists``/``FINISHED`` instead of loading twice.

The store itself is I/O (in the worker: the topic ``dicomflow_doris_intents``, keyed
``table:partition`` and written to the partition it describes); the stage wires it in.
This module holds its contract and the record format: one JSON array of ``[first, last]``
pairs, the latest record per key wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import orjson

__all__ = ["Range", "IntentStore", "INTENTS_KEPT", "intent_key", "encode_intents", "decode_intents",
           "latest_intents", "remember"]

Range = tuple[int, int]

#: How many ranges the old rule kept (kept for its tests): the store now keeps every range
#: that ends at or above the committed offset, however many flushes a stuck commit spans.
INTENTS_KEPT = 64


class IntentStore(Protocol):
    """Where a sink's batch ranges survive a crash."""

    async def read(self, key: bytes, partition: int) -> list[Range]:
        """The latest ranges recorded under ``key`` in ``partition`` (empty if none)."""
        ...

    async def record(self, key: bytes, partition: int, ranges: Sequence[Range]) -> None:
        """Record ``ranges`` under ``key``; return only once the broker acknowledged them."""
        ...


def intent_key(table: str, partition: int) -> bytes:
    return f"{table}:{partition}".encode()


def encode_intents(ranges: Sequence[Range]) -> bytes:
    return orjson.dumps(list(ranges))


def decode_intents(value: bytes) -> list[Range]:
    return [(int(a), int(b)) for a, b in orjson.loads(value)]


def latest_intents(records: Iterable[tuple[bytes | None, bytes]], key: bytes) -> list[Range]:
    """The ranges of the last ``(key, value)`` record for ``key``, in partition order."""
    latest: list[Range] = []
    for record_key, value in records:
        if record_key == key and value:
            latest = decode_intents(value)
    return latest


def remember(ranges: Sequence[Range], new: Range, committed: int | None = None) -> list[Range]:
    """``ranges`` plus ``new``, dropping only ranges wholly below ``committed`` (never replayed).

    With no committed offset known, every range is kept: a replay may start anywhere.
    """
    return [r for r in [*ranges, new] if committed is None or r[1] >= committed]
