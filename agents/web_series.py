"""Series metadata on the worker's web port (Faust's own web server), WADO-RS style.

- ``GET /studies/{study}/series/{series}/metadata``: the series' JSON document
  (``application/dicom+json``), streamed from its file in chunks, never loaded whole. A gzip
  document goes out as is to a client that accepts gzip, inflated on the fly otherwise.
- ``GET /studies/{study}/series``: the series rows of the study from the index (the seeds'
  ``get_state_metaes``), as JSON.

The tenant comes from the ``X-Tenant-Id`` header or the ``tenant`` query parameter. Unknown
ids answer 404, malformed ones 400, an unreachable index 503, each with
``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from schemas import codec
from sinks.json_documents import Lookup, check_ids, find_document, iter_document

if TYPE_CHECKING:
    from faust.web import View

    from core.settings import Settings
    from sinks.index import SeriesIndex
    from streams.app import DicomflowApp

__all__ = ["register", "TENANT_HEADER", "DICOM_JSON"]

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Tenant-Id"
DICOM_JSON = "application/dicom+json"
_STATUS = {"BAD_REQUEST": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503}


def _error(code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=_STATUS.get(code, 500), body=body, content_type="application/json")


def _tenant(request: web.Request) -> str | None:
    return request.headers.get(TENANT_HEADER) or request.query.get("tenant") or None


async def stream_document(request: web.Request, lookup: Lookup) -> web.StreamResponse:
    """Send the document in chunks read in a thread (the event loop never waits on the disk)."""
    assert lookup.path is not None
    raw_gzip = lookup.compressed and "gzip" in request.headers.get("Accept-Encoding", "")
    response = web.StreamResponse(headers={"Content-Type": DICOM_JSON})
    if raw_gzip:
        response.headers["Content-Encoding"] = "gzip"
    chunks = iter_document(lookup.path, compressed=lookup.compressed, decompress=not raw_gzip)
    await response.prepare(request)
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await response.write(chunk)
    finally:
        chunks.close()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


def register(app: DicomflowApp, settings: Settings, index: SeriesIndex) -> None:
    """The two views, on ``index`` (the JSON stage's own)."""
    root = settings.json_documents_root

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
