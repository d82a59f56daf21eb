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
