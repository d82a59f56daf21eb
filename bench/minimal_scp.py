"""The SCP benchmark's baseline: a minimal pynetdicom C-STORE SCP that only writes the bytes it received.

Every storage SOP class in every transfer syntax pynetdicom knows; the EVT_C_STORE handler
writes ``event.encoded_dataset()`` (preamble, file meta, data set) to ``DIR/<n>.dcm`` and
answers 0x0000. No header parse, no broker. Run as its own process, as ``dicomflow scp`` is:

    python -m bench.minimal_scp --port 11113 --dir /tmp/rx

It prints ``ready`` once listening; on SIGTERM it prints one JSON line: instances received,
and the CLOCK_MONOTONIC times (comparable across processes) of the first and last store.

With ``--durable`` it stores the way issue #6 requires and nothing more: a temporary file,
fsync, rename, fsync of the directory, then the answer. No header parse, no broker. It
measures what durability alone costs per instance on this disk, the floor under any SCP
that must not answer success for an instance a crash could lose.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt

__all__ = ["main"]


class _Sink:
    def __init__(self, folder: Path, durable: bool = False) -> None:
        self.folder = folder
        self.durable = durable
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        data = event.encoded_dataset()
        with self.lock:
            self.count += 1
            n = self.count
        final = self.folder / f"{n:06d}.dcm"
        if self.durable:
            tmp = final.with_name(f".{final.name}.part")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, final)
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            final.write_bytes(data)
        now = time.monotonic()
        with self.lock:
            self.first = now if self.first is None else self.first
            self.last = now
        return 0x0000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--aet", default="DICOMFLOW")
    parser.add_argument("--durable", action="store_true", help="temp file, fsync, rename, fsync the directory")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    sink = _Sink(args.dir, args.durable)
    ae = AE(ae_title=args.aet)
    ae.require_called_aet = False
    syntaxes = list(AllTransferSyntaxes)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    server = ae.start_server(("127.0.0.1", args.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, sink.on_store)])
    assert server is not None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.shutdown()
    print(orjson.dumps({"received": sink.count, "first": sink.first, "last": sink.last}).decode(), flush=True)


if __name__ == "__main__":
    main()
