"""The storage SCP's associations on asyncio: negotiation, P-DATA, C-STORE and C-ECHO.

One coroutine per association reads PDUs (:mod:`feeders.scp.ul`), writes the data set of
each C-STORE into a spool file under the storage root as its fragments arrive (or keeps it
in memory), and hands the complete instance to :func:`feeders.scp.store.store_instance` on
a thread of a pool (it fsyncs, links and journals or publishes, all blocking). The answer
goes out once that returns, so a Success still means stored, synced and acknowledged.

What it accepts is what :func:`feeders.scp.association.build_ae` tells pynetdicom: every
storage SOP class in :func:`accepted_syntaxes`, plus Verification; any called AE title; a
tenant must resolve for the caller (A-ASSOCIATE-RJ otherwise, "calling AE not recognised").
One message at a time per association (no asynchronous operations window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from feeders.scp import ul
from feeders.scp.association import accepted_syntaxes, admit, certificate_cn, storage_sop_classes
from feeders.scp.config import ScpConfig
from feeders.scp.store import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    StoreDeps,
    StoreRequest,
    store_instance,
)
from feeders.tenancy import TenantRefused

__all__ = ["Acceptor", "MAX_PDU_LENGTH", "SPOOL_DIR"]

log = logging.getLogger(__name__)

#: The largest P-DATA-TF we accept (advertised in the A-ASSOCIATE-AC): a 40 KB instance in one PDU.
MAX_PDU_LENGTH = 262_144
#: An A-ASSOCIATE-RQ larger than this is not a real one (128 contexts take ~20 KB).
_MAX_RQ_LENGTH = 1 << 20
#: A command set is a dozen short elements; past this a peer is only filling our memory.
_MAX_COMMAND_BYTES = 64 * 1024
#: Without a spool (``spool_to_disk=False``), a data set larger than this is refused (0xA700).
MAX_MEMORY_INSTANCE = 512 * 1024 * 1024
#: The smallest peer maximum PDU length that can carry a response fragment at all.
_MIN_PEER_PDU = 64
#: Spool files, inside the storage root so that placing one is a link (readers skip dot-entries).
SPOOL_DIR = ".spool"
#: Spool files older than this at start were left by a killed SCP (never answered Success).
_STALE_SPOOL_S = 3600.0

VERIFICATION = "1.2.840.10008.1.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_VERIFICATION_SYNTAXES = (_IMPLICIT_LE, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")

_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_NO_DATASET = 0x0101
_UNRECOGNISED_OPERATION = 0x0211
#: What pynetdicom answers when its handler raises: "processing failure".
_PROCESSING_FAILURE = 0xC211
_US = struct.Struct("<H")


class _Closed(Exception):
    """The association ended (released, aborted, or the peer went away)."""


class _Message:
    """The DIMSE message being received: its command, then its data set's fragments."""

    __slots__ = ("context_id", "command", "fragments", "size", "spool_fd", "spool", "memory", "answer")

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.command: dict[int, bytes] | None = None
        self.fragments: list[bytes] = []
        self.size = 0
        self.spool_fd = -1
        self.spool: Path | None = None
        self.memory: bytearray | None = None
        #: A status decided before the data set is complete (its bytes are then discarded).
        self.answer: int | None = None

    def close_spool(self) -> None:
        if self.spool_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.spool_fd)
            self.spool_fd = -1

    def drop_spool(self) -> None:
        self.close_spool()
        if self.spool is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.spool)
            self.spool = None


def _us(command: dict[int, bytes], element: int) -> int:
    value = command.get(element)
    if value is None or len(value) != 2:
        raise ul.UlError(f"command element (0000,{element:04X}) is {'missing' if value is None else 'not 2 bytes'}")
    return int(_US.unpack(value)[0])


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Acceptor:
    """Serves associations on the loop it is started on; ``close()`` drains them."""

    def __init__(self, config: ScpConfig, deps: StoreDeps, ssl_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.deps = deps
        self.ssl_context = ssl_context
        self.syntaxes = frozenset(accepted_syntaxes(config))
        self.sop_classes = storage_sop_classes()
        self.spool_dir = config.storage_root / SPOOL_DIR
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Associations accepted and not yet ended (connections still negotiating are not counted).
        self._established = 0
        self._counted: set[asyncio.Task[None]] = set()
        self._writers: dict[asyncio.Task[None], tuple[asyncio.StreamWriter, str]] = {}
        #: The message each association is receiving (its spool file goes if the association does).
        self._current: dict[asyncio.Task[None], _Message] = {}
        # Stores block (fsync, link, journal): one thread per association at most.
        self._pool = ThreadPoolExecutor(config.max_associations, thread_name_prefix="scp-store")

    async def serve(self, sock: socket.socket) -> None:
        """Accept on an already listening socket (bound by the caller, so its port is known at once)."""
        if self.config.spool_to_disk:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._sweep_spool()
        self._server = await asyncio.start_server(
            self._accept, sock=sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.config.acse_timeout_s if self.ssl_context else None,
            limit=MAX_PDU_LENGTH + 64)

    def _sweep_spool(self) -> None:
        """Spool files of an SCP that was killed mid-instance: never placed, never answered."""
        cutoff = time.time() - _STALE_SPOOL_S
        for entry in self.spool_dir.glob(".rx-*"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()

    async def close(self, grace_s: float) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in list(self._tasks):
            writer, calling = self._writers.get(task, (None, ""))
            log.warning("association aborted at shutdown calling_ae=%s", calling)
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.write(ul.abort(2, 0))
                    writer.close()
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        # Stores in flight finish (their journal lines are written) before the publisher stops.
        await asyncio.to_thread(self._pool.shutdown, True)

    # -- one association ---------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """start_server runs this as the association's own task: every way out is handled here."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers[task] = (writer, "")
        try:
            await self._association(task, reader, writer)
        except _Closed:
            pass
        except asyncio.CancelledError:
            pass  # aborted at shutdown (close() sent the A-ABORT)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the peer went away; an unanswered instance was not acknowledged
        except TimeoutError:
            log.warning("association aborted: nothing received for %s s calling_ae=%s",
                        self.config.network_timeout_s, self._writers.get(task, (None, ""))[1])
            self._abort(writer, 0)
        except ul.UlError as exc:
            log.warning("association aborted: %s calling_ae=%s", exc, self._writers.get(task, (None, ""))[1])
            self._abort(writer, exc.reason)
        except Exception:  # a defect here must end one association, never the server
            log.exception("association aborted: unexpected error calling_ae=%s",
                          self._writers.get(task, (None, ""))[1])
            self._abort(writer, 0)
        finally:
            unfinished = self._current.pop(task, None)
            if unfinished is not None:
                unfinished.drop_spool()
            self._release_slot(task)
            self._tasks.discard(task)
            self._writers.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    def _abort(self, writer: asyncio.StreamWriter, reason: int) -> None:
        with contextlib.suppress(Exception):
            writer.write(ul.abort(2, reason))

    async def _read(self, reader: asyncio.StreamReader, timeout: float, limit: int) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(6)
            kind, _, length = struct.unpack(">BBI", head)
            if kind not in (ul.A_ASSOCIATE_RQ, ul.P_DATA_TF, ul.A_RELEASE_RQ, ul.A_ABORT,
                            ul.A_ASSOCIATE_AC, ul.A_ASSOCIATE_RJ, ul.A_RELEASE_RP):
                raise ul.UlError(f"unrecognised PDU type 0x{kind:02X}", ul.UNRECOGNISED_PDU)
            if length > limit:
                raise ul.UlError(f"PDU 0x{kind:02X} of {length} bytes (at most {limit})")
            return kind, await reader.readexactly(length)

    async def _until_closed(self, reader: asyncio.StreamReader, timeout: float) -> None:
        """Let the peer close first (it has what it needs), reading and dropping what it still sends."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                while await reader.read(65536):
                    pass

    async def _association(self, task: asyncio.Task[None], reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        config = self.config
        peername = writer.get_extra_info("peername") or ("", 0)
        ip = str(peername[0])
        cert_cn = certificate_cn(writer.get_extra_info("peercert")) if self.ssl_context else None
        try:
            kind, body = await self._read(reader, config.acse_timeout_s, _MAX_RQ_LENGTH)
        except TimeoutError:
            # No association yet: the connection is closed, no A-ABORT (PS3.8 AA-2 on ARTIM expiry).
            log.info("connection closed: no association request within %s s source_ip=%s",
                     config.acse_timeout_s, ip)
            raise _Closed from None
        if kind != ul.A_ASSOCIATE_RQ:
            raise ul.UlError(f"PDU 0x{kind:02X} before any association", ul.UNEXPECTED_PDU)
        rq = ul.parse_associate_rq(body)
        calling, called = rq.calling, rq.called
        self._writers[task] = (writer, calling)
        if 0 < rq.max_length < _MIN_PEER_PDU:
            raise ul.UlError(f"the peer's maximum PDU length {rq.max_length} is below {_MIN_PEER_PDU}")
        refusal = self._refusal(rq, ip, cert_cn)
        if refusal is not None:
            writer.write(ul.associate_rj(*refusal))
            await writer.drain()
            # As pynetdicom does: give the peer a moment to read the rejection and close first.
            await self._until_closed(reader, 2.0)
            raise _Closed
        self._take_slot(task)
        results, contexts = self._negotiate(rq)
        writer.write(ul.associate_ac(rq, results, MAX_PDU_LENGTH))
        await writer.drain()
        deps = self.deps
        if cert_cn is not None:
            deps = replace(deps, tenancy=deps.tenancy.for_peer(cert_cn))
        message: _Message | None = None
        while True:
            kind, body = await self._read(reader, config.network_timeout_s, MAX_PDU_LENGTH)
            if kind == ul.P_DATA_TF:
                for cid, control, fragment in ul.iter_pdvs(memoryview(body)):
                    if cid not in contexts:
                        raise ul.UlError(f"a PDV on presentation context {cid}, which was not accepted")
                    if message is None:
                        message = _Message(cid)
                        self._current[task] = message
                    elif cid != message.context_id:
                        raise ul.UlError(f"a PDV on context {cid} inside a message on context {message.context_id}")
                    done = (self._command_fragment(message, fragment, control, contexts, calling)
                            if control & 0x01 else self._data_fragment(message, fragment, control))
                    if not done:
                        continue
                    answer = await self._complete(message, contexts, calling, called, ip, deps)
                    message = None
                    self._current.pop(task, None)
                    if answer is not None:
                        writer.write(ul.p_data(cid, answer, rq.max_length))
                        await writer.drain()
            elif kind == ul.A_RELEASE_RQ:
                writer.write(ul.release_rp())
                await writer.drain()
                await self._until_closed(reader, 2.0)  # the requestor closes (PS3.8 AR-4)
                raise _Closed
            elif kind == ul.A_ABORT:
                raise _Closed
            else:
                raise ul.UlError(f"PDU 0x{kind:02X} on an established association", ul.UNEXPECTED_PDU)

    def _take_slot(self, task: asyncio.Task[None]) -> None:
        self._established += 1
        self._counted.add(task)

    def _release_slot(self, task: asyncio.Task[None]) -> None:
        if task in self._counted:
            self._counted.discard(task)
            self._established -= 1

    def _refusal(self, rq: ul.AssociateRQ, ip: str, cert_cn: str | None) -> tuple[int, int, int] | None:
        """(result, source, reason) of the A-ASSOCIATE-RJ, or None to accept (PS3.8 9.3.4)."""
        if not rq.protocol_version & 1:
            log.warning("association rejected reason=protocol_version version=%s calling_ae=%s source_ip=%s",
                        rq.protocol_version, rq.calling, ip)
            return 1, 2, 2
        if rq.application_context != ul.APPLICATION_CONTEXT:
            log.warning("association rejected reason=application_context context=%s calling_ae=%s source_ip=%s",
                        rq.application_context, rq.calling, ip)
            return 1, 1, 2
        if self._established >= self.config.max_associations:
            log.warning("association rejected reason=too_many_associations limit=%s calling_ae=%s source_ip=%s",
                        self.config.max_associations, rq.calling, ip)
            return 2, 3, 2
        if not admit(self.deps.tenancy, rq.calling, rq.called, ip, cert_cn):
            return 1, 1, 3
        return None

    def _negotiate(self, rq: ul.AssociateRQ) -> tuple[list[tuple[int, int, str]], dict[int, tuple[str, str]]]:
        """Each proposed context's result; accepted ones as id -> (abstract syntax, transfer syntax)."""
        results: list[tuple[int, int, str]] = []
        accepted: dict[int, tuple[str, str]] = {}
        for cx in rq.contexts:
            if cx.abstract_syntax == VERIFICATION:
                offered = [ts for ts in cx.transfer_syntaxes if ts in _VERIFICATION_SYNTAXES]
            elif cx.abstract_syntax in self.sop_classes:
                # The sender's order decides among what we accept: nothing is transcoded here.
                offered = [ts for ts in cx.transfer_syntaxes if ts in self.syntaxes]
            else:
                results.append((cx.id, 3, cx.transfer_syntaxes[0] if cx.transfer_syntaxes else _IMPLICIT_LE))
                continue
            if not offered:
                results.append((cx.id, 4, cx.transfer_syntaxes[0] if cx.transfer_syntaxes else _IMPLICIT_LE))
                continue
            results.append((cx.id, 0, offered[0]))
            accepted[cx.id] = (cx.abstract_syntax, offered[0])
        return results, accepted

    def _command_fragment(self, message: _Message, fragment: memoryview, control: int,
                          contexts: dict[int, tuple[str, str]], calling: str) -> bool:
        if message.command is not None:
            raise ul.UlError("a command fragment after the command was complete", ul.UNEXPECTED_PDU)
        message.size += len(fragment)
        if message.size > _MAX_COMMAND_BYTES:
            raise ul.UlError(f"a command set of more than {_MAX_COMMAND_BYTES} bytes")
        message.fragments.append(bytes(fragment))
        if not control & 0x02:
            return False
        message.command = cmd = ul.parse_command(b"".join(message.fragments))
        message.fragments, message.size = [], 0
        field = _us(cmd, 0x0100)
        if field == _C_CANCEL_RQ:
            return True  # nothing to cancel: one operation at a time, each answered before the next
        _us(cmd, 0x0110)
        if _us(cmd, 0x0800) == _NO_DATASET:
            return True
        if field != _C_STORE_RQ:
            message.answer = _UNRECOGNISED_OPERATION  # once its data set is in (and dropped)
            return False
        sop_class = ul.uid_text(cmd.get(0x0002, b""))
        sop_uid = ul.uid_text(cmd.get(0x1000, b""))
        if not sop_class or not sop_uid:
            log.warning("store refused reason=missing_affected_uid calling_ae=%s sop_class=%r sop_uid=%r",
                        calling, sop_class, sop_uid)
            message.answer = CANNOT_UNDERSTAND
            return False
        meta = ul.file_meta(sop_class, sop_uid, contexts[message.context_id][1], calling)
        if not self.config.spool_to_disk:
            message.memory = bytearray(meta)
            return False
        try:
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix=".rx-")
        except OSError as exc:
            log.error("store failed reason=spool calling_ae=%s sop_uid=%s error=%s", calling, sop_uid, exc)
            message.answer = OUT_OF_RESOURCES
            return False
        message.spool_fd, message.spool = fd, Path(name)
        self._spool_write(message, meta)
        return False

    def _spool_write(self, message: _Message, data: bytes | memoryview) -> None:
        # On the loop: page-cache writes of at most a PDU take microseconds. A disk so far behind
        # that the kernel throttles writers stalls every association here, as it would stall the stores.
        try:
            _write_all(message.spool_fd, data)
        except OSError as exc:
            log.error("store failed reason=spool path=%s error=%s", message.spool, exc)
            message.drop_spool()
            message.answer = OUT_OF_RESOURCES

    def _data_fragment(self, message: _Message, fragment: memoryview, control: int) -> bool:
        if message.command is None:
            raise ul.UlError("a data set fragment before its command", ul.UNEXPECTED_PDU)
        if message.answer is not None:
            pass  # decided already: the rest of the data set is read and dropped
        elif message.spool_fd >= 0:
            self._spool_write(message, fragment)
        elif message.memory is not None:
            if len(message.memory) + len(fragment) > MAX_MEMORY_INSTANCE:
                log.error("store failed reason=too_large bytes>%s (no spool: DICOMFLOW spool_to_disk off)",
                          MAX_MEMORY_INSTANCE)
                message.memory = None
                message.answer = OUT_OF_RESOURCES
            else:
                message.memory += fragment
        return bool(control & 0x02)

    async def _complete(self, message: _Message, contexts: dict[int, tuple[str, str]], calling: str, called: str,
                        ip: str, deps: StoreDeps) -> bytes | None:
        """The answer's command set once a message is complete (None: nothing to answer)."""
        cmd = message.command
        assert cmd is not None
        field = _us(cmd, 0x0100)
        if field == _C_CANCEL_RQ:
            return None
        message_id = cmd[0x0110]
        if field == _C_ECHO_RQ:
            return ul.command([(0x0002, ul.uid_bytes(VERIFICATION)), (0x0100, _US.pack(0x8030)),
                               (0x0120, message_id), (0x0800, _US.pack(_NO_DATASET)), (0x0900, _US.pack(0))])
        if field != _C_STORE_RQ:
            log.warning("unsupported DIMSE command 0x%04X calling_ae=%s: answered 0x0211", field, calling)
            return ul.command([(0x0100, _US.pack(field | 0x8000)), (0x0120, message_id),
                               (0x0800, _US.pack(_NO_DATASET)), (0x0900, _US.pack(_UNRECOGNISED_OPERATION))])
        sop_class = ul.uid_text(cmd.get(0x0002, b""))
        sop_uid = ul.uid_text(cmd.get(0x1000, b""))

        def answer(status: int) -> bytes:
            return ul.command([(0x0002, ul.uid_bytes(sop_class)), (0x0100, _US.pack(0x8001)), (0x0120, message_id),
                               (0x0800, _US.pack(_NO_DATASET)), (0x0900, _US.pack(status)),
                               (0x1000, ul.uid_bytes(sop_uid))])

        if message.answer is not None:
            message.drop_spool()
            return answer(message.answer)
        if message.spool is None and message.memory is None:  # a C-STORE-RQ that said it had no data set
            return answer(CANNOT_UNDERSTAND)
        message.close_spool()
        request = StoreRequest(calling, called, ip, contexts[message.context_id][1], sop_uid or None,
                               spool=message.spool,
                               data=bytes(message.memory) if message.memory is not None else None)
        message.memory = None
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(self._pool, _store, request, deps)
        finally:
            message.drop_spool()  # placed by a link (or copied): the spool name goes
        return answer(status)


def _store(request: StoreRequest, deps: StoreDeps) -> int:
    try:
        return store_instance(request, deps)
    except TenantRefused as exc:
        log.warning("store refused reason=%s calling_ae=%s called_ae=%s source_ip=%s tenant=%s detail=%s",
                    exc.reason, request.calling_ae, request.called_ae, request.source_ip, exc.tenant, exc)
        return NOT_AUTHORISED
    except Exception:  # a defect: the sender gets a failure (and retries), never a hung association
        log.exception("store failed reason=unexpected calling_ae=%s", request.calling_ae)
        return _PROCESSING_FAILURE
