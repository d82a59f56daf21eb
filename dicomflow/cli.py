"""The ``dicomflow`` command line (click, as Faust itself uses).

Each command is thin: it builds settings, then hands over to the module that does
the work.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from schemas import codec

__all__ = ["main"]


def _settings(**overrides: Any) -> Any:
    """Settings from the environment; ``overrides`` are flags given by variable name (None: not given)."""
    from core.settings import Settings

    return Settings.from_env(**overrides)


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
    from dicom.extract import extract
    from schemas.identity import trace_id_for

    failures = 0
    for path in files:
        result = extract(path, tenant, trace_id="")
        if isinstance(result, Exception):
            failures += 1
            out: dict[str, Any] = {"file": str(path), "error": result.as_dict()}
        else:
            result.object.trace_id = trace_id_for(tenant, result.image.sop_uid, _storage_relative(path))
            out = {"file": str(path), **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}}
        if as_json:
            click.echo(codec.dumps(out).decode())
        else:
            _print_human(out)
    sys.exit(1 if failures == len(files) else 0)


def _storage_relative(path: Path) -> str:
    """The path as events carry it (relative to the storage root when inside it), so the
    trace id shown is the one backfill would publish."""
    root = _settings().storage_root.resolve()
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if root in resolved.parents else str(path)


def _logging(level: str) -> None:
    from core.logs import setup_logging

    setup_logging(level)


@main.command()
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else embedded).")
@click.option("--partitions", type=int, help="Topic partition count (DICOMFLOW_PARTITIONS).")
@click.option("--web-port", type=int, help="Port of the worker's web/metrics endpoint.")
@click.option("--loglevel", "-l", default=None, help="Log level (DICOMFLOW_LOG_LEVEL).")
def worker(broker: str | None, partitions: int | None, web_port: int | None, loglevel: str | None) -> None:
    """Run a Faust worker (same as `faust -A streams.app worker`)."""
    from dicomflow.embedded.broker import embedded_broker_for
    from streams.app import create_app, run_worker

    settings = _settings(DICOMFLOW_BROKER=broker, DICOMFLOW_PARTITIONS=partitions, DICOMFLOW_WEB_PORT=web_port,
                         DICOMFLOW_LOG_LEVEL=loglevel)
    # With no broker configured, this worker runs on the embedded one (started here if none listens).
    embedded = _run_or_exit(lambda: embedded_broker_for(settings))
    try:
        _run_or_exit(lambda: run_worker(create_app(settings)))
    finally:
        if embedded is not None:
            embedded.stop()


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tenant", default=None,
              help="Tenant id of every file (default: DICOMFLOW_DEFAULT_TENANT; on the embedded stack 'default').")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the embedded one).")
@click.option("--no-progress", is_flag=True, help="No progress bar (it shows the rate and the time left).")
def backfill(directory: Path, tenant: str | None, broker: str | None, no_progress: bool) -> None:
    """Publish one storage event per file below DIRECTORY (inside the storage root)."""
    import time

    from feeders.backfill import backfill as run_backfill
    from feeders.tenancy import default_tenant

    settings = _settings(DICOMFLOW_BROKER=broker)
    tenant = tenant or default_tenant(settings)
    if tenant is None:
        raise click.UsageError("--tenant is required with an external broker (or set DICOMFLOW_DEFAULT_TENANT)")
    started = time.monotonic()
    summary = _with_publisher(settings, lambda publisher: run_backfill(
        directory, storage_root=settings.storage_root, tenant=tenant, worker=settings.worker_id,
        publisher=publisher, progress=not no_progress, json_root=settings.json_documents_root))
    elapsed = time.monotonic() - started
    click.echo(f"backfill: tenant={tenant} files={summary.files} published={summary.published} "
               f"failed={summary.failed} without_dicom_ids={summary.unreadable_headers} "
               f"in {elapsed:.1f} s ({summary.published / elapsed if elapsed > 0 else 0.0:.1f} published/s)")
    for line in summary.errors[:20]:
        click.echo(f"  {line}", err=True)
    sys.exit(1 if summary.failed else 0)


@main.command("replay-dlq")
@click.option("--code", "codes", multiple=True,
              help="Only dead letters with this error code (repeat for several), e.g. FILE_MISSING.")
@click.option("--tenant", default=None, help="Only letters of this tenant (the original's tenant_id).")
@click.option("--since", default=None,
              help="Only letters written since: a duration back (15m, 2h, 3d) or a date/time (2026-12-02T08:00).")
@click.option("--topic", type=click.Choice(["storage"]), default="storage", show_default=True,
              help="Only storage_queue_dlq holds storage events; sink letters are rows (fix, then replay the events).")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the embedded one).")
@click.option("--resume", is_flag=True,
              help="Only letters no earlier --resume run (with the same --code/--tenant) replayed; record this "
                   "run's end.")
def replay_dlq(codes: tuple[str, ...], tenant: str | None, since: str | None, topic: str, broker: str | None,
               resume: bool) -> None:
    """Re-publish dead letters to storage_queue once their cause is fixed (filters as in `dlq list`)."""
    from feeders.deadletters import LetterFilter, parse_since
    from feeders.replay import replay_dead_letters
    from streams.broker import bootstrap_of

    settings = _settings(DICOMFLOW_BROKER=broker)
    where = _run_or_exit(lambda: LetterFilter(frozenset(codes), tenant, parse_since(since) if since else None))
    # One progress group per filter (--since moves with time, so it is not part of the name).
    name = "-".join(sorted(codes)) or "all"
    group = f"{settings.app_id}-replay-dlq-{name}" + (f"-tenant-{tenant}" if tenant else "") if resume else None
    summary = _with_publisher(settings, lambda publisher: replay_dead_letters(
        bootstrap_of(settings.broker_url), publisher, resume_group=group, where=where))
    click.echo(f"replay-dlq: scanned={summary.scanned} replayed={summary.replayed} by_code={summary.by_code}"
               + (f" not_replayable_truncated={summary.truncated}" if summary.truncated else "")
               + (f" already_done={summary.already_done} progress_group={group}" if group else ""))


@main.command()
@click.option("--workers", type=int, default=None, help="Worker processes (DICOMFLOW_WORKERS, default 1).")
def up(workers: int | None) -> None:
    """Run the whole stack: embedded broker and PostgreSQL (unless configured), worker(s), SCP."""
    from dicomflow.stack import Stack

    settings = _settings(DICOMFLOW_WORKERS=workers)
    _logging(settings.log_level)
    stack = Stack(settings, workers=settings.workers, echo=click.echo)
    stack.catch_stop_signals()  # a stop asked while starting drains once started, never kills
    try:
        info = _run_or_exit(stack.start)
        ready = stack.wait_ready(timeout=90)
    except BaseException:
        stack.stop()
        raise
    if stack.stopping:
        click.echo("dicomflow: a stop was asked while starting: draining and stopping")
        sys.exit(stack.supervise())
    # One write, headline last-but-complete: whoever watches the output for "dicomflow is up"
    # (a script, a test, an operator's tail) must find every address with it, not half of them.
    head = click.style("dicomflow is up" if ready else "dicomflow started (the SCP is not accepting yet)",
                       fg="green" if ready else "yellow", bold=True)
    scp = info["scp"]
    lines = [head,
             f"  broker      {info['broker']}{'  (embedded Tansu, memory-only)' if info['broker_embedded'] else ''}",
             f"  postgres    {info['postgres_dsn']}{'  (embedded)' if info['postgres_embedded'] else ''}",
             f"  scp         {scp['aet']}@{scp['host']}:{scp['port']}  (C-STORE)",
             _tenant_line(settings, embedded=bool(info["broker_embedded"])),
             *(f"  worker      {w['web']}  metrics {w['metrics']}" for w in info["workers"]),
             f"  doris       {info['doris']}",
             f"  storage     {info['storage_root']}",
             f"  logs        {info['logs']}",
             "Ctrl-C drains and stops everything (a child that dies is restarted)."]
    click.echo("\n".join(lines))
    sys.exit(stack.supervise())


@main.command(hidden=True)
def relay() -> None:
    """Publish the journal to the broker and checkpoint it at drained points (run by `up`)."""
    import asyncio
    import logging
    import signal

    # A stop asked for while the relay is still starting (as `up` may, right after a recycle)
    # must drain, not kill it: noted here, before the slow imports, and honoured once it runs.
    asked: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: asked.append(signum))

    from dicomflow.stack import RELAY_NOT_DRAINED, read_stack_file
    from feeders.relay_service import run_relay

    settings = _settings()
    _logging(settings.log_level)
    # The lag probe joins the group's coordinator every round: aiokafka would log each time.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))

    def workers() -> list[str]:
        return [w["metrics"] for w in read_stack_file(settings.home).get("workers", [])]

    # `up` recycles the broker only after a drained relay: the exit code says which it was.
    if not _run_or_exit(lambda: asyncio.run(run_relay(settings, workers, stop_asked=lambda: bool(asked)))):
        sys.exit(RELAY_NOT_DRAINED)


@main.command()
@click.option("--port", type=int, help="Listen port (DICOMFLOW_SCP_PORT, default 11112).")
@click.option("--aet", help="AE title (DICOMFLOW_SCP_AET, default DICOMFLOW).")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the embedded one).")
def scp(port: int | None, aet: str | None, broker: str | None) -> None:
    """Run the C-STORE SCP alone (to scale feeders separately from workers)."""
    import asyncio

    from feeders.scp import serve

    settings = _settings(DICOMFLOW_SCP_PORT=port, DICOMFLOW_SCP_AET=aet, DICOMFLOW_BROKER=broker)
    _logging(settings.log_level)

    def started(server: Any) -> None:
        host, bound = server.address
        click.echo(f"scp listening aet={settings.scp_aet} address={host}:{bound} broker={settings.broker_url}")

    _run_or_exit(lambda: asyncio.run(serve(settings, broker_url=settings.broker_url, profile=settings.profile,
                                           on_started=started)))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="SCP port (default DICOMFLOW_SCP_PORT or 11112).")
@click.option("--aet", default=None, help="Called AE title (default DICOMFLOW_SCP_AET or DICOMFLOW).")
@click.option("--calling-aet", default="DICOMFLOW_SCU", show_default=True)
@click.option("--tls", is_flag=True, help="Use TLS; the SCP's certificate is verified against the system CAs.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Trust this CA bundle (or the SCP's self-signed certificate) instead; implies --tls.")
@click.option("--tls-server-name", help="Name the SCP's certificate must carry (default: --host).")
@click.option("--no-progress", is_flag=True)
def send(paths: tuple[Path, ...], host: str, port: int | None, aet: str | None, calling_aet: str,
         tls: bool, tls_ca: Path | None, tls_server_name: str | None, no_progress: bool) -> None:
    """Send files or folders to a C-STORE SCP over one association."""
    import ssl

    from dicomflow.tools.scu import send_paths

    settings = _settings()
    context: ssl.SSLContext | None = None
    if tls or tls_ca is not None:
        context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    summary = _run_or_exit(lambda: send_paths(paths, host, port or settings.scp_port, aet or settings.scp_aet,
                                              calling_aet, progress=not no_progress, ssl_context=context,
                                              server_hostname=tls_server_name))
    if summary.stopped:
        click.secho(f"send stopped: {summary.stopped}", fg="red", err=True)
    for row in summary.table():
        click.echo(row)
    click.echo(summary.line())
    sys.exit(0 if summary.ok else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--broker", help="kafka://host:port (default: the running stack's, else DICOMFLOW_BROKER).")
@click.option("--health", "health_only", is_flag=True,
              help="Health check: one line, no dead-letter count; exit 1 when a stage is stuck or a sink failing.")
@click.option("--stuck-minutes", type=click.FloatRange(min=0.0), default=10.0, show_default=True,
              help="Lag not moving (or a sink retrying without writing) this long is unhealthy.")
def status(as_json: bool, broker: str | None, health_only: bool, stuck_minutes: float) -> None:
    """Lag per topic and partition, dead letters by code, and the addresses in use.

    Exits 1 when a stage is stuck (lag not moving for --stuck-minutes) or a sink is failing,
    2 when the broker cannot be reached: usable as a health check. Each run records what it
    saw in $DICOMFLOW_HOME/health.json and judges against a run at least that long ago.
    """
    import asyncio

    from core.settings import mask_dsn
    from dicomflow.stack import read_stack_file
    from dicomflow.status import collect_status, health

    settings = _settings()
    stack = read_stack_file(settings.home)
    url = broker or settings.broker or stack.get("broker") or settings.broker_url
    report = _run_or_exit(lambda: asyncio.run(collect_status(url, settings.app_id, doris=settings.doris_enabled,
                                                             dead_letters=not health_only)))
    if settings.postgres_dsn is not None:
        report["postgres_dsn"] = mask_dsn(settings.postgres_dsn.get())
    else:
        report["postgres_dsn"] = stack.get("postgres_dsn")
    report["scp"] = stack.get("scp")
    report["children"] = stack.get("children", {})
    if "broker_memory" in stack:  # the embedded broker: its memory and how often `up` recycled it
        report["broker_memory"] = dict(stack["broker_memory"], recycles=stack.get("broker_recycles", 0))
    from dicomflow.status import sink_counters

    urls = [w["metrics"] for w in stack.get("workers", [])] or [f"http://127.0.0.1:{settings.web_port}/metrics"]
    report.update(sink_counters(urls))
    verdict = report["health"] = health(report, settings.home / "health.json", stuck_minutes * 60.0)
    if health_only and not as_json:
        click.echo(_health_line(verdict, stuck_minutes))
        sys.exit(0 if verdict["ok"] else 1)
    if as_json:
        click.echo(codec.dumps(report).decode())
        sys.exit(0 if verdict["ok"] else 1)
    click.secho(f"broker {report['broker']}  group {report['group']}  total lag {report['total_lag']}", bold=True)
    for topic, parts in report["topics"].items():
        for p in parts:
            lag = f"lag={p['lag']}" if "lag" in p else ""
            click.echo(f"  {topic:32} p{p['partition']:<3} end={p['end_offset']:<8} "
                       f"committed={p.get('committed_offset')!s:<8} {lag}")
    for topic, codes in report["dead_letters"].items():
        click.echo(f"  dead letters {topic}: {codes or 'none'}")
    for sink, values in sorted(report["sinks"].items()):
        fields = " ".join(f"{k}={v:g}" for k, v in sorted(values.items()))
        click.echo(f"  sink {sink}: {fields}")
    stale = report.get("json") or {}
    click.echo(f"  series JSON: stale series={stale.get('stale_series', 0):g} "
               f"oldest={stale.get('oldest_stale_seconds', 0):.0f}s")
    for name, child in sorted(report["children"].items()):
        if child.get("restarts") or not child.get("running", True):
            click.echo(f"  {name}: {'running' if child.get('running') else 'down'}, restarts={child.get('restarts')}, "
                       f"last exit code {child.get('last_exit')}")
    if report["unreachable"]:
        click.echo(f"  workers not reachable for counters: {', '.join(report['unreachable'])}")
    if "broker_memory" in report:
        mem = report["broker_memory"]
        click.echo(f"  embedded broker {mem['rss_mb']} MB (recycled at {mem['recycle_mb']} MB; "
                   f"{mem['recycles']} recycles)")
    click.echo(f"  postgres {report['postgres_dsn']}")
    click.secho(f"  {_health_line(verdict, stuck_minutes)}", fg="green" if verdict["ok"] else "red")
    sys.exit(0 if verdict["ok"] else 1)


def _health_line(verdict: dict[str, Any], stuck_minutes: float) -> str:
    if verdict["judged_over_s"] is None:
        return f"health: ok (first look; stuck stages and failing sinks are judged over {stuck_minutes:g} min)"
    problems = [f"{s['topic']} p{s['partition']} lag {s['lag']} not moving" for s in verdict["stuck"]]
    problems += [f"sink {name} retrying without writing" for name in verdict["failing_sinks"]]
    over = f"over {verdict['judged_over_s'] / 60:.1f} min"
    return f"health: ok ({over})" if verdict["ok"] else f"health: UNHEALTHY {over}: " + "; ".join(problems)


def _tenant_line(settings: Any, *, embedded: bool) -> str:
    """Which tenant unmapped callers (and `backfill` without --tenant) get, for `up`'s start lines."""
    from feeders.tenancy import EMBEDDED_DEFAULT_TENANT

    if settings.default_tenant:
        return f"  tenant      {settings.default_tenant}  (DICOMFLOW_DEFAULT_TENANT: unmapped AE titles, backfill)"
    if embedded:
        return (f"  tenant      {EMBEDDED_DEFAULT_TENANT}  (embedded stack: unmapped AE titles and backfill; "
                "set DICOMFLOW_DEFAULT_TENANT or DICOMFLOW_TENANT_BY_CALLING_AE to choose)")
    return "  tenant      none: unmapped AE titles are rejected (set DICOMFLOW_TENANT_BY_CALLING_AE)"


def _with_publisher(settings: Any, work: Any) -> Any:
    """Run ``await work(publisher)`` with a started storage-event publisher; exit on errors."""
    import asyncio

    from feeders.journal import JournalPublisher
    from feeders.publisher import EventPublisher

    async def run() -> Any:
        publisher: Any
        if settings.journal or settings.embedded_broker:
            # The embedded stack's broker keeps nothing: "published" means "in the journal",
            # and `up`'s relay takes it on to the broker.
            publisher = JournalPublisher(settings.journal_dir, "cli")
        else:
            publisher = EventPublisher(settings.broker_url, settings.profile, partitions=settings.partitions)
        await publisher.start()
        try:
            return await work(publisher)
        finally:
            await publisher.stop()

    return _run_or_exit(lambda: asyncio.run(run()))


def _run_or_exit(fn: Any) -> Any:
    from core.errors import DicomflowError

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
    for section in (k for k in out if k != "file"):
        click.secho(f"  [{section}]", fg="cyan")
        for name, value in codec.to_row(out[section]).items():
            if value is not None:
                click.echo(f"    {name:28} {value}")


def _add_module_commands() -> None:
    from dicomflow.commands import add_all

    add_all(main)


_add_module_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
