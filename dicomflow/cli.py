"""The ``dicomflow`` command line (click, as Faust itself uses).

Each command is thin: it builds settings, then hands over to the module that does
the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from schemas import codec

__all__ = ["main"]


def _settings(**overrides: Any) -> Any:
    from streams.settings import Settings

    settings = Settings.from_env()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return settings.replace(**changes) if changes else settings


@click.group()
@click.version_option(package_name="dicomflow")
def main() -> None:
    """dicomflow: DICOM storage events -> Faust -> PostgreSQL and Apache Doris."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tenant", required=True, help="Tenant id the records are built for.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, for scripts.")
def inspect(files: tuple[Path, ...], tenant: str, as_json: bool) -> None:
    """Show what the pipeline would extract from each FILE (the feeder's debugging tool)."""
    from schemas.extract import extract
    from schemas.identity import trace_id_for

    failures = 0
    for path in files:
        result = extract(path, tenant, trace_id="")
        if isinstance(result, Exception):
            failures += 1
            out: dict[str, Any] = {"file": str(path), "error": result.as_dict()}
        else:
            result.object.trace_id = trace_id_for(tenant, result.image.sop_uid, str(path))
            out = {"file": str(path), "state": result.state, "image": result.image, "object": result.object}
        if as_json:
            click.echo(codec.dumps(out).decode())
        else:
            _print_human(out)
    sys.exit(1 if failures == len(files) else 0)


def _apply_overrides(**env: Any) -> None:
    """CLI flags override the environment; settings are read from it afterwards."""
    import os

    for name, value in env.items():
        if value is not None:
            os.environ[name] = str(value)


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@main.command()
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else embedded).")
@click.option("--partitions", type=int, help="Topic partition count (DICOMFLOW_PARTITIONS).")
@click.option("--web-port", type=int, help="Port of the worker's web/metrics endpoint.")
@click.option("--loglevel", "-l", default=None, help="Log level (DICOMFLOW_LOG_LEVEL).")
def worker(broker: str | None, partitions: int | None, web_port: int | None, loglevel: str | None) -> None:
    """Run a Faust worker (same as `faust -A streams.app worker`)."""
    _apply_overrides(DICOMFLOW_BROKER=broker, DICOMFLOW_PARTITIONS=partitions, DICOMFLOW_WEB_PORT=web_port,
                     DICOMFLOW_LOG_LEVEL=loglevel)
    from streams.app import app, settings

    sys.argv = ["dicomflow-worker", "worker", "-l", settings.log_level.lower(), "--web-port",
                str(settings.web_port), "--web-host", "127.0.0.1"]
    app.main()


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tenant", required=True, help="Tenant id of every file.")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the embedded one).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def backfill(directory: Path, tenant: str, broker: str | None, no_progress: bool) -> None:
    """Publish one storage event per file below DIRECTORY (inside the storage root)."""
    import asyncio

    from feeders.backfill import backfill as run_backfill
    from feeders.publisher import EventPublisher
    from streams.topology import EMBEDDED_PROFILE, PRODUCTION_PROFILE

    _apply_overrides(DICOMFLOW_BROKER=broker)
    settings = _settings()
    profile = EMBEDDED_PROFILE if settings.broker_profile == "tansu" else PRODUCTION_PROFILE

    async def run() -> Any:
        publisher = EventPublisher(settings.broker_url, profile, partitions=settings.partitions)
        await publisher.start()
        try:
            return await run_backfill(directory, storage_root=settings.storage_root, tenant=tenant,
                                      worker=settings.worker_id, publisher=publisher, progress=not no_progress)
        finally:
            await publisher.stop()

    summary = _run_or_exit(lambda: asyncio.run(run()))
    click.echo(f"backfill: files={summary.files} published={summary.published} failed={summary.failed} "
               f"without_dicom_ids={summary.unreadable_headers}")
    for line in summary.errors[:20]:
        click.echo(f"  {line}", err=True)
    sys.exit(1 if summary.failed else 0)


@main.command("replay-dlq")
@click.option("--code", default=None, help="Only dead letters with this error code (e.g. FILE_MISSING).")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the embedded one).")
def replay_dlq(code: str | None, broker: str | None) -> None:
    """Re-publish dead letters to storage_queue once their cause is fixed."""
    import asyncio

    from feeders.publisher import EventPublisher
    from feeders.replay import replay_dead_letters
    from streams.admin import bootstrap_of
    from streams.topology import EMBEDDED_PROFILE, PRODUCTION_PROFILE

    _apply_overrides(DICOMFLOW_BROKER=broker)
    settings = _settings()
    profile = EMBEDDED_PROFILE if settings.broker_profile == "tansu" else PRODUCTION_PROFILE

    async def run() -> Any:
        publisher = EventPublisher(settings.broker_url, profile, partitions=settings.partitions)
        await publisher.start()
        try:
            return await replay_dead_letters(bootstrap_of(settings.broker_url), publisher, code=code)
        finally:
            await publisher.stop()

    summary = _run_or_exit(lambda: asyncio.run(run()))
    click.echo(f"replay-dlq: scanned={summary.scanned} replayed={summary.replayed} by_code={summary.by_code}")


def _run_or_exit(fn: Any) -> Any:
    from dicomflow.errors import DicomflowError

    try:
        return fn()
    except DicomflowError as exc:
        click.secho(f"error: {exc.code}: {exc.message}", fg="red", err=True)
        sys.exit(2)


def _print_human(out: dict[str, Any]) -> None:
    click.secho(out["file"], bold=True)
    if "error" in out:
        err = out["error"]
        click.secho(f"  rejected: {err['code']} field={err['field']}: {err['message']}", fg="red")
        return
    for section in ("state", "image", "object"):
        click.secho(f"  [{section}]", fg="cyan")
        for name, value in codec.to_row(out[section]).items():
            if value is not None:
                click.echo(f"    {name:28} {value}")


if __name__ == "__main__":  # pragma: no cover
    main()
