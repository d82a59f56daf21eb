"""``dicomflow metadata STUDY SERIES --tenant T``: print a series' DICOM JSON document.

With a series index configured (``DICOMFLOW_INDEX_DSN`` or ``DICOMFLOW_POSTGRES_DSN``) the
command finds the document through ``dicom_json_meta`` and streams the file itself; otherwise
(the embedded stack, whose PostgreSQL DSN only ``up`` knows) it asks the running stack's worker
(``GET /studies/{study}/series/{series}/metadata``, the same document). Either way the document
is copied to stdout in chunks, never loaded whole. Exit code 1 with a JSON error on stderr when
there is no document.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click
import orjson

__all__ = ["COMMANDS", "metadata"]

_CHUNK = 256 * 1024


def _fail(code: str, message: str) -> None:
    click.echo(orjson.dumps({"error": {"code": code, "message": message}}).decode(), err=True)
    sys.exit(1)


def _direct(settings: Any, tenant: str, study: str, series: str) -> None:
    from sinks.index import open_index
    from sinks.json_documents import find_document, iter_document

    async def lookup() -> Any:
        index = open_index(settings)
        assert index is not None
        try:
            return await find_document(index, settings.json_documents_root, tenant, study, series)
        finally:
            await index.stop()

    found = asyncio.run(lookup())
    if not found.found:
        _fail(found.code, found.message)
    out = sys.stdout.buffer
    for chunk in iter_document(found.path, compressed=found.compressed):
        out.write(chunk)
    out.write(b"\n")
    out.flush()


def _via_worker(base: str, tenant: str, study: str, series: str) -> None:
    path = f"/studies/{urllib.parse.quote(study)}/series/{urllib.parse.quote(series)}/metadata"
    request = urllib.request.Request(base.rstrip("/") + path,  # noqa: S310 - the stack's own worker (http)
                                     headers={"X-Tenant-Id": tenant})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - the stack's own worker
            out = sys.stdout.buffer
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
            out.write(b"\n")
            out.flush()
    except urllib.error.HTTPError as exc:
        try:
            error = orjson.loads(exc.read())["error"]
            _fail(error["code"], error["message"])
        except (ValueError, KeyError, TypeError):
            _fail("HTTP_ERROR", f"{exc.code} from {base}")
    except OSError as exc:
        _fail("UNAVAILABLE", f"no series index configured and the stack's worker at {base} is not reachable: "
                             f"{exc}")


@click.command()
@click.argument("study")
@click.argument("series")
@click.option("--tenant", required=True, help="Tenant id of the series.")
def metadata(study: str, series: str, tenant: str) -> None:
    """Print the DICOM JSON document (PS3.18 F.2) of one series."""
    from core.settings import Settings
    from dicomflow.stack import read_stack_file

    settings = Settings.from_env()
    if settings.index_dsn is not None:
        _direct(settings, tenant, study, series)
        return
    workers = read_stack_file(settings.home).get("workers") or [{"web": f"http://127.0.0.1:{settings.web_port}"}]
    _via_worker(workers[0]["web"], tenant, study, series)


COMMANDS = [metadata]
