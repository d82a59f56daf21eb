"""Kafka's default key partitioning (murmur2), with the hashes of recent keys kept.

aiokafka's ``DefaultPartitioner`` hashes every key in pure Python, about 50-80 us for a
storage key (``tenant/study_uid/series_uid``); the worker sends two records per instance
(image and transfer log) and the relay one, and in ``bench.ingest`` the hashing was 8% of
the worker's CPU (py-spy, issue #15). A series' instances share their key, so the hash of
the most recent keys is remembered. The function is the same (aiokafka's ``murmur2``, as
Kafka's Java client), so every producer still sends a key to the same partition.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.partitioner import DefaultPartitioner, murmur2

__all__ = ["CachedPartitioner"]


class CachedPartitioner:
    """A drop-in ``partitioner`` for aiokafka producers and Faust's ``producer_partitioner``."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._hashes: dict[bytes, int] = {}
        self._default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is None:
            return int(self._default(key, all_partitions, available))  # random, as aiokafka's
        h = self._hashes.get(key)
        if h is None:
            h = murmur2(key) & 0x7FFFFFFF
            if len(self._hashes) >= self.size:
                self._hashes.clear()  # bounded; the next keys fill it again
            self._hashes[key] = h
        return all_partitions[h % len(all_partitions)]
