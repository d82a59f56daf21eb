"""Parsing of DICOM DA and TM strings, and the seeds' derived identifiers.

The Rust system accepted only ``HHMMSS[.f]`` for TM; the standard (PS3.5 6.2) also
allows ``HH``, ``HHMM`` and fractions of 1-6 digits, and ACR-NEMA files use
``HH:MM:SS``. All of those are accepted here.
"""

from __future__ import annotations

import re
import zlib
from datetime import date, time

import seahash

from schemas.records import DicomStateMeta, bounds

__all__ = ["parse_da", "parse_tm", "uid_hash", "accession_fallback", "accession_number"]

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{0,6}))?)?)?$")


def parse_da(value: str) -> date:
    """Parse a DICOM DA (``YYYYMMDD``). Raises ``ValueError`` naming the problem."""
    m = _DA.match(value.strip())
    if m is None:
        raise ValueError(f"expected YYYYMMDD, got {value!r}")
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError as exc:
        raise ValueError(f"not a calendar date: {value!r} ({exc})") from None


def parse_tm(value: str) -> time:
    """Parse a DICOM TM: ``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.F{1,6}`` (colons tolerated)."""
    m = _TM.match(value.strip())
    if m is None:
        raise ValueError(f"expected HH[MM[SS[.F{{1,6}}]]], got {value!r}")
    hh = int(m[1])
    mm = int(m[2] or 0)
    ss = int(m[3] or 0)
    frac = m[4] or ""
    if hh > 23 or mm > 59 or ss > 60:
        raise ValueError(f"time out of range: {value!r}")
    # A leap second (60) is legal in TM but not in datetime.time: keep the instant's minute.
    ss = min(ss, 59)
    micro = int(frac.ljust(6, "0")) if frac else 0
    return time(hh, mm, ss, micro)


def uid_hash(uid: str) -> str:
    """SeaHash (the Rust ``seahash`` crate's default seeds) of the UID, as 20 zero-padded digits."""
    return f"{seahash.hash(uid.encode('ascii', 'replace')):020d}"


def accession_fallback(tenant_id: str, study_uid: str) -> str:
    """The seeds' ``X32CRC`` accession number: CRC32 of tenant then study UID, in 128 zero bytes."""
    buf = bytearray(128)
    t = tenant_id.encode("utf-8")[:128]
    buf[: len(t)] = t
    s = study_uid.encode("utf-8")[: 128 - len(t)]
    buf[len(t) : len(t) + len(s)] = s
    return f"X32CRC{zlib.crc32(bytes(buf))}"


#: The series row's bound (``BoundedString<16>`` in the seeds); the transfer log's column is wider.
_ACCESSION_MAX = bounds(DicomStateMeta)["accession_number"]


def accession_number(accession: str | None, tenant_id: str, study_uid: str) -> str:
    """The accession number as every record and event carries it: the header's value, or the
    ``X32CRC`` fallback when it is missing, empty or longer than the series row's bound."""
    if not accession or len(accession.encode("utf-8")) > _ACCESSION_MAX:
        return accession_fallback(tenant_id, study_uid)
    return accession
