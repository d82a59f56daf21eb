"""Deterministic identities: trace ids for files that arrive without a transfer id."""

from __future__ import annotations

import uuid

__all__ = ["trace_id_for", "TRACE_NAMESPACE"]

#: Fixed namespace so the same (tenant, SOP instance, path) always maps to the same trace id.
TRACE_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-4c1b-9a57-2f0e1d0c5b11")


def trace_id_for(tenant_id: str, sop_uid: str, file_path: str) -> str:
    """UUIDv5 of tenant, SOP Instance UID and path: a backfill re-run yields the same ids."""
    return str(uuid.uuid5(TRACE_NAMESPACE, f"{tenant_id}\x1f{sop_uid}\x1f{file_path}"))
