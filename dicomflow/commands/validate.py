"""``dicomflow validate [FILE|-]``: check storage events against the published contract.

Thin: reads the input, :mod:`feeders.validation` checks each event with the pipeline's own
validator, this prints one line per problem (where, JSON path, rule, why) and exits 1 if
any event fails.
"""

from __future__ import annotations

import sys

import click

__all__ = ["COMMANDS"]


@click.command()
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@click.option("--check-files", is_flag=True,
              help="Also open each event's file under the storage root (DICOMFLOW_STORAGE_ROOT) as ingest does "
                   "and read its header.")
@click.option("--quiet", "-q", is_flag=True, help="Only the problems and the summary line.")
def validate(source: click.utils.LazyFile, check_files: bool, quiet: bool) -> None:
    """Check storage events in SOURCE (a file, or - for stdin): one JSON object per line, or a JSON
    array. Prints every error with its JSON path and rule; exits 1 if any event fails."""
    from core.settings import Settings
    from feeders.validation import check_text

    root = Settings.from_env().storage_root if check_files else None
    results = check_text(source.read(), storage_root=root)
    failed = 0
    for checked in results:
        label = f"{checked.where}" + (f" trace_id={checked.trace_id}" if checked.trace_id else "")
        if checked.ok:
            if not quiet:
                click.echo(f"{label}: ok")
            continue
        failed += 1
        for p in checked.problems:
            click.echo(f"{label}: {p.path}: [{p.rule}] {p.message}")
    summary = f"validate: {len(results)} events, {len(results) - failed} valid, {failed} invalid"
    click.secho(summary + (f" (files checked under {root})" if root else ""), fg="red" if failed else "green",
                err=True)
    sys.exit(1 if failed or not results else 0)


COMMANDS = [validate]
