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
import ssl
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from feeders.scp import ul
from feeders.scp.association import accepted_syntaxes, admit, certificate_cn, storage_sop_classes
from feeders.scp.config import ScpConfig
from feeders.scp.store import CANNOT_UNDERSTAND, NOT_AUTHORISED, StoreDeps, StoreRequest, store_instance
from feeders.tenancy import TenantRefused

__all__ = ["Acceptor", "MAX_PDU_LENGTH", "SPOOL_DIR"]

log = logging.getLogger(__name__)

#: The largest P-DATA-TF we accept (advertised in the A-ASSOCIATE-AC): a 40 KB instance in one PDU.
MAX_PDU_LENGTH = 262_144
#: An A-ASSOCIATE-RQ larger than this is not a real one (128 contexts take ~20 KB).
_MAX_RQ_LENGTH = 1 << 20
#: Spool files, inside the storage root so that placing one is a link (readers skip dot-entries).
SPOOL_DIR = ".spool"

VERIFICATION = "1.2.840.10008.1.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_VERIFICATION_SYNTAXES = (_IMPLICIT_LE, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")

_C_STORE_RQ, _C_ECHO_RQ = 0x0001, 0x0030
_NO_DATASET = 0x0101
_UNRECOGNISED_OPERATION = 0x0211
_US = struct.Struct("<H")


class _Closed(Exception):
    """The association ended (released, aborted, or the peer went away)."""


class _Message:
    """The DIMSE message being received: its command, then its data set's fragments."""

    __slots__ = ("context_id", "command", "fragments", "spool_fd", "spool", "memory", "discard")

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.command: dict[int, bytes] | None = None
        self.fragments: list[bytes] = []
        self.spool_fd = -1
        self.spool: Path | None = None
        self.memory: bytearray | None = None
        self.discard = False

    def drop_spool(self) -> None:
        if self.spool_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.spool_fd)
            self.spool_fd = -1
        if self.spool is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.spool)
            self.spool = None


class Acceptor:
    """Serves associations on the loop it is started on; ``close()`` drains them."""

    def __init__(self, config: ScpConfig, deps: StoreDeps, ssl_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.deps = deps
        self.ssl_context = ssl_context
        self.syntaxes = frozenset(accepted_syntaxes(config))
        self.preference = {ts: i for i, ts in enumerate(accepted_syntaxes(config))}
        self.sop_classes = storage_sop_classes()
        self.spool_dir = config.storage_root / SPOOL_DIR
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: dict[asyncio.Task[None], tuple[asyncio.StreamWriter, str]] = {}
        #: The message each association is receiving (its spool file goes if the association does).
        self._current: dict[asyncio.Task[None], _Message] = {}
        # Stores block (fsync, link, journal): one thread per association at most.
        self._pool = ThreadPoolExecutor(config.max_associations, thread_name_prefix="scp-store")

    async def serve(self, sock: Any) -> None:
        """Accept on an already listening socket (bound by the caller, so its port is known at once)."""
        if self.config.spool_to_disk:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_server(
            self._accept, sock=sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.config.acse_timeout_s if self.ssl_context else None,
            limit=MAX_PDU_LENGTH + 64)

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
                    writer.write(ul.abort(0, 0))
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
        """start_server runs this as the association's own task."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers[task] = (writer, "")
        try:
            await self._association(task, reader, writer)
        except _Closed:
            pass
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the peer went away; an unanswered instance was not acknowledged
        except TimeoutError:
            log.warning("association aborted: nothing received for too long calling_ae=%s",
                        self._writers.get(task, (None, ""))[1])
            with contextlib.suppress(Exception):
                writer.write(ul.abort(2, 0))
        except ul.UlError as exc:
            log.warning("association aborted: %s calling_ae=%s", exc, self._writers.get(task, (None, ""))[1])
            with contextlib.suppress(Exception):
                writer.write(ul.abort(2, 0))
        finally:
            unfinished = self._current.pop(task, None)
            if unfinished is not None:
                unfinished.drop_spool()
            self._tasks.discard(task)
            self._writers.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _read(self, reader: asyncio.StreamReader, timeout: float, limit: int) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(6)
            kind, _, length = struct.unpack(">BBI", head)
            if length > limit:
                raise ul.UlError(f"PDU 0x{kind:02X} of {length} bytes (at most {limit})")
            return kind, await reader.readexactly(length)

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
            raise ul.UlError(f"PDU 0x{kind:02X} before any association")
        rq = ul.parse_associate_rq(body)
        calling, called = rq.calling, rq.called
        self._writers[task] = (writer, calling)
        refusal = self._refusal(rq, ip, cert_cn)
        if refusal is not None:
            writer.write(ul.associate_rj(*refusal))
            await writer.drain()
            # As pynetdicom does: give the peer a moment to read the rejection and close first.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await reader.read()
            raise _Closed
        results, contexts = self._negotiate(rq)
        writer.write(ul.associate_ac(rq, results, MAX_PDU_LENGTH))
        await writer.drain()
        deps = self.deps
        if cert_cn is not None:
            deps = replace(deps, tenancy=deps.tenancy.for_peer(cert_cn))
        peer_max = rq.max_length
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
                    done = (self._command_fragment(message, fragment, control, contexts, rq)
                            if control & 0x01 else self._data_fragment(message, fragment, control))
                    if not done:
                        continue
                    answer = await self._complete(message, contexts, calling, called, ip, deps)
                    message = None
                    self._current.pop(task, None)
                    if answer is not None:
                        writer.write(ul.p_data(cid, answer, peer_max))
                        await writer.drain()
            elif kind == ul.A_RELEASE_RQ:
                writer.write(ul.release_rp())
                await writer.drain()
                raise _Closed
            elif kind == ul.A_ABORT:
                raise _Closed
            else:
                raise ul.UlError(f"unexpected PDU 0x{kind:02X} on an established association")

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
        if len(self._tasks) > self.config.max_associations:
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
                          contexts: dict[int, tuple[str, str]], rq: ul.AssociateRQ) -> bool:
        if message.command is not None:
            raise ul.UlError("a command fragment after the command was complete")
        message.fragments.append(bytes(fragment))
        if not control & 0x02:
            return False
        message.command = cmd = ul.parse_command(b"".join(message.fragments))
        message.fragments = []
        if 0x0100 not in cmd or 0x0110 not in cmd:
            raise ul.UlError("a command set without Command Field or Message ID")
        has_data = _US.unpack(cmd.get(0x0800, _US.pack(_NO_DATASET))[:2])[0] != _NO_DATASET
        field = _US.unpack(cmd[0x0100][:2])[0]
        if not has_data:
            return True
        if field != _C_STORE_RQ:
            message.discard = True  # answered "unrecognised operation" once its data set is in
            return False
        sop_class = _uid(cmd.get(0x0002, b""))
        sop_uid = _uid(cmd.get(0x1000, b""))
        meta = ul.file_meta(sop_class, sop_uid, contexts[message.context_id][1], rq.calling)
        if self.config.spool_to_disk:
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix=".rx-")
            message.spool_fd, message.spool = fd, Path(name)
            os.write(fd, meta)
        else:
            message.memory = bytearray(meta)
        return False

    def _data_fragment(self, message: _Message, fragment: memoryview, control: int) -> bool:
        if message.command is None:
            raise ul.UlError("a data set fragment before its command")
        if message.spool_fd >= 0:
            # Page-cache writes of at most a PDU: microseconds, not worth a thread hop.
            while fragment:
                fragment = fragment[os.write(message.spool_fd, fragment):]
        elif message.memory is not None:
            message.memory += fragment
        return bool(control & 0x02)

    async def _complete(self, message: _Message, contexts: dict[int, tuple[str, str]], calling: str, called: str,
                        ip: str, deps: StoreDeps) -> bytes | None:
        """The answer's command set once a message is complete (None: nothing to answer)."""
        cmd = message.command
        assert cmd is not None
        field = _US.unpack(cmd[0x0100][:2])[0]
        message_id = cmd[0x0110][:2]
        if field == _C_ECHO_RQ:
            return ul.command([(0x0002, ul.uid_bytes(VERIFICATION)), (0x0100, _US.pack(0x8030)),
                               (0x0120, message_id), (0x0800, _US.pack(_NO_DATASET)), (0x0900, _US.pack(0))])
        if field != _C_STORE_RQ or message.discard:
            log.warning("unsupported DIMSE command 0x%04X calling_ae=%s: answered 0x0211", field, calling)
            return ul.command([(0x0100, _US.pack(field | 0x8000)), (0x0120, message_id),
                               (0x0800, _US.pack(_NO_DATASET)), (0x0900, _US.pack(_UNRECOGNISED_OPERATION))])
        elements = [(0x0002, cmd.get(0x0002, b"")), (0x0100, _US.pack(0x8001)), (0x0120, message_id),
                    (0x0800, _US.pack(_NO_DATASET))]
        if message.spool is None and message.memory is None:  # a C-STORE without a data set
            return ul.command([*elements, (0x0900, _US.pack(CANNOT_UNDERSTAND)), (0x1000, cmd.get(0x1000, b""))])
        if message.spool_fd >= 0:
            os.close(message.spool_fd)
            message.spool_fd = -1
        request = StoreRequest(calling, called, ip, contexts[message.context_id][1],
                               _uid(cmd.get(0x1000, b"")) or None, spool=message.spool,
                               data=bytes(message.memory) if message.memory is not None else None)
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(self._pool, _store, request, deps)
        finally:
            message.drop_spool()  # placed by a link (or copied): the spool name goes
        return ul.command([*elements, (0x0900, _US.pack(status)), (0x1000, cmd.get(0x1000, b""))])


def _store(request: StoreRequest, deps: StoreDeps) -> int:
    try:
        return store_instance(request, deps)
    except TenantRefused as exc:
        log.warning("store refused reason=%s calling_ae=%s called_ae=%s source_ip=%s tenant=%s detail=%s",
                    exc.reason, request.calling_ae, request.called_ae, request.source_ip, exc.tenant, exc)
        return NOT_AUTHORISED


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace")
