"""``dicomflow dlq``: browse the dead letters of both dead-letter topics (list, show, export).

Thin: options in, :mod:`feeders.deadletters` reads and filters, lines out. ``replay-dlq``
(dicomflow/cli.py) takes the same filters (:func:`letter_filter_options`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["COMMANDS", "letter_filter_options", "broker_bootstrap"]


def broker_bootstrap(broker: str | None) -> str:
    """The broker to read: --broker, else DICOMFLOW_BROKER, else the running stack's, else the embedded one."""
    from core.settings import Settings
    from dicomflow.stack import read_stack_file
    from streams.broker import bootstrap_of

    settings = Settings.from_env()
    url = broker or settings.broker or read_stack_file(settings.home).get("broker") or settings.broker_url
    return bootstrap_of(str(url))


def letter_filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--code (repeatable), --tenant, --since: the filters of ``dlq list/export`` and ``replay-dlq``."""
    fn = click.option("--since", default=None,
                      help="Letters written since: a duration back (15m, 2h, 3d) or a date/time "
                           "(2026-12-02T08:00).")(fn)
    fn = click.option("--tenant", default=None, help="Only letters of this tenant (the original's tenant_id).")(fn)
    fn = click.option("--code", "codes", multiple=True,
                      help="Only letters with this error code (repeat for several), e.g. FILE_MISSING.")(fn)
    return fn


def _filter(codes: tuple[str, ...], tenant: str | None, since: str | None) -> Any:
    from core.errors import ConfigError
    from feeders.deadletters import LetterFilter, parse_since

    try:
        return LetterFilter(frozenset(codes), tenant, parse_since(since) if since else None)
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="--since") from None


def _topic_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--topic", type=click.Choice(["storage", "sink"]), default=None,
                        help="storage: storage_queue_dlq (refused events); sink: dicomflow_sink_dlq (refused rows). "
                             "Default: both.")(fn)


def _broker_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the running stack's).")(fn)


def _run(work: Callable[[], Any]) -> Any:
    from core.errors import DicomflowError

    try:
        return asyncio.run(work())
    except DicomflowError as exc:
        click.secho(f"error: {exc.code}: {exc.message}", fg="red", err=True)
        sys.exit(2)


@click.group()
def dlq() -> None:
    """Dead letters: list them, show one, export them (both dead-letter topics)."""


@dlq.command("list")
@_topic_option
@letter_filter_options
@_broker_option
def list_letters(topic: str | None, codes: tuple[str, ...], tenant: str | None, since: str | None,
                 broker: str | None) -> None:
    """One line per letter, oldest first: time, code, field, tenant, trace id, file path, and where it is."""
    from feeders.deadletters import read_letters, topics_for

    where = _filter(codes, tenant, since)
    letters = _run(lambda: read_letters(broker_bootstrap(broker), topics_for(topic), where))
    for letter in letters:
        row = letter.row()
        click.echo(f"{row['time'] or '-':19}  {row['code']:<22} {row['field'] or '-':<24} "
                   f"{row['tenant_id'] or '-':<16} {row['trace_id'] or '-':<36} {row['file_path'] or '-'}  "
                   f"@{letter.ref}")
    click.echo(f"{len(letters)} dead letter(s)", err=True)


@dlq.command()
@click.argument("ref")
@_topic_option
@_broker_option
def show(ref: str, topic: str | None, broker: str | None) -> None:
    """One letter in full: REF is topic:partition:offset (as `list` prints after @), partition:offset,
    an offset, or a trace id. Prints where it is, the reason, the envelope and the original event."""
    from feeders.deadletters import find_letter, topics_for

    letter = _run(lambda: find_letter(broker_bootstrap(broker), ref, topics_for(topic)))
    if letter is None:
        click.secho(f"no dead letter {ref!r} in {', '.join(topics_for(topic))}", fg="red", err=True)
        sys.exit(1)
    detail = letter.detail()
    reason = detail["reason"]
    click.secho(f"{letter.ref}  {reason.get('code')}  field={reason.get('field')}", bold=True)
    click.echo(f"reason: {reason.get('message')}")
    click.echo("envelope:")
    click.echo(_pretty(detail["envelope"]))
    click.echo("original:")
    click.echo(_pretty(detail["original"]) if detail["original"] is not None
               else "  (not kept whole: the letter carries its size, sha256 and first bytes)")


def _pretty(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return "\n".join(f"  {line}" for line in text.splitlines())


@dlq.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of stdout.")
@_topic_option
@letter_filter_options
@_broker_option
def export(fmt: str, output: Path | None, topic: str | None, codes: tuple[str, ...], tenant: str | None,
           since: str | None, broker: str | None) -> None:
    """Every matching letter as JSON lines (with the original) or CSV (the list's columns and more)."""
    from feeders.deadletters import read_letters, to_csv, to_jsonl, topics_for

    where = _filter(codes, tenant, since)
    letters = _run(lambda: read_letters(broker_bootstrap(broker), topics_for(topic), where))
    text = to_jsonl(letters) if fmt == "jsonl" else to_csv(letters)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
    click.echo(f"exported {len(letters)} dead letter(s)" + (f" to {output}" if output else ""), err=True)


COMMANDS = [dlq]
