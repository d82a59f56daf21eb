"""The C-STORE SCP feeder: receive DICOM instances, store them as received, publish events.

One module per concern:

* :mod:`feeders.scp.acceptor` and :mod:`feeders.scp.ul`: the default engine, associations on
  asyncio (``DICOMFLOW_SCP_ENGINE=pynetdicom`` serves them with pynetdicom's providers instead);
* :mod:`feeders.scp.association`: accepted contexts, TLS policy, the tenancy check per association;
* :mod:`feeders.scp.store`: the C-STORE handler (read the header, place the file, publish, answer);
* :mod:`feeders.scp.bridge`: publishing from the store threads (either engine's) on the publisher's asyncio loop;
* :mod:`feeders.scp.config`: :class:`ScpConfig`;
* :mod:`feeders.scp.server`: :class:`StorageSCP` (started *from* a loop; ``start()`` and
  ``stop()`` do not block it) and :func:`serve`, the standalone form (``dicomflow scp``).

The header is read by :func:`dicom.reader.read_instance_header` and the event built by
:mod:`feeders.events`, as for every feeder.
"""

from dicom.reader import InstanceHeader, read_instance_header
from feeders.scp.association import STORAGE_TRANSFER_SYNTAXES, build_ae, handle_association_request, server_ssl_context
from feeders.scp.bridge import LoopBridge, Publisher
from feeders.scp.config import ScpConfig
from feeders.scp.server import SPOOL_DIR, StorageSCP, serve
from feeders.scp.store import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SUCCESS,
    StoreDeps,
    handle_store,
)

__all__ = [
    "STORAGE_TRANSFER_SYNTAXES",
    "SPOOL_DIR",
    "SUCCESS",
    "OUT_OF_RESOURCES",
    "DATASET_MISMATCH",
    "CANNOT_UNDERSTAND",
    "NOT_AUTHORISED",
    "Publisher",
    "InstanceHeader",
    "read_instance_header",
    "ScpConfig",
    "StoreDeps",
    "LoopBridge",
    "build_ae",
    "server_ssl_context",
    "handle_association_request",
    "handle_store",
    "StorageSCP",
    "serve",
]
