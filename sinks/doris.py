"""Apache Doris sink: Stream Load over HTTP, one deterministic label per batch.

Effectively-once comes from three things together (reference §3, §7):

* the label is a pure function of (incarnation, db, table, topic, partition, first and
  last offset), so a retried or replayed batch reuses its label, and a reset broker (whose
  offsets start again at 0) or another site has another incarnation, hence other labels;
* ``Label Already Exists`` with ``FINISHED`` means this exact batch is already in and
  counts as success, but only for a batch that may have been loaded before: one rebuilt
  from its intent (``SinkBatch.replay``) or a label this sink sent itself. For any other
  batch it names someone else's content: an error (``label_conflicts``), never a success.
  With ``RUNNING`` the first attempt is still loading, so we wait;
* any other failure rolls the Doris txn back, which frees the label for the retry.

Failures are classified (``fail_<kind>`` counters): refusals of the data itself
(``data``, ``too_large``) split the batch, which is safe only because the same rows are
refused the same way on a replay; everything else (``mem_limit``, ``too_many_versions``,
``transient``, and the operator's fixes ``auth``, ``missing_target``, ``fe_refused``,
``redirect_refused``, ``label_conflict``) is retried whole under the same label.

Basic auth goes to the FE and, on its 307, only to a BE on the FE's own host or listed
in DICOMFLOW_DORIS_BE_ALLOWLIST; a redirect elsewhere is refused before anything is sent.

Rows Doris would filter are found before the load (:func:`schemas.ddl.check_row`) and
dead-lettered with their column. ``max_filter_ratio: 0`` plus ``strict_mode: true`` make
Doris refuse a load rather than drop or NULL a row silently; if it still refuses a
batch as data, the batch is bisected by offset until the offending rows are isolated.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from yarl import URL

from core.errors import Code, SinkDataError, SinkRetryableError
from core.settings import Secret, Settings
from schemas.ddl import TableSpec, check_row, table_spec
from sinks.base import BatchingSink, Rejected, SinkBatch, SinkItem

__all__ = [
    "FAILURE_KINDS",
    "LoadResult",
    "StreamLoadClient",
    "DorisTableSink",
    "make_label",
    "LABEL_RE",
    "SUCCESS_STATUSES",
    "canonical_table",
]

log = logging.getLogger(__name__)

LABEL_RE = re.compile(r"^[-_A-Za-z0-9:]{1,128}$")
LABEL_MAX = 128
SUCCESS_STATUSES = ("Success", "Publish Timeout")
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_HOPS = 3
_UNSAFE = re.compile(r"[^-_A-Za-z0-9]")
_DATA_QUALITY = ("DATA_QUALITY_ERROR", "too many filtered rows", "Encountered unqualified data")
#: Doris is short of memory (a BE under pressure, not this batch: its default exec_mem_limit is
#: 2 GB, batches are 16 MB). Retried whole: a split batch replayed whole would load twice.
_MEM_LIMIT = ("mem_limit_exceeded", "memory limit exceeded", "exceed memory limit", "memory exceed",
              "memory check failed")
#: E-235: a tablet has more versions than compaction keeps up with; wait for compaction.
_TOO_MANY_VERSIONS = ("e-235", "-235]", "too_many_version", "too many versions", "version count")
#: Every kind of failure the sink counts (``fail_<kind>``); see the module docstring.
FAILURE_KINDS = ("data", "too_large", "mem_limit", "too_many_versions", "transient", "label_running", "auth",
                 "missing_target", "fe_refused", "redirect_refused", "label_conflict", "no_incarnation")
#: Failures after which Doris may hold the label from our own attempt (the answer was lost, or
#: a Fail rolled it back): a later Label Already Exists for it is ours.
_MAYBE_SENT = frozenset({"transient", "mem_limit", "too_many_versions"})
_INCARNATION = re.compile(r"[0-9a-f]{1,32}")
#: Labels this sink sent itself (an answer may have been lost): Label Already Exists for them is ours.
_SENT_KEPT = 4096
_AUTH = ("Access denied", "no valid Basic authorization", "NOT_AUTHORIZED", "Unauthorized")
_UNKNOWN_TARGET = ("unknown database", "unknown table")
_COLUMN_IN_MESSAGE = re.compile(r"column_name\[(\w+)\]|column\((\w+)\)|column `(\w+)`")


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A Stream Load that is done: its rows are in Doris (now or by an earlier attempt)."""

    label: str
    status: str
    message: str
    txn_id: int | None = None
    total_rows: int = 0
    loaded_rows: int = 0
    filtered_rows: int = 0
    #: ``Label Already Exists`` + ``FINISHED``: an earlier attempt loaded this batch.
    already_loaded: bool = False
    elapsed_s: float = 0.0
    body: dict[str, Any] = field(default_factory=dict)


def canonical_table(kind: str) -> str:
    """The DDL table (schemas/sql/doris.sql) behind a table kind; the configured name may differ.

    A convention rather than a list, so adding a Doris output needs no change here.
    """
    return f"dicom_{kind}_meta"


def _quote_column(name: str) -> str:
    # Backquotes keep reserved words such as `columns` valid in the header's column list.
    return "`" + name.replace("`", "``") + "`"


def make_label(db: str, table: str, topic: str, partition: int, first_offset: int, last_offset: int,
               *, prefix: str = "dicomflow", incarnation: str | None = None) -> str:
    """The deterministic Stream Load label of one offset range of one incarnation.

    ``incarnation`` (lower-case hex, :mod:`streams.incarnation`) names the broker whose
    offsets these are: a reset broker starts its offsets at 0 again, under another id.
    Parts are joined with ``:``, which none of the parts may contain after sanitising, so
    two different ranges never share a label. When sanitising changed a part (a topic
    with dots) or the label is too long, a hash of the exact inputs is appended, because
    ``a.b`` and ``a_b`` would otherwise collide and one batch would be taken for the other.
    The incarnation is never shortened: it stays whole right after the prefix.
    """
    if incarnation is not None and not _INCARNATION.fullmatch(incarnation):
        raise ValueError(f"an incarnation id is 1-32 lower-case hex digits, got {incarnation!r}")
    if incarnation is not None:
        prefix = f"{_UNSAFE.sub('_', prefix[:16])}:{incarnation}"
    raw = [prefix, db, table, topic]
    head = [_UNSAFE.sub("_", p) for p in raw]
    head[0] = raw[0] if incarnation is not None else head[0]  # prefix:incarnation keeps its ':'
    tail = f"{partition}:{first_offset}:{last_offset}"
    label = ":".join([*head, tail])
    if head == raw and len(label) <= LABEL_MAX:
        return label
    digest = hashlib.sha256("\x00".join([*raw, tail]).encode("utf-8")).hexdigest()[:16]
    room = LABEL_MAX - len(tail) - len(digest) - 2
    if room < len(head[0]):
        # Offsets alone cannot overflow 128 chars in practice; keep the label valid anyway.
        return f"{head[0]}:{hashlib.sha256(label.encode('utf-8')).hexdigest()[:32]}"[:LABEL_MAX]
    return f"{':'.join(head)[:room]}:{digest}:{tail}"


class StreamLoadClient:
    """Stream Load over aiohttp, redirects followed by hand so Basic auth reaches the BE.

    aiohttp drops ``Authorization`` when a redirect changes the port (FE 8030 -> BE 8040)
    and refuses credentials in a URL combined with an explicit ``auth``. So each hop is a
    fresh request: the ``user:password@`` of ``Location`` is stripped (it must not be
    logged either) and the configured credentials are sent again, but only to a BE the
    operator allowed: the FE's own host, or an entry of ``be_allowlist`` (``host`` for any
    port, ``host:port`` for one; DICOMFLOW_DORIS_BE_ALLOWLIST). A redirect anywhere else is
    refused before anything is sent, with an error naming the host and the variable.

    Every error raised carries ``failure`` (one of :data:`FAILURE_KINDS`) for the counters.
    """

    def __init__(
        self,
        fe_url: str,
        user: str,
        password: Secret | str,
        *,
        load_timeout_s: int = 600,
        client_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        be_allowlist: Iterable[str] = (),
    ) -> None:
        self.fe_url = fe_url.rstrip("/")
        self.be_allowlist = frozenset(e.strip().lower() for e in be_allowlist if e.strip())
        self.user = user
        self._password = password if isinstance(password, Secret) else Secret(password)
        self.load_timeout_s = load_timeout_s
        # Above the load's own timeout: a client giving up first would retry while the
        # first attempt still runs (Label Already Exists/RUNNING loops, reference §3).
        self.client_timeout_s = client_timeout_s if client_timeout_s is not None else load_timeout_s + 30.0
        if self.client_timeout_s <= load_timeout_s:
            log.warning("doris client_timeout_s=%s is not above load_timeout_s=%s: retries may race "
                        "running loads", self.client_timeout_s, load_timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLoadClient:
        if settings.doris_fe_url is None:
            raise ValueError("Doris is disabled (DICOMFLOW_DORIS_FE_URL is unset)")
        return cls(settings.doris_fe_url, settings.doris_user, settings.doris_password,
                   be_allowlist=settings.doris_be_allowlist)

    def __repr__(self) -> str:
        return f"StreamLoadClient(fe_url={self.fe_url!r}, user={self.user!r})"

    async def start(self) -> None:
        """Open the HTTP session (idempotent)."""
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.client_timeout_s, sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
            # aiohttp (3.10+) silently re-sends an idempotent PUT once when the connection drops; a
            # load that committed would then answer Label Already Exists within one attempt, which
            # cannot be told from another writer's label. Our own retry loop re-sends, knowingly.
            if hasattr(self._session, "_retry_connection"):
                setattr(self._session, "_retry_connection", False)  # noqa: B010 - private, guarded

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def load(self, db: str, table: str, rows: Sequence[dict[str, Any]], label: str,
                   columns: Sequence[str]) -> LoadResult:
        """Load ``rows`` (JSON-ready dicts) under ``label``.

        Returns when the rows are in Doris. Raises :class:`SinkDataError` when Doris
        refuses the data itself, :class:`SinkRetryableError` for everything a retry with
        the same label may fix (including bad credentials and unknown tables, which need
        an operator but must not lose data).
        """
        if not LABEL_RE.match(label):
            raise ValueError(f"invalid Stream Load label {label!r}")
        await self.start()
        session = self._session
        assert session is not None
        body = orjson.dumps(list(rows))
        headers = {
            "label": label,
            "format": "json",
            "strip_outer_array": "true",
            "columns": ", ".join(_quote_column(c) for c in columns),
            "max_filter_ratio": "0",
            # Without strict mode a value Doris cannot cast loads as NULL, silently.
            "strict_mode": "true",
            "timeout": str(self.load_timeout_s),
            "Content-Type": "application/json",
            "Authorization": self._authorization(),
        }
        url = URL(f"{self.fe_url}/api/{db}/{table}/_stream_load")
        started = time.monotonic()
        where = f"db={db} table={table} label={label} rows={len(rows)} bytes={len(body)}"
        try:
            for _ in range(_MAX_HOPS):
                async with session.put(url, data=body, headers=headers, expect100=True,
                                       allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise _failure(SinkRetryableError(f"doris redirect without Location: {where}"),
                                           "transient")
                        # The BE URL carries user:password@; never keep or log it.
                        url = url.join(URL(location)).with_user(None)
                        self._check_target(url, where)
                        continue
                    status, raw = resp.status, await resp.read()
                break
            else:
                raise _failure(SinkRetryableError(f"doris: too many redirects: {where}"), "transient")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("doris load failed in transport %s error=%r", where, exc)
            raise _failure(SinkRetryableError(f"doris transport error: {type(exc).__name__}: {exc}"),
                           "transient") from exc
        elapsed = time.monotonic() - started
        return self._judge(status, raw, where, label, elapsed)

    def _check_target(self, url: URL, where: str) -> None:
        """Refuse a redirect to a host the operator did not allow: our credentials would go with it."""
        host = (url.host or "").lower()
        fe_host = (URL(self.fe_url).host or "").lower()
        if host and (host == fe_host or host in self.be_allowlist or f"{host}:{url.port}" in self.be_allowlist
                     or f"[{host}]:{url.port}" in self.be_allowlist or f"[{host}]" in self.be_allowlist):
            return
        target = f"{host}:{url.port}"
        log.error("doris FE redirected the load to %s, which is neither the FE's host %s nor in "
                  "DICOMFLOW_DORIS_BE_ALLOWLIST: credentials not sent %s", target, fe_host, where)
        raise _failure(SinkRetryableError(
            f"doris FE redirected to {target}, not the FE's host nor in DICOMFLOW_DORIS_BE_ALLOWLIST "
            f"(add {host} or {target} there if that BE is yours); credentials were not sent",
            retry_after=10.0), "redirect_refused")

    def _authorization(self) -> str:
        # Built by hand: aiohttp's BasicAuth/auth= is deprecated in 3.14 and pyproject allows 3.10.
        creds = f"{self.user}:{self._password.get()}".encode()
        return "Basic " + base64.b64encode(creds).decode("ascii")

    def _judge(self, http_status: int, raw: bytes, where: str, label: str, elapsed: float) -> LoadResult:
        if http_status in (401, 403):
            self._auth_failed(where, f"HTTP {http_status}")
        if http_status == 413:
            # The batch is bigger than this server accepts: splitting it is the only way on.
            raise _failure(SinkDataError(f"doris refused the body as too large (HTTP 413) {where}",
                                         code=Code.SINK_REJECTED), "too_large")
        if http_status != 200:
            log.warning("doris load got http_status=%s %s", http_status, where)
            raise _failure(SinkRetryableError(f"doris HTTP {http_status}: {raw[:200]!r}"), "transient")
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("doris load got a non-JSON answer %s body=%r", where, raw[:200])
            raise _failure(SinkRetryableError(f"doris answered non-JSON: {raw[:200]!r}"), "transient") from None
        if not isinstance(reply, dict):
            raise _failure(SinkRetryableError(f"doris answered unexpected JSON: {raw[:200]!r}"), "transient")
        if "Status" not in reply:
            return self._judge_fe(reply, where)
        status = str(reply["Status"])
        message = str(reply.get("Message", ""))
        result = LoadResult(
            label=label,
            status=status,
            message=message,
            txn_id=reply.get("TxnId"),
            total_rows=int(reply.get("NumberTotalRows") or 0),
            loaded_rows=int(reply.get("NumberLoadedRows") or 0),
            filtered_rows=int(reply.get("NumberFilteredRows") or 0),
            elapsed_s=elapsed,
            body=reply,
        )
        if status in SUCCESS_STATUSES:
            log.info("doris load done status=%r %s txn_id=%s loaded=%s elapsed_s=%.3f", status, where,
                     result.txn_id, result.loaded_rows, elapsed)
            return result
        if status == "Label Already Exists":
            job = reply.get("ExistingJobStatus")
            if job == "FINISHED":
                log.info("doris label already finished %s: batch was loaded before", where)
                return LoadResult(label=label, status=status, message=message, already_loaded=True,
                                  elapsed_s=elapsed, body=reply)
            if job == "PRECOMMITTED":
                # We never use 2PC: someone else precommitted under our label.
                log.error("doris label is PRECOMMITTED by another writer %s message=%r", where, message)
            else:
                log.info("doris label still running %s job=%s: will retry the same label", where, job)
            raise _failure(SinkRetryableError(f"doris label {label} is {job}: an earlier attempt is still loading",
                                              retry_after=1.0), "label_running")
        # Status Fail (or anything unknown): the txn was rolled back, the label is free.
        first = reply.get("FirstErrorMsg") or ""
        url = reply.get("ErrorURL") or ""
        lowered = message.lower()
        if "EXCEEDED_LIMIT" in message:
            log.info("doris refused the body size %s message=%r: splitting the batch", where, message)
            raise _failure(SinkDataError(f"doris body too large: {message}", code=Code.SINK_REJECTED), "too_large")
        if any(s in message for s in _DATA_QUALITY):
            detail = message + (f"; first error: {first}" if first else "") + (f"; {url}" if url else "")
            log.info("doris refused data %s filtered=%s message=%r", where, result.filtered_rows, detail)
            raise _failure(SinkDataError(detail, code=Code.SINK_REJECTED, field=_column_in(first)), "data")
        if any(s in message for s in _AUTH):
            self._auth_failed(where, message)
        if any(s in lowered for s in _UNKNOWN_TARGET):
            log.error("doris target missing %s message=%r: apply schemas/sql/doris.sql", where, message)
            raise _failure(SinkRetryableError(f"doris target missing: {message}", retry_after=10.0),
                           "missing_target")
        if any(s in lowered for s in _MEM_LIMIT):
            log.warning("doris is short of memory %s message=%r: retrying the same label", where, message)
            raise _failure(SinkRetryableError(f"doris memory limit: {message}", retry_after=2.0), "mem_limit")
        if any(s in lowered for s in _TOO_MANY_VERSIONS):
            log.warning("doris tablet has too many versions (E-235) %s message=%r: waiting for compaction, "
                        "then retrying the same label; larger DICOMFLOW_DORIS_MAX_ROWS/MAX_INTERVAL load less "
                        "often", where, message)
            raise _failure(SinkRetryableError(f"doris too many versions: {message}", retry_after=10.0),
                           "too_many_versions")
        log.warning("doris load failed %s status=%r message=%r: not a data error, retrying the same label",
                    where, status, message)
        raise _failure(SinkRetryableError(f"doris load failed: {status}: {message}"), "transient")

    def _judge_fe(self, reply: dict[str, Any], where: str) -> LoadResult:
        """An FE answer (it never redirected): RestBaseResult or the exception handler's body."""
        msg = str(reply.get("msg", ""))
        if reply.get("code") in (401, 403) or any(s in msg for s in _AUTH):
            self._auth_failed(where, f"{msg}: {reply.get('data', '')}")
        log.error("doris FE refused the load %s reply=%r", where, reply)
        raise _failure(SinkRetryableError(f"doris FE refused the load: {msg or reply!r}", retry_after=10.0),
                       "fe_refused")

    def _auth_failed(self, where: str, detail: str) -> None:
        # Loud but retried: bad credentials are an operator's fix, never a reason to drop data.
        log.error("doris authentication failed user=%s %s detail=%r: check DICOMFLOW_DORIS_USER and "
                  "DICOMFLOW_DORIS_PASSWORD", self.user, where, detail)
        raise _failure(SinkRetryableError(f"doris authentication failed for user {self.user!r}: {detail}",
                                          retry_after=10.0), "auth")


_E = TypeVar("_E", SinkDataError, SinkRetryableError)


def _failure(exc: _E, kind: str) -> _E:
    """Tag ``exc`` with its failure kind (one of FAILURE_KINDS) for the sink's counters."""
    setattr(exc, "failure", kind)  # noqa: B010 - an attribute the core errors do not declare
    return exc


def failure_of(exc: BaseException) -> str:
    """The failure kind an error of this module carries (``transient`` when untagged)."""
    return str(getattr(exc, "failure", "transient"))


def _column_in(message: str) -> str | None:
    m = _COLUMN_IN_MESSAGE.search(message)
    if m is None:
        return None
    return next(g for g in m.groups() if g)


class DorisTableSink(BatchingSink[dict[str, Any]]):
    """Stream Load sink for one Doris table; items are JSON-ready row dicts.

    ``counters`` adds ``loads`` (Stream Loads that succeeded), ``loaded_rows``,
    ``filtered`` (rows rejected here or by Doris), ``label_already_finished``,
    ``label_conflicts`` (Label Already Exists for a batch that was never ours: not loaded,
    not acked), ``bisections``, ``load_errors``, ``fail_<kind>`` per failure kind
    (:data:`FAILURE_KINDS`) and ``load_latency_s_total`` to the base counters
    (``rows``/``rejected``/``retries``/``latency_s_total`` are kept by
    :func:`sinks.base.flush_with_retry`).

    ``incarnation`` goes into every label (:mod:`streams.incarnation`). The stage sets it at
    worker start; a sink built :meth:`from_settings` refuses to load until it is set, so no
    label is ever made without it in a worker.
    """

    def __init__(self, client: StreamLoadClient, *, db: str, table: str, spec: TableSpec | None = None,
                 label_prefix: str = "dicomflow", name: str | None = None, incarnation: str | None = None,
                 require_incarnation: bool = False) -> None:
        super().__init__()
        self.client = client
        self.db = db
        self.table = table
        # The table name may be configured; the shape always comes from the repository's DDL.
        self.spec = spec if spec is not None else table_spec(table)
        self.columns = self.spec.column_names
        self.label_prefix = label_prefix
        self.name = name or f"doris:{table}"
        self.incarnation = incarnation
        self.require_incarnation = require_incarnation
        #: Labels this sink sent (most recent last): their Label Already Exists may be our own load.
        self._sent: OrderedDict[str, None] = OrderedDict()
        self.counters.update({"loads": 0, "loaded_rows": 0, "filtered": 0, "label_already_finished": 0,
                              "label_conflicts": 0, "bisections": 0, "load_errors": 0,
                              "load_latency_s_total": 0.0})
        self.counters.update({f"fail_{kind}": 0 for kind in FAILURE_KINDS})

    @classmethod
    def from_settings(cls, settings: Settings, kind: str, client: StreamLoadClient) -> DorisTableSink:
        """The sink for ``kind`` (``state``/``image``/``object``) under its configured table name."""
        return cls(client, db=settings.doris_database, table=settings.doris_table(kind),
                   spec=table_spec(canonical_table(kind)), require_incarnation=True)

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        await self.client.stop()

    def label_for(self, topic: str, partition: int, first_offset: int, last_offset: int) -> str:
        return make_label(self.db, self.table, topic, partition, first_offset, last_offset,
                          prefix=self.label_prefix, incarnation=self.incarnation)

    async def write(self, batch: SinkBatch[dict[str, Any]]) -> Sequence[Rejected[dict[str, Any]]]:
        if self.incarnation is None and self.require_incarnation:
            self.counters["fail_no_incarnation"] += 1
            raise _failure(SinkRetryableError(f"sink={self.name}: the incarnation id is not known yet (read at "
                                              "worker start from dicomflow_incarnation); not loading",
                                              retry_after=5.0), "no_incarnation")
        rejected: list[Rejected[dict[str, Any]]] = []
        valid: list[SinkItem[dict[str, Any]]] = []
        for item in batch.items:
            problem = check_row(self.spec, item.value)
            if problem is None:
                valid.append(item)
            else:
                rejected.append(Rejected(item, SinkDataError(f"{self.table}.{problem}", code=problem.code,
                                                             field=problem.column)))
        if rejected:
            log.info("sink=%s topic=%s partition=%s offsets=%s..%s rejected_before_load=%s first=%r",
                     self.name, batch.topic, batch.partition, batch.first_offset, batch.last_offset,
                     len(rejected), rejected[0].error.message)
        if valid:
            # The label covers the batch's offsets, so a replay of the batch finds it.
            label = self.label_for(batch.topic, batch.partition, batch.first_offset, batch.last_offset)
            rejected.extend(await self._load(batch.topic, batch.partition, valid, label, replay=batch.replay))
        self.counters["filtered"] += len(rejected)
        rejected.sort(key=lambda r: r.item.offset)
        return rejected

    async def _load(self, topic: str, partition: int, items: list[SinkItem[dict[str, Any]]],
                    label: str, *, replay: bool) -> list[Rejected[dict[str, Any]]]:
        rows = [{c: item.value.get(c) for c in self.columns} for item in items]
        ours = replay or label in self._sent
        # Ours from the moment it is sent: aiohttp itself re-sends an idempotent PUT whose
        # connection dropped, so an attempt that committed can answer Label Already Exists.
        self._remember_sent(label)
        try:
            result = await self.client.load(self.db, self.table, rows, label, self.columns)
        except SinkDataError as exc:
            self.counters["load_errors"] += 1
            self.counters[f"fail_{failure_of(exc)}"] += 1
            if len(items) == 1:
                return [Rejected(items[0], exc)]
            # Halve by offset; each half gets the label of its own offset range, so a
            # replay bisects to the same labels and finds the halves already loaded.
            self.counters["bisections"] += 1
            mid = len(items) // 2
            out: list[Rejected[dict[str, Any]]] = []
            for half in (items[:mid], items[mid:]):
                half_label = self.label_for(topic, partition, half[0].offset, half[-1].offset)
                out.extend(await self._load(topic, partition, half, half_label, replay=replay))
            return out
        except SinkRetryableError as exc:
            self.counters["load_errors"] += 1
            self.counters[f"fail_{failure_of(exc)}"] += 1
            if not ours and failure_of(exc) not in _MAYBE_SENT:
                self._sent.pop(label, None)  # e.g. someone else's load RUNNING under this label
            raise
        if result.already_loaded and not ours:
            self._sent.pop(label, None)
            # Doris holds this label for a load that is not this batch: no intent rebuilt it and this
            # sink never sent it. Its rows are not ours; counting it as done would drop this batch.
            self.counters["load_errors"] += 1
            self.counters["label_conflicts"] += 1
            self.counters["fail_label_conflict"] += 1
            log.error("doris Label Already Exists for a batch with no intent sink=%s label=%s offsets=%s..%s "
                      "rows=%s: another load (another incarnation or site, or lost intents) used this label; "
                      "not acked, retried until the label expires in Doris or an operator intervenes",
                      self.name, label, items[0].offset, items[-1].offset, len(items))
            raise _failure(SinkRetryableError(
                f"doris label {label} already exists but no intent names this batch: another load's content, "
                "not counted as loaded", retry_after=60.0), "label_conflict")
        self.counters["loads"] += 1
        self.counters["loaded_rows"] += len(items)
        self.counters["load_latency_s_total"] += result.elapsed_s
        if result.already_loaded:
            self.counters["label_already_finished"] += 1
        return []

    def _remember_sent(self, label: str) -> None:
        self._sent[label] = None
        self._sent.move_to_end(label)
        while len(self._sent) > _SENT_KEPT:
            self._sent.popitem(last=False)
