"""Hostile but small DICOM files, built byte by byte, for the parser's and the corpus's tests."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

_CONTENT_SEQUENCE = 0x0040A730


def _nest(depth: int) -> bytes:
    """``depth`` undefined-length sequences, each the only element of the one item of the one before."""
    seq_head = struct.pack("<HH2sHI", _CONTENT_SEQUENCE >> 16, _CONTENT_SEQUENCE & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
    item_head = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (seq_head + item_head) * depth + (item_end + seq_end) * depth


def deeply_nested(ct_small: Path, dest: Path, depth: int = 600) -> Path:
    """CT_small's header (new SOP UID, explicit VR little endian, no pixel data) with ``depth``
    nested undefined-length sequences appended: about 22 KB at the default depth."""
    ds = pydicom.dcmread(ct_small, stop_before_pixels=True)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for tag in [t for t in ds.keys() if t > _CONTENT_SEQUENCE]:
        del ds[tag]
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue() + _nest(depth))
    return dest
