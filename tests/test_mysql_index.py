"""The series index's six operations (the seeds' DbProvider), on PostgreSQL and on MariaDB alike.

Every test runs against both real servers (``index_db``, tests/fixtures_mysql.py); rows are
read back through the provider interface and, where it matters, straight from the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from core.errors import SinkDataError, SinkRetryableError
from core.settings import Settings
from dicom.extract import Extracted, extract
from dicomflow.embedded.ports import free_port
from schemas.records import DicomJsonMeta, DicomStateMeta
from sinks.index import SeriesIndex, index_for_dsn, open_index
from sinks.mysql import MySQLIndex
from tests.fixtures_mysql import PASSWORD, IndexDb, MariaDB
from tests.harness import REPO

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456)


@pytest.fixture
def base_state(ct_small: Path) -> DicomStateMeta:
    result = extract(ct_small, "tenant-a", now=T0)
    assert isinstance(result, Extracted)
    return result.state


def series(base: DicomStateMeta, i: int, *, updated: datetime = T0, **changes: object) -> DicomStateMeta:
    return dataclasses.replace(base, series_uid=f"{base.series_uid}.{i}", updated_time=updated,
                               created_time=updated, **changes)  # type: ignore[arg-type]


def json_of(state: DicomStateMeta, flag: datetime, **changes: object) -> DicomJsonMeta:
    return dataclasses.replace(DicomJsonMeta(
        tenant_id=state.tenant_id, study_uid=state.study_uid, series_uid=state.series_uid,
        study_uid_hash=state.study_uid_hash, series_uid_hash=state.series_uid_hash,
        study_date_origin=state.study_date_origin, flag_time=flag), **changes)  # type: ignore[arg-type]


@pytest.fixture
async def index(index_db: IndexDb) -> AsyncIterator[SeriesIndex]:
    idx = index_for_dsn(index_db.dsn)
    await idx.start()
    try:
        yield idx
    finally:
        await idx.stop()


async def test_open_index_picks_the_provider_from_the_settings(index_db: IndexDb, tmp_path: Path) -> None:
    env = {"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_INDEX_DSN": index_db.dsn}
    idx = open_index(Settings.from_env(env))
    assert idx is not None and idx.name == index_db.kind and isinstance(idx, SeriesIndex)
    assert open_index(Settings.from_env({"DICOMFLOW_HOME": str(tmp_path)})) is None


async def test_states_saved_one_and_many_read_back_by_study(
        index: SeriesIndex, base_state: DicomStateMeta) -> None:
    one = series(base_state, 9, series_number=None)
    many = [series(base_state, i, series_number=3 - i) for i in range(3)]
    await index.save_state(one)
    assert await index.save_states(many) == []
    got = await index.series_of_study(base_state.tenant_id, base_state.study_uid)
    # by series number (missing last), then UID
    assert [dataclasses.asdict(s) for s in got] == [dataclasses.asdict(s) for s in [*reversed(many), one]]
    assert await index.series_of_study(base_state.tenant_id, "1.2.3.unknown") == []
    assert await index.series_of_study("other-tenant", base_state.study_uid) == []


async def test_a_refused_state_names_its_column(index: SeriesIndex, base_state: DicomStateMeta) -> None:
    with pytest.raises(SinkDataError) as info:
        await index.save_state(series(base_state, 1, patient_sex="MF"))
    assert info.value.field == "patient_sex"
    rejected = await index.save_states([series(base_state, 2), series(base_state, 3, series_number=2**31)])
    assert [(r.item.offset, r.error.field) for r in rejected] == [(1, "series_number")]
    got = await index.series_of_study(base_state.tenant_id, base_state.study_uid)
    assert [s.series_uid for s in got] == [series(base_state, 2).series_uid]


async def test_json_bookkeeping_upserts_and_stale_json_follows_it(
        index: SeriesIndex, base_state: DicomStateMeta) -> None:
    a = series(base_state, 1, updated=T0)
    b = series(base_state, 2, updated=T0 + timedelta(seconds=1))
    assert await index.save_states([b, a]) == []
    end = T0 + timedelta(minutes=1)

    async def pending() -> list[str]:
        return [s.series_uid for s in await index.stale_json(end)]

    assert await pending() == [a.series_uid, b.series_uid]  # oldest first
    assert await index.stale_json(T0) == []  # updated_time < end_time is strict
    assert [s.series_uid for s in await index.stale_json(end, limit=1)] == [a.series_uid]
    assert dataclasses.asdict((await index.stale_json(end))[0]) == dataclasses.asdict(a)
    assert await index.json_meta(a.tenant_id, a.study_uid, a.series_uid) is None

    first = json_of(a, a.updated_time or T0, created_time=T0, json_status=1, retry_times=2)
    await index.save_json_metas([first])
    assert await index.json_meta(a.tenant_id, a.study_uid, a.series_uid) == first
    assert await pending() == [b.series_uid]

    # A newer state of a: due again, until its JSON is recorded; created_time stays the first.
    a2 = series(base_state, 1, updated=T0 + timedelta(seconds=30))
    await index.save_state(a2)
    assert await pending() == [b.series_uid, a.series_uid]
    newer = json_of(a2, a2.updated_time or T0, created_time=T0 + timedelta(days=1), json_status=0, retry_times=0)
    # a late writer of the older flag_time, in the same call and after it: never wins
    await index.save_json_metas([newer, first])
    await index.save_json_metas([first])
    stored = await index.json_meta(a.tenant_id, a.study_uid, a.series_uid)
    assert stored == dataclasses.replace(newer, created_time=T0)
    assert await pending() == [b.series_uid]
    # retry_times and json_status are stored as given (same flag_time: a retry)
    await index.save_json_metas([dataclasses.replace(newer, json_status=2, retry_times=3)])
    stored = await index.json_meta(a.tenant_id, a.study_uid, a.series_uid)
    assert stored is not None and (stored.json_status, stored.retry_times) == (2, 3)
    # created_time missing: stamped
    await index.save_json_metas([json_of(b, b.updated_time or T0)])
    got_b = await index.json_meta(b.tenant_id, b.study_uid, b.series_uid)
    assert got_b is not None and got_b.created_time is not None
    assert await pending() == []


# -- the command line -------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}
    return {**env, "DICOMFLOW_HOME": str(tmp_path / "home"), **extra}


async def test_series_command_lists_a_studys_series(index: SeriesIndex, index_db: IndexDb,
                                                    base_state: DicomStateMeta, tmp_path: Path) -> None:
    states = [series(base_state, i, series_number=i + 1, modality="MR", series_related_instances=10 + i)
              for i in range(3)]
    assert await index.save_states(states) == []
    env = _env(tmp_path, DICOMFLOW_INDEX_DSN=index_db.dsn)

    table = await asyncio.to_thread(_cli, env, "series", "--tenant", base_state.tenant_id,
                                    "--study", base_state.study_uid)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert f"series {len(states)}" in lines[0] and base_state.patient_id in lines[0]
    assert [line.split()[0] for line in lines[2:]] == [s.series_uid for s in states]
    assert all(" MR " in line for line in lines[2:]) and " 12 " in lines[4]
    assert "Idx-S3cret" not in table.stdout + table.stderr

    as_json = await asyncio.to_thread(_cli, env, "series", "--tenant", base_state.tenant_id,
                                      "--study", base_state.study_uid, "--json")
    assert as_json.returncode == 0, as_json.stderr
    got = orjson.loads(as_json.stdout)
    assert [g["series_uid"] for g in got] == [s.series_uid for s in states]
    assert got[0]["study_date"] == base_state.study_date.isoformat() and got[2]["series_related_instances"] == 12

    none = await asyncio.to_thread(_cli, env, "series", "--tenant", "nobody", "--study", base_state.study_uid)
    assert none.returncode == 1 and "no series" in none.stderr


def test_series_command_without_an_index_says_what_to_set(tmp_path: Path) -> None:
    result = _cli(_env(tmp_path), "series", "--tenant", "t", "--study", "1.2")
    assert result.returncode == 2 and "DICOMFLOW_INDEX_DSN" in result.stderr


@pytest.mark.parametrize(("change", "answer"), [({"password": "Wr0ngSecret"}, "(1045) Access denied"),
                                                ({"database": "no_such_db"}, "(1049) Unknown database")])
def test_a_mysql_dsn_the_server_refuses_stops_the_worker_with_one_line(
        mysql_server: MariaDB, tmp_path: Path, change: dict[str, str], answer: str) -> None:
    dsn = mysql_server.dsn_for(change.get("database", "dicomflow"))
    if "password" in change:
        dsn = dsn.replace(f":{PASSWORD}@", f":{change['password']}@")
    # An unreachable broker: the index is checked before the worker connects to anything.
    env = _env(tmp_path, DICOMFLOW_INDEX_DSN=dsn, DICOMFLOW_BROKER="kafka://127.0.0.1:9")
    result = _cli(env, "worker")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "DICOMFLOW_INDEX_DSN" in lines[0] and answer in lines[0] and "mysql://dicomflow:****@" in lines[0]
    assert "Wr0ngSecret" not in lines[0] and PASSWORD not in lines[0]


def test_a_mysql_server_not_up_yet_is_waited_for_not_fatal(tmp_path: Path) -> None:
    index = MySQLIndex(f"mysql://u:pw@127.0.0.1:{free_port()}/db", connect_timeout=1)
    index.preflight(timeout=1)  # refused: no server answered; the worker retries later
    with pytest.raises(SinkRetryableError):
        asyncio.run(index.start())


def test_compose_mysql_profile_runs_mariadb_as_the_index() -> None:
    import shutil

    import yaml

    compose_file = REPO / "docker-compose.yml"
    services = yaml.safe_load(compose_file.read_text())["services"]
    mariadb, worker = services["mariadb"], services["worker-mysql"]
    assert mariadb["profiles"] == ["mysql"] and worker["profiles"] == ["mysql"]
    assert mariadb["image"].startswith("mariadb:10.11")
    assert "./schemas/sql/mysql.sql:/docker-entrypoint-initdb.d/10-dicomflow.sql:ro" in mariadb["volumes"]
    env = worker["environment"]
    assert env["DICOMFLOW_INDEX_DSN"].startswith("mysql://") and "@mariadb:3306/" in env["DICOMFLOW_INDEX_DSN"]
    assert env["DICOMFLOW_POSTGRES_DSN"] == "" and "postgres" not in worker["depends_on"]
    assert worker["depends_on"]["mariadb"] == {"condition": "service_healthy"}
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing (.ci/run installs Debian's)"
    proc = subprocess.run([tool, "-f", str(compose_file), "--profile", "mysql", "config", "--services"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {"mariadb", "worker-mysql"} <= set(proc.stdout.split())


# -- configuration and classification (no server) ---------------------------------------


def test_index_dsn_selects_the_provider_and_is_masked(tmp_path: Path) -> None:
    from core.errors import ConfigError

    home = {"DICOMFLOW_HOME": str(tmp_path)}
    mysql = Settings.from_env({**home, "DICOMFLOW_INDEX_DSN": "mysql://u:T0pSecret@db:3306/idx",
                               "DICOMFLOW_POSTGRES_DSN": "postgresql://p:PgSecret@pg/x"})
    assert mysql.index_dsn is not None and mysql.index_dsn.get().startswith("mysql://")
    assert mysql.index_dsn_variable == "DICOMFLOW_INDEX_DSN"
    assert mysql.postgres_dsn is not None  # still there for the PostgreSQL helpers
    described = str(mysql.describe())
    assert "T0pSecret" not in described and "PgSecret" not in described and "mysql://u:****@db:3306/idx" in described
    legacy = Settings.from_env({**home, "DICOMFLOW_POSTGRES_DSN": "postgresql://p:PgSecret@pg/x"})
    assert legacy.index_dsn == legacy.postgres_dsn and legacy.index_dsn_variable == "DICOMFLOW_POSTGRES_DSN"
    pg_index = Settings.from_env({**home, "DICOMFLOW_INDEX_DSN": "postgresql://p@pg/x"})
    assert pg_index.postgres_dsn is not None and pg_index.postgres_dsn.get() == "postgresql://p@pg/x"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**home, "DICOMFLOW_INDEX_DSN": "oracle://u:Hidden@db/x"})
    assert info.value.field == "DICOMFLOW_INDEX_DSN" and "Hidden" not in info.value.message
    with pytest.raises(ConfigError, match="names no database"):
        MySQLIndex("mysql://u:pw@db:3306/")
    assert "pw" not in repr(MySQLIndex("mysql://u:pw@db:3306/x"))


def test_mysql_errors_are_classified_for_the_sink_contract() -> None:
    from asyncmy import errors

    from core.errors import SinkError
    from sinks.mysql import IndexRefusedError, UnexpectedMySQLError, _data_error, translate

    retryable = [OSError("refused"), TimeoutError(), errors.InterfaceError(0, ""),
                 errors.OperationalError(2003, "Can't connect"), errors.OperationalError(2013, "Lost connection"),
                 errors.OperationalError(1213, "Deadlock found"), errors.OperationalError(1205, "Lock wait timeout"),
                 errors.OperationalError(1053, "Server shutdown in progress"), errors.OperationalError(1040, "Too many")]
    for exc in retryable:
        error = translate(exc, "write")
        assert isinstance(error, SinkRetryableError) and not isinstance(error, UnexpectedMySQLError), exc
    # A dropped table, a REVOKE, a rotated password mid-run: retried with an alert, never acked.
    for exc in [errors.ProgrammingError(1146, "Table 'x' doesn't exist"),
                errors.OperationalError(1045, "Access denied"), errors.OperationalError(1142, "command denied")]:
        assert isinstance(translate(exc, "write"), UnexpectedMySQLError), exc
    refused = translate(errors.OperationalError(1045, "Access denied for user 'u'"), "connect", first_start=True,
                        dsn="mysql://u:Pw@h:1/d")
    assert isinstance(refused, IndexRefusedError) and isinstance(refused, SinkError)
    assert not isinstance(refused, SinkRetryableError) and "Pw" not in refused.message
    # The refused value is patient data: it never reaches the reason.
    data = _data_error(errors.DataError(1366, "Incorrect integer value: 'SMITH^JOHN' for column "
                                              "`db`.`dicom_state_meta`.`series_number` at row 3"))
    assert data.field == "series_number" and "SMITH" not in data.message


def test_a_mysql_index_registers_the_state_stage(tmp_path: Path) -> None:
    from streams.app import create_app

    # Nothing listens on port 9: the preflight leaves it to the worker's retries.
    settings = Settings.from_env({"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_BROKER": "kafka://127.0.0.1:9",
                                  "DICOMFLOW_INDEX_DSN": "mysql://u:pw@127.0.0.1:9/idx"})
    app = create_app(settings)
    assert "postgres_sink" in {agent.name for agent in app.agents.values()}
    assert "mysql" in app.metrics.stages and "series_facts" in app.metrics.stages


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_a_non_finite_number_is_refused_by_mysql_naming_the_column_never_retried(
        index: SeriesIndex, index_db: IndexDb, base_state: DicomStateMeta, value: float) -> None:
    """A DS of "NaN" or "inf" parses as a float. PostgreSQL's double precision stores it; MySQL's
    DOUBLE cannot, and the driver refuses it client-side naming no column: an error that was
    retried forever, stalling the partition."""
    rejected = await index.save_states([series(base_state, 1, patient_size=value), series(base_state, 2)])
    stored = {s.series_uid for s in await index.series_of_study(base_state.tenant_id, base_state.study_uid)}
    if index_db.kind == "mysql":
        assert [(r.item.offset, r.error.field) for r in rejected] == [(0, "patient_size")]
        assert stored == {series(base_state, 2).series_uid}
    else:
        assert rejected == [] and len(stored) == 2


async def test_stale_rows_are_counted_one_by_one_and_in_batches(index_db: IndexDb, base_state: DicomStateMeta) -> None:
    sink = index_for_dsn(index_db.dsn)
    await sink.start()
    try:
        newer = [series(base_state, i, updated=T0 + timedelta(hours=1)) for i in range(3)]
        older = [series(base_state, i, updated=T0) for i in range(3)]
        await sink.save_state(older[0])   # an insert, alone
        await sink.save_state(newer[0])   # a change, alone
        await sink.save_state(older[0])   # stale, alone
        assert sink.counters["stale_skipped"] == 1
        assert await sink.save_states(newer) == []  # one unchanged (counted stale on MySQL only), two inserts
        assert await sink.save_states(older) == []  # three stale
        assert sink.counters["stale_skipped"] == (5 if index_db.kind == "mysql" else 4)
    finally:
        await sink.stop()
