"""An in-process Apache Doris Stream Load emulator (FE + BE on two loopback ports).

Built from /work/shared/reference/doris-stream-load.md (section 9 checklist). What it
reproduces, because the sink's correctness depends on it:

* FE ``PUT /api/{db}/{table}/_stream_load``: Basic auth (bad password -> HTTP 200
  ``{"msg":"Unauthorized","code":401,...}``, or a real 401 with ``auth_mode="http401"``),
  ``Expect`` required (else 200 ``{"status":"FAILED","msg":"There is no 100-continue
  header"}``), then **307** to the BE on another port with ``user:password@`` in
  ``Location``. The FE never sends ``100 Continue``: the body goes to the BE only.
* BE: header checks run before ``100 Continue`` (as ``on_header`` does), so a refused
  request never uploads its body. The BE parses Basic auth itself (missing ->
  ``Status: Fail``, ``no valid Basic authorization``), checks the password again (as the
  FE's loadTxnBegin does), the label regex, unknown db/table, and labels per database:
  RUNNING -> ``Label Already Exists``/``RUNNING``, VISIBLE -> ``FINISHED``, ABORTED
  reusable. Always HTTP 200 with the exact field order of ``StreamLoadContext::to_json``,
  pretty-printed, trailing newline.
* Body: ``format: json`` with ``strip_outer_array`` / ``read_json_by_line`` (master
  default: line mode when neither is sent), ``columns`` mapping (plain names, backquotes
  allowed), ``max_filter_ratio``, ``strict_mode``. Every row is checked against the table
  (schemas/sql/doris.sql, or a DDL passed in: e.g. a server schema narrower than the
  repository's). Rows are cast by the emulator's own rules (not schemas.ddl.check_row),
  so the sink's pre-check is tested against an independent implementation.
* Storage: DUPLICATE KEY keeps every row, UNIQUE KEY upserts on the key, and a
  ``function_column.sequence_col`` never lets a smaller value replace a larger one.
* Faults, consumed one per BE request in arrival order (:meth:`DorisEmulator.inject`).

Not modelled: 2PC, group commit, CSV/parquet, ``columns`` expressions, ``where``,
partitions, label expiry by time (call :meth:`DorisEmulator.expire_labels`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import math
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal
from urllib.parse import quote

from aiohttp import web

from schemas.ddl import ColumnSpec, TableSpec, parse_ddl, tables

__all__ = ["DorisEmulator", "Fault", "FaultKind", "Txn", "LoadRecord", "FeRequest"]

FaultKind = Literal["fail", "publish_timeout", "http500", "reset", "reset_after_commit", "slow"]
FAULT_KINDS: tuple[str, ...] = ("fail", "publish_timeout", "http500", "reset", "reset_after_commit", "slow")

LABEL_RE = re.compile(r"^[-_A-Za-z0-9:]{1,128}$")


@dataclass(slots=True)
class Fault:
    """One injected fault. ``seconds`` is used by ``slow``; ``message`` by ``fail``."""

    kind: FaultKind
    seconds: float = 0.0
    message: str = "[INTERNAL_ERROR]cancelled: injected fault: tablet writer write failed"


@dataclass(slots=True)
class Txn:
    txn_id: int
    db: str
    table: str
    label: str
    state: str  # RUNNING | VISIBLE | ABORTED


@dataclass(slots=True)
class LoadRecord:
    """One BE request as the emulator saw it (the inspection log)."""

    db: str
    table: str
    label: str | None
    txn_id: int
    status: str  # Stream Load Status, or "HTTP 500" / "RESET" for transport faults
    message: str
    total: int = 0
    loaded: int = 0
    filtered: int = 0
    user: str | None = None
    fault: str | None = None
    existing_job_status: str | None = None


@dataclass(slots=True)
class FeRequest:
    db: str
    table: str
    user: str | None
    expect: str | None
    outcome: str  # redirect | no_expect | unauthorized


@dataclass(slots=True)
class _Ctx:
    """Header-stage result carried from the expect handler to the body handler."""

    db: str
    table: str
    fault: Fault | None
    reply: web.StreamResponse | None = None
    txn: Txn | None = None
    user: str | None = None
    started: float = field(default_factory=time.monotonic)


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep else None


def _is_true(value: str | None) -> bool:
    # Only the value "true" (any case) counts, as in the BE's header parsing.
    return value is not None and value.strip().lower() == "true"


# --- casts (the emulator's own, deliberately independent of schemas.ddl) -------------

_INT_BITS = {"TINYINT": 8, "SMALLINT": 16, "INT": 32, "BIGINT": 64}
_INT_TEXT = re.compile(r"^[+-]?\d+$")
_DATE_FORMS = (re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$"), re.compile(r"^(\d{4})(\d{2})(\d{2})$"))
_DATETIME_FORM = re.compile(
    r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T](\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,9}))?)?$"
)


class _CastError(Exception):
    pass


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    # Numbers, objects and arrays land in a string column as their JSON text.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _cast(col: ColumnSpec, value: Any) -> Any:
    """Cast a JSON value to the column type; raise _CastError when Doris cannot."""
    t = col.type
    if t in ("VARCHAR", "CHAR"):
        return _as_text(value)
    if t in _INT_BITS:
        if isinstance(value, bool):
            number = int(value)
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and _INT_TEXT.match(value.strip()):
            number = int(value.strip())
        else:
            raise _CastError
        bits = _INT_BITS[t]
        if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
            raise _CastError
        return number
    if t in ("DOUBLE", "FLOAT"):
        if isinstance(value, bool):
            raise _CastError
        try:
            number_f = float(value)
        except (TypeError, ValueError):
            raise _CastError from None
        if not math.isfinite(number_f):
            raise _CastError
        return number_f
    if t == "DATE":
        if not isinstance(value, str):
            raise _CastError
        text = value.strip()
        for form in _DATE_FORMS:
            m = form.match(text)
            if m:
                try:
                    return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
                except ValueError:
                    raise _CastError from None
        m = _DATETIME_FORM.match(text)
        if m:  # a DATETIME string into a DATE column keeps the date part
            try:
                return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            except ValueError:
                raise _CastError from None
        raise _CastError
    if t == "DATETIME":
        if not isinstance(value, str):
            raise _CastError
        m = _DATETIME_FORM.match(value.strip())
        if not m:
            raise _CastError
        parts = [int(g) if g else 0 for g in m.groups()[:6]]
        try:
            # DATETIME is DATETIME(0): the fraction is dropped [U: Doris may round instead].
            return datetime(*parts)  # type: ignore[arg-type]
        except ValueError:
            raise _CastError from None
    raise _CastError


class DorisEmulator:
    """FE + BE Stream Load emulator. ``await start()``, use ``fe_url``, ``await stop()``."""

    def __init__(
        self,
        *,
        user: str = "root",
        password: str = "",
        databases: Iterable[str] = ("dicomflow",),
        ddl: str | None = None,
        auth_mode: Literal["body401", "http401"] = "body401",
        host: str = "127.0.0.1",
        redirect_host: str | None = None,
        json_max_bytes: int = 100 * 1024 * 1024,
    ) -> None:
        #: streaming_load_json_max_mb: bodies over it fail in on_header, before any txn.
        self.json_max_bytes = json_max_bytes
        self.user = user
        self.password = password
        self.host = host
        #: The host name the FE's 307 names for the BE (default ``host``). The BE still listens on
        #: ``host``: e.g. ``localhost`` makes the redirect point at another host name than the FE's.
        self.redirect_host = redirect_host or host
        self.auth_mode = auth_mode
        specs = parse_ddl(ddl) if ddl is not None else tables()
        self.databases: dict[str, dict[str, TableSpec]] = {db: dict(specs) for db in databases}
        self.labels: dict[str, dict[str, Txn]] = {db: {} for db in self.databases}
        self.loads: list[LoadRecord] = []
        self.fe_requests: list[FeRequest] = []
        self.error_logs: dict[str, str] = {}
        self.faults: deque[Fault] = deque()
        self._dup: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._uniq: dict[tuple[str, str], dict[tuple[Any, ...], dict[str, Any]]] = {}
        self._txn_ids = itertools.count(1000)
        self._runners: list[web.AppRunner] = []
        # Header-stage results handed from the expect handler to the body handler.
        self._pending: dict[int, tuple[web.Request, _Ctx]] = {}
        self.fe_port = 0
        self.be_port = 0

    # --- lifecycle --------------------------------------------------------------------

    @property
    def fe_url(self) -> str:
        return f"http://{self.host}:{self.fe_port}"

    @property
    def be_url(self) -> str:
        return f"http://{self.host}:{self.be_port}"

    async def start(self) -> None:
        # Doris' own JSON body limit (streaming_load_json_max_mb, 100 MB), not aiohttp's 1 MiB.
        fe = web.Application(client_max_size=100 * 1024 * 1024)
        fe.router.add_route("PUT", "/api/{db}/{table}/_stream_load", self._fe_load,
                            expect_handler=self._fe_expect)
        be = web.Application(client_max_size=100 * 1024 * 1024)
        be.router.add_route("PUT", "/api/{db}/{table}/_stream_load", self._be_load,
                            expect_handler=self._be_expect)
        be.router.add_get("/api/_load_error_log", self._be_error_log)
        self.fe_port = await self._serve(fe)
        self.be_port = await self._serve(be)

    async def _serve(self, app: web.Application) -> int:
        # Bind the socket ourselves so the port is known without private aiohttp state.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)
        port: int = sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    async def __aenter__(self) -> DorisEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- inspection and control ---------------------------------------------------------

    def inject(self, kind: FaultKind, *, seconds: float = 0.0, message: str | None = None,
               count: int = 1) -> None:
        """Queue ``count`` faults; each upcoming BE request consumes one, in order.

        * ``fail``: Status Fail with a transient message, nothing stored, txn aborted.
        * ``publish_timeout``: data committed, Status ``Publish Timeout``.
        * ``http500``: HTTP 500 before anything happens (a proxy or crashing BE).
        * ``reset``: connection closed without an answer; nothing stored.
        * ``reset_after_commit``: data committed (label VISIBLE), then the connection is
          closed without an answer: the client cannot know it succeeded.
        * ``slow``: the load stays RUNNING for ``seconds`` before committing.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        for _ in range(count):
            fault = Fault(kind, seconds)
            if message is not None:
                fault.message = message
            self.faults.append(fault)

    def rows(self, table: str, db: str | None = None) -> list[dict[str, Any]]:
        """The visible rows of a table (typed values: date, datetime, int, float, str)."""
        key = (db or self._default_db(), table)
        if key in self._uniq:
            return [dict(r) for r in self._uniq[key].values()]
        return [dict(r) for r in self._dup.get(key, [])]

    def label_state(self, label: str, db: str | None = None) -> str | None:
        txn = self.labels[db or self._default_db()].get(label)
        return txn.state if txn else None

    def expire_labels(self) -> None:
        """Forget finished labels, as Doris does after ``streaming_label_keep_max_second``."""
        for labels in self.labels.values():
            for label in [k for k, t in labels.items() if t.state != "RUNNING"]:
                del labels[label]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"condition not met within {timeout:.1f}s")
            await asyncio.sleep(0.01)

    def _default_db(self) -> str:
        return next(iter(self.databases))

    # --- FE -----------------------------------------------------------------------------

    async def _fe_expect(self, request: web.Request) -> None:
        # The FE answers 307 on the headers alone and never asks for the body.
        return None

    async def _fe_load(self, request: web.Request) -> web.StreamResponse:
        db, table = request.match_info["db"], request.match_info["table"]
        expect = request.headers.get("Expect")
        auth = _basic_auth(request.headers.get("Authorization"))
        user = auth[0] if auth else None
        if auth is None or auth != (self.user, self.password):
            self.fe_requests.append(FeRequest(db, table, user, expect, "unauthorized"))
            detail = ("Need auth information." if auth is None else
                      f"Access denied for user '{user}'@'{request.remote}' (using password: YES)")
            if self.auth_mode == "http401":
                resp: web.StreamResponse = web.Response(
                    status=401, text="Unauthorized", headers={"WWW-Authenticate": 'Basic realm=""'})
            else:
                resp = web.json_response({"msg": "Unauthorized", "code": 401, "data": detail, "count": 0})
            resp.force_close()
            return resp
        if not expect:
            self.fe_requests.append(FeRequest(db, table, user, expect, "no_expect"))
            resp = web.json_response({"status": "FAILED", "msg": "There is no 100-continue header"})
            resp.force_close()
            return resp
        self.fe_requests.append(FeRequest(db, table, user, expect, "redirect"))
        # java.net.URI quoting of the userinfo: ':' and sub-delims stay, '@' '/' are escaped.
        safe = "-_.!~*'(),;:$&+="
        userinfo = f"{quote(self.user, safe=safe)}:{quote(self.password, safe=safe)}"
        location = f"http://{userinfo}@{self.redirect_host}:{self.be_port}{request.rel_url.raw_path_qs}"
        resp = web.Response(status=307, headers={"Location": location},
                            content_type="text/html", charset="utf-8")
        # The body was never asked for: do not keep a half-used connection around.
        resp.force_close()
        return resp

    # --- BE -----------------------------------------------------------------------------

    async def _be_expect(self, request: web.Request) -> web.StreamResponse | None:
        ctx = self._be_headers(request)
        if ctx.reply is not None:
            return ctx.reply
        # Holding the request keeps its id from being reused while the entry exists.
        self._pending[id(request)] = (request, ctx)
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    def _be_headers(self, request: web.Request) -> _Ctx:
        """Everything the BE decides before reading the body (its on_header)."""
        db, table = request.match_info["db"], request.match_info["table"]
        fault = self.faults.popleft() if self.faults else None
        ctx = _Ctx(db, table, fault)
        if fault is not None and fault.kind == "http500":
            self.loads.append(LoadRecord(db, table, request.headers.get("label"), -1, "HTTP 500",
                                         "injected", fault="http500"))
            ctx.reply = web.Response(status=500, text="500 Internal Server Error")
            return ctx
        if fault is not None and fault.kind == "reset":
            self.loads.append(LoadRecord(db, table, request.headers.get("label"), -1, "RESET",
                                         "injected", fault="reset"))
            ctx.reply = self._reset(request)
            return ctx
        auth = _basic_auth(request.headers.get("Authorization"))
        label = request.headers.get("label")
        if auth is None:
            ctx.reply = self._fail(ctx, label, -1, "[NOT_AUTHORIZED]no valid Basic authorization")
            return ctx
        ctx.user = auth[0]
        if auth != (self.user, self.password):
            ctx.reply = self._fail(ctx, label, -1,
                                   f"errCode = 2, detailMessage = Access denied for user '{auth[0]}'@"
                                   f"'{request.remote}' (using password: YES)")
            return ctx
        fmt = (request.headers.get("format") or "csv").lower()
        if fmt != "json":
            ctx.reply = self._fail(ctx, label, -1,
                                   f"[NOT_IMPLEMENTED_ERROR]emulator supports format json only, got {fmt}")
            return ctx
        strict = request.headers.get("strict_mode")
        if strict is not None and strict.strip().lower() not in ("true", "false"):
            ctx.reply = self._fail(ctx, label, -1, "[INVALID_ARGUMENT]Invalid strict mode format. "
                                                   "Must be bool type")
            return ctx
        if db not in self.databases:
            ctx.reply = self._fail(ctx, label, -1,
                                   f"errCode = 2, detailMessage = unknown database, database={db}")
            return ctx
        if table not in self.databases[db]:
            ctx.reply = self._fail(ctx, label, -1,
                                   f"errCode = 2, detailMessage = unknown table, tableName={table}")
            return ctx
        length = request.content_length
        if length is not None and length > self.json_max_bytes:
            ctx.reply = self._fail(ctx, label, -1,
                                   f"[EXCEEDED_LIMIT]json body size {length} exceed BE's conf "
                                   f"'streaming_load_json_max_mb' {self.json_max_bytes}. increase it if you "
                                   "are sure this load is reasonable")
            return ctx
        if label is None or label == "":
            label = str(uuid.uuid4())
        if not LABEL_RE.match(label):
            ctx.reply = self._fail(ctx, label, -1,
                                   "[ANALYSIS_ERROR]errCode = 2, detailMessage = Label format error. "
                                   f"regex: {LABEL_RE.pattern}, label: {label}")
            return ctx
        existing = self.labels[db].get(label)
        if existing is not None and existing.state != "ABORTED":
            job = "FINISHED" if existing.state == "VISIBLE" else existing.state
            message = (f"[LABEL_ALREADY_EXISTS]errCode = 2, detailMessage = Label [{label}] has already "
                       f"been used, relate to txn [{existing.txn_id}]")
            self.loads.append(LoadRecord(db, table, label, -1, "Label Already Exists", message,
                                         user=ctx.user, existing_job_status=job))
            ctx.reply = self._reply({"TxnId": -1, "Label": label, "Status": "Label Already Exists",
                                     "ExistingJobStatus": job, "Message": message}, ctx)
            return ctx
        ctx.txn = Txn(next(self._txn_ids), db, table, label, "RUNNING")
        self.labels[db][label] = ctx.txn
        return ctx

    async def _be_load(self, request: web.Request) -> web.StreamResponse:
        pending = self._pending.pop(id(request), None)
        ctx = pending[1] if pending is not None and pending[0] is request else self._be_headers(request)
        if ctx.reply is not None:
            return ctx.reply
        txn = ctx.txn
        assert txn is not None
        fault = ctx.fault
        try:
            body = await request.read()
        except BaseException:
            # The client went away mid-body (killed, reset): Doris cancels the load and aborts its
            # transaction, so the label can be used again. Left RUNNING, it would never finish.
            txn.state = "ABORTED"
            raise
        spec = self.databases[ctx.db][ctx.table]
        h = request.headers
        try:
            mapped = self._mapped_columns(spec, h.get("columns"))
        except ValueError as exc:
            return self._abort(ctx, txn, str(exc), len(body))
        try:
            ratio = float(h.get("max_filter_ratio") or 0)
        except ValueError:
            return self._abort(ctx, txn, "[INVALID_ARGUMENT]Invalid max_filter_ratio", len(body))
        strict = _is_true(h.get("strict_mode"))
        strip = _is_true(h.get("strip_outer_array"))
        by_line = _is_true(h.get("read_json_by_line"))
        if "strip_outer_array" not in h and "read_json_by_line" not in h:
            by_line = True  # master's default when neither header is sent
        docs = self._documents(body, strip=strip, by_line=by_line)
        good: list[dict[str, Any]] = []
        errors: list[str] = []
        for doc in docs:
            row, error = self._convert(spec, mapped, doc, strict=strict)
            if error is not None:
                errors.append(error)
            else:
                assert row is not None
                good.append(row)
        total, filtered = len(docs), len(errors)
        if fault is not None and fault.kind == "fail":
            return self._abort(ctx, txn, fault.message, len(body), total=total)
        counts = {"NumberTotalRows": total, "NumberLoadedRows": len(good), "NumberFilteredRows": filtered,
                  "LoadBytes": len(body)}
        extra: dict[str, Any] = {}
        if errors:
            file = f"__shard_0/error_log_insert_stmt_{txn.label}_{txn.txn_id}"
            self.error_logs[file] = "".join(f"Reason: {e}\n" for e in errors)
            extra = {"ErrorURL": f"{self.be_url}/api/_load_error_log?file={file}",
                     "FirstErrorMsg": errors[0]}
        if total and filtered / total > ratio:
            counts["NumberLoadedRows"] = 0
            return self._abort(ctx, txn, "[DATA_QUALITY_ERROR]too many filtered rows", len(body),
                               counts=counts, extra=extra)
        if fault is not None and fault.kind == "slow":
            # The label is RUNNING meanwhile: a concurrent retry sees Label Already Exists.
            await asyncio.sleep(fault.seconds)
        self._store(ctx.db, spec, good)
        txn.state = "VISIBLE"
        status = "Publish Timeout" if fault is not None and fault.kind == "publish_timeout" else "Success"
        message = "transaction commit successfully, But the data will be visible later" \
            if status == "Publish Timeout" else "OK"
        self.loads.append(LoadRecord(ctx.db, ctx.table, txn.label, txn.txn_id, status, message, total,
                                     len(good), filtered, ctx.user, fault.kind if fault else None))
        if fault is not None and fault.kind == "reset_after_commit":
            return self._reset(request)
        return self._reply({"TxnId": txn.txn_id, "Label": txn.label, "Status": status, "Message": message,
                            **counts, **extra}, ctx)

    async def _be_error_log(self, request: web.Request) -> web.StreamResponse:
        text = self.error_logs.get(request.query.get("file", ""))
        if text is None:
            return web.Response(status=404, text="not found")
        return web.Response(text=text)

    # --- BE helpers -----------------------------------------------------------------------

    @staticmethod
    def _mapped_columns(spec: TableSpec, header: str | None) -> list[ColumnSpec]:
        if header is None or not header.strip():
            return list(spec.columns)
        names = [n.strip().strip("`").strip() for n in header.split(",")]
        known = {c.name.lower(): c for c in spec.columns}
        out: list[ColumnSpec] = []
        for name in names:
            if "=" in name or "(" in name:
                raise ValueError(f"[NOT_IMPLEMENTED_ERROR]emulator does not evaluate column expressions: {name}")
            col = known.get(name.lower())
            if col is None:
                raise ValueError(f"[ANALYSIS_ERROR]errCode = 2, detailMessage = Unknown column '{name}' "
                                 f"in '{spec.name}'")
            out.append(col)
        for col in spec.columns:
            # A table column left out of the mapping gets its default; these tables have none.
            if col not in out and not col.nullable:
                raise ValueError("[ANALYSIS_ERROR]errCode = 2, detailMessage = Column has no default "
                                 f"value. column: {col.name}")
        return out

    @staticmethod
    def _documents(body: bytes, *, strip: bool, by_line: bool) -> list[Any]:
        """Split the body into row documents; an unparsable piece is kept as a _CastError."""
        chunks = [ln for ln in body.split(b"\n") if ln.strip()] if by_line else [body]
        docs: list[Any] = []
        for chunk in chunks:
            try:
                value = json.loads(chunk)
            except ValueError:
                docs.append(_CastError("Parse json data for JsonDoc failed"))
                continue
            if isinstance(value, list):
                if strip:
                    docs.extend(value)
                else:
                    docs.append(_CastError("JSON data is array-object, `strip_outer_array` must be TRUE."))
            else:
                docs.append(value)
        return docs

    @staticmethod
    def _convert(spec: TableSpec, mapped: list[ColumnSpec], doc: Any, *,
                 strict: bool) -> tuple[dict[str, Any] | None, str | None]:
        if isinstance(doc, _CastError):
            return None, str(doc)
        if not isinstance(doc, dict):
            return None, "JSON data is not an object"
        lowered = {str(k).lower(): v for k, v in doc.items()}
        if all(lowered.get(c.name.lower()) is None for c in mapped):
            return None, "All fields is null, this is a invalid row."
        row: dict[str, Any] = {c.name: None for c in spec.columns}
        for col in mapped:
            present = col.name.lower() in lowered
            value = lowered.get(col.name.lower())
            if value is not None:
                try:
                    value = _cast(col, value)
                except _CastError:
                    if strict:
                        return None, (f"column({col.name}) value is incorrect while strict mode is true, "
                                      f"src value is {_as_text(value)}")
                    value = None  # non-strict: a failed cast loads NULL
                if isinstance(value, str) and col.length is not None:
                    size = len(value.encode("utf-8"))
                    if size > col.length:
                        first = value.encode("utf-8")[:32].decode("utf-8", "replace")
                        return None, (f"column_name[{col.name}], the length of input is too long than "
                                      f"schema. first 32 bytes of input str: [{first}] schema length: "
                                      f"{col.length}; actual length: {size}; ")
            if value is None and not col.nullable:
                if not present:
                    return None, f"The column `{col.name}` is not nullable, but it's not found in jsondata."
                return None, f"column({col.name}) values is null while columns is not nullable"
            row[col.name] = value
        return row, None

    def _store(self, db: str, spec: TableSpec, rows: list[dict[str, Any]]) -> None:
        key = (db, spec.name)
        if spec.key_model != "UNIQUE":
            self._dup.setdefault(key, []).extend(rows)
            return
        store = self._uniq.setdefault(key, {})
        seq = spec.sequence_column
        for row in rows:
            k = tuple(row[c] for c in spec.key_columns)
            old = store.get(k)
            # Sequence column: an equal or larger value replaces, a smaller one never does.
            if old is not None and seq is not None and old[seq] is not None and (
                    row[seq] is None or row[seq] < old[seq]):
                continue
            store[k] = row

    def _fail(self, ctx: _Ctx, label: str | None, txn_id: int, message: str) -> web.StreamResponse:
        self.loads.append(LoadRecord(ctx.db, ctx.table, label, txn_id, "Fail", message, user=ctx.user,
                                     fault=ctx.fault.kind if ctx.fault else None))
        return self._reply({"TxnId": txn_id, "Label": label or "", "Status": "Fail", "Message": message}, ctx)

    def _abort(self, ctx: _Ctx, txn: Txn, message: str, nbytes: int, *, total: int = 0,
               counts: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
               ) -> web.StreamResponse:
        # rollback_txn: the label becomes reusable at once.
        txn.state = "ABORTED"
        c = counts or {"NumberTotalRows": total, "LoadBytes": nbytes}
        self.loads.append(LoadRecord(ctx.db, ctx.table, txn.label, txn.txn_id, "Fail", message,
                                     c.get("NumberTotalRows", 0), 0, c.get("NumberFilteredRows", 0),
                                     ctx.user, ctx.fault.kind if ctx.fault else None))
        return self._reply({"TxnId": txn.txn_id, "Label": txn.label, "Status": "Fail", "Message": message,
                            **c, "NumberLoadedRows": 0, **(extra or {})}, ctx)

    @staticmethod
    def _reset(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Nothing reaches the client; aiohttp drops this response on the closed transport.
        resp = web.Response(status=200)
        resp.force_close()
        return resp

    @staticmethod
    def _reply(fields: dict[str, Any], ctx: _Ctx) -> web.StreamResponse:
        """The BE's JSON in StreamLoadContext::to_json order, HTTP 200, trailing newline."""
        elapsed = int((time.monotonic() - ctx.started) * 1000)
        out: dict[str, Any] = {
            "TxnId": fields["TxnId"],
            "Label": fields["Label"],
            "Comment": "",
            "TwoPhaseCommit": "false",
            "Status": fields["Status"],
        }
        if fields["Status"] == "Label Already Exists":
            out["ExistingJobStatus"] = fields["ExistingJobStatus"]
        out["Message"] = fields["Message"]
        for name in ("NumberTotalRows", "NumberLoadedRows", "NumberFilteredRows", "NumberUnselectedRows",
                     "LoadBytes"):
            out[name] = fields.get(name, 0)
        out["LoadTimeMs"] = elapsed
        out["BeginTxnTimeMs"] = 0
        out["StreamLoadPutTimeMs"] = 0
        out["ReadDataTimeMs"] = 0
        out["WriteDataTimeMs"] = elapsed
        out["ReceiveDataTimeMs"] = 0
        out["CommitAndPublishTimeMs"] = 0
        for name in ("ErrorURL", "FirstErrorMsg"):
            if fields.get(name):
                out[name] = fields[name]
        resp = web.Response(status=200, text=json.dumps(out, indent=4) + "\n",
                            content_type="text/plain", charset="utf-8")
        if ctx.reply is None and ctx.txn is None:
            resp.force_close()
        return resp
