"""``dicomflow series --tenant T --study S``: the series of one study, read from the series index.

The seeds' ``get_state_metaes(tenant, study)`` through :class:`sinks.index.SeriesIndex`, on
whichever provider is configured: DICOMFLOW_INDEX_DSN, else DICOMFLOW_POSTGRES_DSN, else the
embedded PostgreSQL of a running ``dicomflow up`` on this DICOMFLOW_HOME.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from datetime import date, datetime, time
from typing import Any

import click
import orjson

from core.errors import ConfigError, DicomflowError
from core.settings import Secret, Settings, mask_dsn

__all__ = ["COMMANDS", "series"]

_COLUMNS = (("series_uid", 64), ("modality", 8), ("series_number", 7), ("series_related_instances", 9),
            ("series_description", 30), ("updated_time", 26), ("version", 7))
_HEADERS = {"series_number": "number", "series_related_instances": "instances"}


def _index_dsn(settings: Settings) -> Secret:
    if settings.index_dsn is not None:
        return settings.index_dsn
    from dicomflow.embedded.postgres import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.home / "postgres")
    if embedded.running():
        return Secret(embedded.start().dsn)  # adopts the running server; starts nothing
    raise ConfigError("no series index: set DICOMFLOW_INDEX_DSN (postgresql:// or mysql://) or "
                      "DICOMFLOW_POSTGRES_DSN, or run `dicomflow up` on this DICOMFLOW_HOME",
                      field="DICOMFLOW_INDEX_DSN")


async def _read(dsn: Secret, tenant: str, study: str) -> list[Any]:
    from sinks.index import index_for_dsn

    # Read-only: never create tables on a server we only look at.
    index = index_for_dsn(dsn, apply_schema=False, connect_timeout=5.0)
    try:
        await index.start()
        return list(await index.series_of_study(tenant, study))
    finally:
        await index.stop()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date | time):
        return value.isoformat()
    return value


@click.command("series")
@click.option("--tenant", required=True, help="Tenant id.")
@click.option("--study", required=True, help="StudyInstanceUID.")
@click.option("--json", "as_json", is_flag=True, help="Every column of every series, as a JSON array.")
def series(tenant: str, study: str, as_json: bool) -> None:
    """Series of a study in the series index (the seeds' get_state_metaes)."""
    try:
        settings = Settings.from_env()
        dsn = _index_dsn(settings)
        rows = asyncio.run(_read(dsn, tenant, study))
    except DicomflowError as exc:
        click.secho(f"error: {exc.code}: {exc.message}", fg="red", err=True)
        sys.exit(2)
    if as_json:
        out = [{k: _plain(v) for k, v in dataclasses.asdict(r).items()} for r in rows]
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        click.echo(f"no series for tenant {tenant!r} study {study!r} in {mask_dsn(dsn.get())}", err=True)
        sys.exit(1)
    first = rows[0]
    click.echo(f"study {study}  tenant {tenant}  patient {first.patient_id}  date {first.study_date}  "
               f"accession {first.accession_number}  series {len(rows)}")
    click.echo("  ".join(_HEADERS.get(name, name).ljust(width) for name, width in _COLUMNS).rstrip())
    for r in rows:
        cells = ["" if getattr(r, name) is None else str(_plain(getattr(r, name))) for name, _ in _COLUMNS]
        click.echo("  ".join(c.ljust(width) for c, (_, width) in zip(cells, _COLUMNS, strict=True)).rstrip())


COMMANDS = [series]
