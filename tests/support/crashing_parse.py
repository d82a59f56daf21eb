"""A parse function for the ingest pool that dies like a real crash (SIGKILL-like exit) on
chosen files, so tests can prove the pool recovers. Importable by spawned pool processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from agents.fanout import Outcome, process_many

CRASH_MARK = "crash-the-parser"


def parse_or_die(items: list[tuple[bytes, bytes | None, dict[str, Any]]], storage_root: Path,
                 worker: str) -> list[Outcome]:
    for raw, _, _ in items:
        try:
            path = orjson.loads(raw).get("file_path", "")
        except orjson.JSONDecodeError:
            continue
        if CRASH_MARK in path:
            os._exit(70)  # what a segfault or the OOM killer looks like to the pool
    return process_many(items, storage_root, worker)
