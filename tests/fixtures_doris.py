"""Doris Stream Load emulator fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.doris_emulator import DorisEmulator

DORIS_USER = "dicomflow"
# ':' '@' '/' exercise the userinfo quoting of the FE's redirect Location.
DORIS_PASSWORD = "s3cr:t@p/w"
DORIS_DB = "dicomflow"


@pytest.fixture
async def doris_emulator() -> AsyncIterator[DorisEmulator]:
    """A started FE+BE emulator on loopback; ``.user``/``.password``/``.fe_url``, db ``dicomflow``."""
    emulator = DorisEmulator(user=DORIS_USER, password=DORIS_PASSWORD, databases=(DORIS_DB,))
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()
