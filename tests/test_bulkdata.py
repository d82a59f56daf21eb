"""dicom/bulkdata.py on real files: the bytes a document's BulkDataURI names are pydicom's value of
that element (native, big endian, encapsulated, nested in a sequence), streamed in chunks."""

from __future__ import annotations

from pathlib import Path

import orjson
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom.bulkdata import iter_value, locate, parse_tag_path
from dicom.json_model import JsonOptions, instance_json


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_pixel_data_streamed_is_pydicoms_value(name: str) -> None:
    path = Path(str(get_testdata_file(name)))
    where = locate(path, parse_tag_path("7FE00010"), 100)
    assert where is not None and where.data is None  # read from the file, not from memory
    chunks = list(iter_value(path, where, chunk=1000))
    assert b"".join(chunks) == pydicom.dcmread(path).PixelData
    assert max(len(c) for c in chunks) <= 1000


def test_a_nested_uri_from_a_document_resolves(tmp_path: Path) -> None:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = 50, 60, 8
    icon.add_new(0x7FE00010, "OB", bytes(range(256)) * 12)
    ds.IconImageSequence = Sequence([icon])
    path = tmp_path / "with icon.dcm"
    ds.save_as(path)
    options = JsonOptions()
    obj = orjson.loads(instance_json(path, options).data)
    uri = obj["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    tags = uri.split("/bulkdata/", 1)[1]
    assert tags == "00880200/0/7FE00010"
    where = locate(path, parse_tag_path(tags), options.defer_size)
    assert where is not None
    assert b"".join(iter_value(path, where, chunk=500)) == bytes(range(256)) * 12
    assert locate(path, parse_tag_path("00880200/1/7FE00010"), options.defer_size) is None  # no such item
    assert locate(path, parse_tag_path("00420011"), options.defer_size) is None


@pytest.mark.parametrize("text", ["", "7FE00010/0", "7FE0001", "7FE00010/x/00100010", "zzzzzzzz"])
def test_a_malformed_path_names_its_part(text: str) -> None:
    with pytest.raises(ValueError, match="bulk data path"):
        parse_tag_path(text)
