"""Shared fixtures. Area fixtures live in tests/fixtures_<area>.py, registered below."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicomflow.embedded.broker import EmbeddedBroker

pytest_plugins = [
    "tests.fixtures_postgres",
    "tests.fixtures_doris",
    "tests.fixtures_mysql",
]

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled_dicom_files() -> list[Path]:
    """Every .dcm bundled inside the installed pydicom package (never downloads)."""
    return sorted(PYDICOM_TEST_FILES.rglob("*.dcm"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A real Tansu broker for the whole session (memory-only, fresh each run)."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A Tansu broker of the test's own: stages and groups never see another test's topics."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A DICOMFLOW_HOME with an empty storage root."""
    (tmp_path / "home" / "storage").mkdir(parents=True)
    return tmp_path / "home"


@pytest.fixture
def ct_small() -> Path:
    return PYDICOM_TEST_FILES / "CT_small.dcm"


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp/aiokafka must talk to loopback directly even if a proxy is configured.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
