"""The bytes of one element of a DICOM file, named by the tag path a BulkDataURI carries, streamed.

A series document's BulkDataURI ends in ``bulkdata/{tag}[/{item}/{tag}…]`` (dicom/json_model.py).
The file is parsed as the document's writer parsed it (pydicom with a ``defer_size``): values
above it are not read, pydicom only notes where they start (``value_tell``). Such a value is then
sent in chunks straight from the file: a defined length is a byte range; an undefined length
(encapsulated Pixel Data) is walked item by item up to its Sequence Delimitation Item. The bytes
are those pydicom gives as the element's value (for encapsulated data: the items with their
headers, the delimiter excluded); a small value pydicom did read is sent as it is.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from core.errors import Code, ExtractionError

__all__ = ["BulkValue", "parse_tag_path", "locate", "iter_value"]

_CHUNK = 256 * 1024
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_END = 0xFFFEE0DD
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


@dataclass(frozen=True, slots=True)
class BulkValue:
    """Where an element's value is: in memory (``data``) or in the file (offset, length)."""

    data: bytes | None = None
    offset: int = 0
    #: Bytes at ``offset``; ``None``: undefined length (items up to the sequence delimiter).
    length: int | None = 0
    little_endian: bool = True


def parse_tag_path(text: str) -> list[int | str]:
    """``7FE00010`` or ``00540016/0/00181072`` as tags (ints) and item numbers (str); ValueError
    naming the part that is neither."""
    parts = [p for p in text.split("/") if p]
    if not parts or len(parts) % 2 == 0:
        raise ValueError(f"bulk data path {text!r}: expected tag[/item/tag…]")
    out: list[int | str] = []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            if not _TAG.fullmatch(part):
                raise ValueError(f"bulk data path {text!r}: {part!r} is not a tag (8 hex digits)")
            out.append(int(part, 16))
        else:
            if not part.isdigit():
                raise ValueError(f"bulk data path {text!r}: {part!r} is not an item number")
            out.append(part)
    return out


def locate(path: Path, tag_path: list[int | str], defer_size: int) -> BulkValue | None:
    """Where the element at ``tag_path`` keeps its value; None when the file has no such element."""
    try:
        ds = pydicom.dcmread(path, defer_size=defer_size, force=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error) as exc:
        raise ExtractionError(f"not a readable DICOM file: {exc}", code=Code.NOT_DICOM, field="file") from exc
    current: Dataset = ds
    for n in range(0, len(tag_path) - 1, 2):
        tag, item = int(tag_path[n]), int(tag_path[n + 1])
        if BaseTag(tag) not in current:
            return None
        seq = current[tag]
        if seq.VR != "SQ" or item >= len(seq.value):
            return None
        current = seq.value[item]
    last = BaseTag(int(tag_path[-1]))
    elem = current._dict.get(last)  # noqa: SLF001 - the raw element: its value is not read
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        if elem.value is None and elem.length:
            length = None if elem.length == _UNDEFINED else int(elem.length)
            return BulkValue(offset=int(elem.value_tell), length=length, little_endian=elem.is_little_endian)
        return BulkValue(data=bytes(elem.value or b""))
    value = elem.value
    return BulkValue(data=value if isinstance(value, bytes) else b"")


def iter_value(path: Path, where: BulkValue, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The value's bytes in chunks (never the whole value at once)."""
    if where.data is not None:
        yield where.data
        return
    with open(path, "rb") as f:
        f.seek(where.offset)
        if where.length is not None:
            yield from _copy(f, where.length, chunk)
            return
        order = "<" if where.little_endian else ">"
        while True:  # encapsulated: item headers and their fragments, up to the delimiter
            header = f.read(8)
            if len(header) < 8:
                raise EOFError("bulk data: the file ends before the sequence delimiter")
            group, element, length = struct.unpack(f"{order}HHL", header)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise ValueError(f"bulk data: ({group:04X},{element:04X}) where an item was expected")
            yield header
            yield from _copy(f, length, chunk)


def _copy(f: object, length: int, chunk: int) -> Iterator[bytes]:
    read = f.read  # type: ignore[attr-defined]
    left = length
    while left > 0:
        block = read(min(chunk, left))
        if not block:
            raise EOFError(f"bulk data: the file ends {left} bytes before the value does")
        left -= len(block)
        yield block
