"""A counting TCP proxy in front of the broker: Kafka requests per API and client, records per produce.

Tansu 0.6 has no per-request metrics (its debug log names no requests and its OTLP metrics
need a collector), so the benchmark counts at the broker's door: the broker advertises this
proxy's address, every client connects through it, and the proxy parses each request's
header (API key, version, client id) and, for Produce, the record batches' record counts.
Bytes are forwarded unchanged; the proxy runs in its own process so that its CPU is not
charged to any process of the stack.

    python -m bench.broker_proxy --listen 19092 --upstream 127.0.0.1:19093 --out counts.json

Counts are written to ``--out`` (JSON) every 0.2 s while they change, and at exit (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections import Counter
from pathlib import Path

import orjson

__all__ = ["API_NAMES", "RequestCounts", "parse_request", "produce_records"]

#: The Kafka API keys a dicomflow stack sends (others are counted by number).
API_NAMES = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
             10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
             18: "ApiVersions", 19: "CreateTopics", 22: "InitProducerId"}
#: First flexible (compact, tagged-field) version of Produce.
_PRODUCE_FLEXIBLE = 9


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _skip_tags(buf: bytes, pos: int) -> int:
    count, pos = _uvarint(buf, pos)
    for _ in range(count):
        _, pos = _uvarint(buf, pos)
        size, pos = _uvarint(buf, pos)
        pos += size
    return pos


def _batch_records(records: bytes) -> int:
    """Records in a concatenation of v2 record batches (count at byte 57 of each batch)."""
    total, pos = 0, 0
    while pos + 61 <= len(records):
        (length,) = struct.unpack_from(">i", records, pos + 8)
        if records[pos + 16] == 2:  # magic
            (count,) = struct.unpack_from(">i", records, pos + 57)
            total += count
        else:
            total += 1
        pos += 12 + length
    return total


def produce_records(body: bytes, version: int) -> int:
    """Records in a Produce request's body (after the request header)."""
    flexible = version >= _PRODUCE_FLEXIBLE
    pos = 0
    if flexible:
        n, pos = _uvarint(body, pos)
        pos += max(n - 1, 0)
    else:
        (n,) = struct.unpack_from(">h", body, pos)
        pos += 2 + max(n, 0)
    pos += 2 + 4  # acks, timeout
    total = 0
    if flexible:
        topics, pos = _uvarint(body, pos)
        topics -= 1
    else:
        (topics,) = struct.unpack_from(">i", body, pos)
        pos += 4
    for _ in range(topics):
        if flexible:
            n, pos = _uvarint(body, pos)
            pos += n - 1
            parts, pos = _uvarint(body, pos)
            parts -= 1
        else:
            (n,) = struct.unpack_from(">h", body, pos)
            pos += 2 + n
            (parts,) = struct.unpack_from(">i", body, pos)
            pos += 4
        for _ in range(parts):
            pos += 4  # partition index
            if flexible:
                size, pos = _uvarint(body, pos)
                size -= 1
            else:
                (size,) = struct.unpack_from(">i", body, pos)
                pos += 4
            if size > 0:
                total += _batch_records(body[pos:pos + size])
                pos += size
            if flexible:
                pos = _skip_tags(body, pos)
        if flexible:
            pos = _skip_tags(body, pos)
    return total


def parse_request(frame: bytes) -> tuple[int, int, str, int]:
    """(api key, api version, client id, records if Produce else 0) of one request frame (size prefix cut)."""
    api_key, version, _correlation, client_len = struct.unpack_from(">hhih", frame, 0)
    pos = 10
    client = frame[pos:pos + client_len].decode(errors="replace") if client_len > 0 else ""
    pos += max(client_len, 0)
    records = 0
    if api_key == 0:
        if version >= _PRODUCE_FLEXIBLE:
            pos = _skip_tags(frame, pos)
        try:
            records = produce_records(frame[pos:], version)
        except (struct.error, IndexError):
            records = -1
    return api_key, version, client, records


class RequestCounts:
    """Requests by (client id, API), and produce records and requests by client."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.records: Counter[str] = Counter()
        self.unparsed = 0
        self.changed = True

    def add(self, frame: bytes) -> None:
        api_key, _version, client, records = parse_request(frame)
        self.requests[(client, API_NAMES.get(api_key, str(api_key)))] += 1
        if api_key == 0:
            if records < 0:
                self.unparsed += 1
            else:
                self.records[client] += records
        self.changed = True

    def as_dict(self) -> dict[str, object]:
        by_api: Counter[str] = Counter()
        for (_client, api), n in self.requests.items():
            by_api[api] += n
        return {"requests_by_api": dict(by_api),
                "requests": [{"client": c, "api": a, "count": n} for (c, a), n in sorted(self.requests.items())],
                "produce_records_by_client": dict(self.records), "produce_records": sum(self.records.values()),
                "unparsed_produce_requests": self.unparsed}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: RequestCounts | None) -> None:
    buf = bytearray()
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            if counts is not None:
                buf += chunk
                while len(buf) >= 4:
                    (size,) = struct.unpack_from(">i", buf, 0)
                    if len(buf) < 4 + size:
                        break
                    counts.add(bytes(buf[4:4 + size]))
                    del buf[:4 + size]
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve(listen: int, upstream: str, out: Path) -> None:
    counts = RequestCounts()
    host, _, port = upstream.rpartition(":")

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, counts), _pipe(up_reader, writer, None))

    def dump() -> None:
        if counts.changed:
            counts.changed = False
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(counts.as_dict()))
            tmp.replace(out)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(on_client, "127.0.0.1", listen)
    print("ready", flush=True)
    while not stop.is_set():
        dump()
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    server.close()
    counts.changed = True
    dump()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the broker")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.upstream, args.out))


if __name__ == "__main__":
    main()
