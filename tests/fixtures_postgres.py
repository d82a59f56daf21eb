"""PostgreSQL fixtures (embedded PostgreSQL 16 from the pgserver wheel).

``pg_server`` is one server for the whole session; ``pg_dsn`` is a fresh, empty
database on it for each test (dropped afterwards), so tests never see each other's
rows. Both are synchronous fixtures, usable from sync and async tests alike.
``pg_datadir`` is an empty directory for a test that runs its own server.

Clusters live outside pytest's ``tmp_path``: as root the server runs as an
unprivileged user that must traverse every ancestor of its data directory, and each
pytest session (including one started concurrently by someone else) resets
``/tmp/pytest-of-<user>`` to mode 0700, which would cut a running server off from its
own files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from dicomflow.embedded.postgres import EmbeddedPostgres

__all__ = ["pg_server", "pg_dsn", "pg_datadir", "TEST_SETTINGS", "run_sync"]

T = TypeVar("T")

#: Durability off: test data is disposable, and fsync dominates small-transaction time.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even under a running test loop.

    A worker thread has its own event loop, so this never disturbs pytest-asyncio's.
    """

    async def main() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _new_datadir() -> Path:
    # DICOMFLOW_TEST_PG_ROOT lets CI put clusters on a faster or larger disk.
    return Path(tempfile.mkdtemp(prefix="dicomflow-pg-", dir=os.environ.get("DICOMFLOW_TEST_PG_ROOT")))


@pytest.fixture
def pg_datadir() -> Iterator[Path]:
    """An empty directory for a test's own EmbeddedPostgres; removed afterwards."""
    path = _new_datadir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    datadir = _new_datadir()
    server = EmbeddedPostgres(datadir, settings=TEST_SETTINGS)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: EmbeddedPostgres) -> Iterator[str]:
    """DSN of an empty database created for this test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    if not pg_server.running():
        # A test that stopped the shared server must not break the ones after it.
        pg_server.start()

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_server.dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_sync(lambda: admin(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_server.dsn_for(name)
    finally:
        if not pg_server.running():
            pg_server.start()
        # FORCE: a test's pool may still hold connections when it ends.
        run_sync(lambda: admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
