"""Series metadata on the worker's web port (Faust's own web server), WADO-RS style.

- ``GET /studies/{study}/series/{series}/metadata``: the series' JSON document
  (``application/dicom+json``), streamed from its file in chunks, never loaded whole. A gzip
  document goes out as is to a client that accepts gzip, inflated on the fly otherwise.
- ``GET /studies/{study}/series``: the series rows of the study from the index (the seeds'
  ``get_state_metaes``), as JSON.
- ``GET /studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}[/{item}/{tag}…]``: what
  a document's BulkDataURI names, the element's value as ``application/octet-stream``, streamed
  from the instance file (found through the path the index records; dicom/bulkdata.py).

The tenant comes from the ``X-Tenant-Id`` header or the ``tenant`` query parameter. Unknown
ids answer 404, malformed ones 400, an unreachable index 503, each with
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from core.errors import DicomflowError
from dicom.bulkdata import BulkValue, iter_value, locate, parse_tag_path
from dicom.json_model import JsonOptions
from dicom.paths import path_components
from schemas import codec
from sinks.json_documents import Lookup, check_ids, find_document, iter_document, safe_component, series_directory

if TYPE_CHECKING:
    from faust.web import View

    from core.settings import Settings
    from sinks.index import SeriesIndex
    from sinks.series_facts import FactsBase
    from streams.app import DicomflowApp

__all__ = ["register", "TENANT_HEADER", "DICOM_JSON"]

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Tenant-Id"
DICOM_JSON = "application/dicom+json"
_STATUS = {"BAD_REQUEST": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503}
_SOP = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _error(code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=_STATUS.get(code, 500), body=body, content_type="application/json")


def _tenant(request: web.Request) -> str | None:
    return request.headers.get(TENANT_HEADER) or request.query.get("tenant") or None


async def stream_document(request: web.Request, lookup: Lookup) -> web.StreamResponse:
    """Send the document in chunks read in a thread (the event loop never waits on the disk)."""
    assert lookup.path is not None
    raw_gzip = lookup.compressed and "gzip" in request.headers.get("Accept-Encoding", "")
    chunks = iter_document(lookup.path, compressed=lookup.compressed, decompress=not raw_gzip)
    return await _stream_chunks(request, chunks, DICOM_JSON, None,
                                {"Content-Encoding": "gzip"} if raw_gzip else None)


async def _stream_chunks(request: web.Request, chunks: Iterator[bytes], content_type: str,
                         length: int | None, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send ``chunks``, each read in a thread (the event loop never waits on the disk)."""
    response = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await response.write(chunk)
    finally:
        chunks.close()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


async def _instance_file(index: SeriesIndex, facts: FactsBase | None, storage_root: Path, tenant: str,
                         study: str, series: str, sop: str) -> Path | Lookup:
    """The instance's file: its indexed path, else where the C-STORE SCP stores it."""
    listed = await facts.instances(tenant, study, series) if facts is not None else []
    known = next((i for i in listed if i.sop_uid == sop), None)
    if facts is not None and known is None:
        return Lookup(code="NOT_FOUND", message=f"unknown instance: tenant={tenant} study={study} series={series} "
                                                f"sop={sop}")
    if known is not None and known.path is not None:
        try:
            return storage_root.joinpath(*path_components(storage_root, known.path))
        except DicomflowError as exc:
            return Lookup(code="NOT_FOUND", message=f"instance {sop}: indexed path refused: {exc}")
    row = next((r for r in await index.series_of_study(tenant, study) if r.series_uid == series), None)
    if row is None:
        return Lookup(code="NOT_FOUND", message=f"unknown series: tenant={tenant} study={study} series={series}")
    directory = series_directory(storage_root, tenant, row.study_date_origin, study, series)
    return directory / f"{safe_component(sop)}.dcm"


def register(app: DicomflowApp, settings: Settings, index: SeriesIndex, facts: FactsBase | None = None) -> None:
    """The views, on ``index`` and ``facts`` (the JSON stage's own)."""
    root = settings.json_documents_root
    storage_root = Path(settings.storage_root)
    defer_size = JsonOptions(bulk_threshold=settings.json_bulk_threshold).defer_size

    @app.page("/studies/{study}/series/{series}/metadata", name="series_metadata")
    async def series_metadata(view: View, request: Any, study: str, series: str) -> Any:
        try:
            lookup = await find_document(index, root, _tenant(request) or "", study, series)
        except Exception as exc:  # noqa: BLE001 - the index down: say so, do not crash the view
            log.warning("metadata view: index unavailable: %s", exc)
            return _error("UNAVAILABLE", "series index unavailable")
        if not lookup.found:
            return _error(lookup.code, lookup.message)
        return await stream_document(request, lookup)

    @app.page("/studies/{study}/series", name="study_series")
    async def study_series(view: View, request: Any, study: str) -> Any:
        tenant = _tenant(request)
        bad = check_ids(tenant, study)
        if bad is not None:
            return _error(bad.code, bad.message)
        assert tenant is not None
        try:
            rows = await index.series_of_study(tenant, study)
        except Exception as exc:  # noqa: BLE001
            log.warning("study series view: index unavailable: %s", exc)
            return _error("UNAVAILABLE", "series index unavailable")
        if not rows:
            return _error("NOT_FOUND", f"unknown study: tenant={tenant} study={study}")
        return web.Response(body=codec.dumps(rows), content_type="application/json")

    @app.page("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tags:.+}", name="series_bulkdata")
    async def series_bulkdata(view: View, request: Any, study: str, series: str, sop: str, tags: str) -> Any:
        tenant = _tenant(request)
        bad = check_ids(tenant, study, series)
        if bad is not None:
            return _error(bad.code, bad.message)
        assert tenant is not None
        if not _SOP.fullmatch(sop):
            return _error("BAD_REQUEST", "instance: not a UID")
        try:
            tag_path = parse_tag_path(tags)
        except ValueError as exc:
            return _error("BAD_REQUEST", str(exc))
        try:
            found = await _instance_file(index, facts, storage_root, tenant, study, series, sop)
        except Exception as exc:  # noqa: BLE001 - the index down: say so, do not crash the view
            log.warning("bulkdata view: index unavailable: %s", exc)
            return _error("UNAVAILABLE", "series index unavailable")
        if isinstance(found, Lookup):
            return _error(found.code, found.message)
        if not found.is_file():
            return _error("NOT_FOUND", f"instance {sop}: its file is gone")
        try:
            where: BulkValue | None = await asyncio.to_thread(locate, found, tag_path, defer_size)
        except DicomflowError as exc:
            return _error("NOT_FOUND", f"instance {sop}: {exc}")
        if where is None:
            return _error("NOT_FOUND", f"instance {sop} has no element at {tags}")
        length = len(where.data) if where.data is not None else where.length
        return await _stream_chunks(request, iter_value(found, where), "application/octet-stream", length)
