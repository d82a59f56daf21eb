"""Header extraction on every DICOM file bundled with pydicom, plus the seeds' rules one by one."""

from __future__ import annotations

import warnings
from datetime import date, time
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from core.errors import Code, ExtractionError
from dicom.extract import Extracted, extract
from dicom.values import accession_fallback, uid_hash
from tests.conftest import PYDICOM_TEST_FILES, bundled_dicom_files


class Accepted(NamedTuple):
    patient_id: str
    modality: str
    study_date: str
    transfer_syntax: str
    accession: str


class Rejected(NamedTuple):
    code: str
    field: str


# Reviewed by hand against each file's header: every bundled file is either accepted with
# these values or rejected for this reason under the seeds' rules.
EXPECTED: dict[str, Accepted | Rejected] = {
    "693_J2KI.dcm": Rejected("MISSING_REQUIRED_FIELD", "StudyDate"),
    "CT_small.dcm": Accepted("1CT1", "CT", "2004-01-19", "1.2.840.10008.1.2.1", "X32CRC1755227208"),
    "ExplVR_BigEnd.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "ExplVR_BigEndNoMeta.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "ExplVR_LitEndNoMeta.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "GDCMJ2K_TextGBR.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "J2K_pixelrep_mismatch.dcm": Accepted("JXD191021006", "CT", "2019-10-19", "1.2.840.10008.1.2.4.90", "X32CRC3458201504"),
    "JPEG-lossy.dcm": Accepted("8NM1", "NM", "2004-08-26", "1.2.840.10008.1.2.4.51", "X32CRC805311992"),
    "JPEG2000-embedded-sequence-delimiter.dcm": Accepted("8NM1", "NM", "2004-08-26", "1.2.840.10008.1.2.4.91", "X32CRC805311992"),
    "JPEG2000.dcm": Accepted("8NM1", "NM", "2004-08-26", "1.2.840.10008.1.2.4.91", "X32CRC805311992"),
    "JPEGLSNearLossless_08.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "JPEGLSNearLossless_16.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "JPGExtended.dcm": Accepted("8NM1", "NM", "2004-08-26", "1.2.840.10008.1.2.4.51", "X32CRC805311992"),
    "MR_small.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.1", "X32CRC3207759363"),
    "MR_small_RLE.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.5", "X32CRC3207759363"),
    "MR_small_bigendian.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.2", "X32CRC3207759363"),
    "MR_small_expb.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.2", "X32CRC3207759363"),
    "MR_small_implicit.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2", "X32CRC3207759363"),
    "MR_small_jp2klossless.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.4.90", "X32CRC3207759363"),
    "MR_small_jpeg_ls_lossless.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.4.80", "X32CRC3207759363"),
    "MR_small_padded.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.1", "X32CRC3207759363"),
    "MR_truncated.dcm": Accepted("4MR1", "MR", "2004-08-26", "1.2.840.10008.1.2.1", "X32CRC3207759363"),
    "SC_jpeg_no_color_transform.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_jpeg_no_color_transform_2.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_dcmtk_+eb+cr.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_dcmtk_+eb+cy+np.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_gdcm_KY.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.91", "X32CRC3990953251"),
    "SC_rgb_jls_lossy_line.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_jls_lossy_sample.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_jpeg.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_jpeg_app14_dcmd.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_jpeg_dcmd.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "SC_rgb_jpeg_dcmtk.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_jpeg_gdcm.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.70", "X32CRC3990953251"),
    "SC_rgb_jpeg_lossy_gdcm.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_rgb_rle.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_rle_16bit.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_rle_16bit_2frame.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_rle_2frame.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_rle_32bit.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_rle_32bit_2frame.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.5", "X32CRC3990953251"),
    "SC_rgb_small_odd.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.1", "X32CRC3990953251"),
    "SC_rgb_small_odd_big_endian.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.2", "X32CRC3990953251"),
    "SC_rgb_small_odd_jpeg.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.4.50", "X32CRC3990953251"),
    "SC_ybr_full_422_uncompressed.dcm": Accepted("ID1", "OT", "2017-01-01", "1.2.840.10008.1.2.1", "X32CRC3990953251"),
    "UN_sequence.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "badVR.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2.1", "X32CRC871518361"),
    "dicomdirtests/DICOMDIR-empty.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "empty_charset_LEI.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "examples_jpeg2k.dcm": Accepted("13US1", "US", "2004-08-26", "1.2.840.10008.1.2.4.90", "X32CRC2299050903"),
    "examples_overlay.dcm": Accepted("021234567", "MR", "2005-11-30", "1.2.840.10008.1.2.1", "8000000000330109"),
    "examples_palette.dcm": Accepted("11-05-25-142825", "US", "2011-05-25", "1.2.840.10008.1.2.1", "X32CRC4235623642"),
    "examples_rgb_color.dcm": Accepted("13US1", "US", "2004-08-26", "1.2.840.10008.1.2.1", "X32CRC2299050903"),
    "examples_ybr_color.dcm": Accepted("204", "US", "2016-05-03", "1.2.840.10008.1.2.4.50", "X32CRC236073467"),
    "image_dfl.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "liver_1frame.dcm": Accepted("99000", "SEG", "2003-04-17", "1.2.840.10008.1.2.1", "03086212"),
    "liver_expb_1frame.dcm": Accepted("99000", "SEG", "2003-04-17", "1.2.840.10008.1.2.2", "03086212"),
    "meta_missing_tsyntax.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "nested_priv_SQ.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "no_meta.dcm": Rejected("NOT_DICOM", "file_path"),
    "no_meta_group_length.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "priv_SQ.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "reportsi.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "reportsi_with_empty_number_tags.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "rtdose.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2", "X32CRC871518361"),
    "rtdose_1frame.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2", "X32CRC871518361"),
    "rtdose_expb.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2.2", "X32CRC871518361"),
    "rtdose_expb_1frame.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2.2", "X32CRC871518361"),
    "rtdose_rle.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2.5", "X32CRC871518361"),
    "rtdose_rle_1frame.dcm": Accepted("id11111", "RTDOSE", "2003-08-05", "1.2.840.10008.1.2.5", "X32CRC871518361"),
    "rtplan.dcm": Accepted("id00001", "RTPLAN", "2003-07-16", "1.2.840.10008.1.2", "X32CRC2806462759"),
    "rtplan_truncated.dcm": Accepted("id00001", "RTPLAN", "2003-07-16", "1.2.840.10008.1.2", "X32CRC2806462759"),
    "rtstruct.dcm": Rejected("MISSING_REQUIRED_FIELD", "StudyDate"),
    "test-SR.dcm": Rejected("MISSING_REQUIRED_FIELD", "PatientID"),
    "waveform_ecg.dcm": Accepted("642341", "ECG", "2013-01-25", "1.2.840.10008.1.2.1", "03028041970546"),
}


def test_every_bundled_file_is_covered() -> None:
    found = {str(p.relative_to(PYDICOM_TEST_FILES)) for p in bundled_dicom_files()}
    assert found == set(EXPECTED), "pydicom's bundled files changed; review EXPECTED"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_file(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = extract(PYDICOM_TEST_FILES / name, "t1")
    want = EXPECTED[name]
    if isinstance(want, Rejected):
        assert isinstance(result, ExtractionError | Exception), result
        assert (result.code, result.field) == (want.code, want.field)  # type: ignore[union-attr]
        return
    assert isinstance(result, Extracted), result
    s, i, o = result.state, result.image, result.object
    assert (s.patient_id, s.modality, s.study_date.isoformat(), i.transfer_syntax_uid,
            s.accession_number) == tuple(want)
    # the three records agree on identity
    assert s.study_uid == i.study_uid == o.study_uid
    assert s.series_uid == i.series_uid == o.series_uid
    assert i.sop_uid == o.sop_uid
    assert s.study_uid_hash == uid_hash(s.study_uid) == i.study_uid_hash == o.study_uid_hash
    assert len(s.study_uid_hash) == 20 and s.study_uid_hash.isdigit()
    assert o.file_size == (PYDICOM_TEST_FILES / name).stat().st_size == i.space_size
    assert o.transfer_status == "SUCCESS"


def test_ct_small_values(ct_small: Path) -> None:
    result = extract(ct_small, "t1")
    assert isinstance(result, Extracted)
    s, i = result.state, result.image
    assert s.study_uid == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    assert s.study_uid_hash == "00332093670316092639"
    assert s.accession_number == accession_fallback("t1", s.study_uid) == "X32CRC1755227208"
    assert s.study_date_origin == "20040119" and s.study_date == date(2004, 1, 19)
    assert s.study_time == time(7, 27, 30)
    assert s.patient_name == "CompressedSamples^CT1"
    assert i.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    assert i.image_position_patient == "-158.135803\\-179.035797\\-75.699997"
    assert i.image_orientation_patient is not None and i.image_orientation_patient.count("\\") == 5
    assert (i.width, i.columns, i.bits_allocated, i.pixel_representation) == (128, 128, 16, 1)
    assert i.rescale_intercept == -1024.0 and i.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


def test_window_values_are_backslash_joined() -> None:
    result = extract(PYDICOM_TEST_FILES / "MR_small.dcm", "t1")
    assert isinstance(result, Extracted)
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "MR_small.dcm", stop_before_pixels=True)
    assert result.image.image_type == "\\".join(ds.ImageType)


def test_seahash_vector() -> None:
    import seahash

    assert seahash.hash(b"to be or not to be") == 1988685042348123509
    assert uid_hash("1.2") == f"{seahash.hash(b'1.2'):020d}"


def test_accession_fallback_layout() -> None:
    import zlib

    buf = bytearray(128)
    buf[:2] = b"t1"
    buf[2:5] = b"1.2"
    assert accession_fallback("t1", "1.2") == f"X32CRC{zlib.crc32(bytes(buf))}"


# ---- the rules one at a time, on a minimal synthetic dataset -------------------------------

def _ds(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyDate = "20240102"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key, value in overrides.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("field", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                   "SOPInstanceUID", "StudyDate", "SOPClassUID"])
@pytest.mark.parametrize("value", [None, ""])
def test_required_fields(field: str, value: str | None) -> None:
    result = extract(_ds(**{field: value}), "t1")
    assert isinstance(result, ExtractionError)
    assert (result.code, result.field) == (Code.MISSING_REQUIRED_FIELD, field)


@pytest.mark.parametrize("field", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_required_too_long(field: str) -> None:
    result = extract(_ds(**{field: "1" * 65}), "t1")
    assert isinstance(result, ExtractionError)
    assert (result.code, result.field) == (Code.VALUE_TOO_LONG, field)
    assert isinstance(extract(_ds(**{field: "1" * 64}), "t1"), Extracted)


@pytest.mark.parametrize("value", ["2024-01-02", "20241301", "2024010", "abcdefgh"])
def test_bad_study_date(value: str) -> None:
    result = extract(_ds(StudyDate=value), "t1")
    assert isinstance(result, ExtractionError)
    assert (result.code, result.field) == (Code.INVALID_DATE, "StudyDate")


@pytest.mark.parametrize(("field", "limit"), [("Modality", 16), ("PatientSex", 1), ("StudyID", 16),
                                              ("StudyDescription", 64), ("SeriesDescription", 256),
                                              ("BodyPartExamined", 64), ("ProtocolName", 64),
                                              ("PatientAge", 16), ("PhotometricInterpretation", 32)])
def test_optional_bounds(field: str, limit: int) -> None:
    ok = extract(_ds(**{field: "A" * limit}), "t1")
    assert isinstance(ok, Extracted)
    bad = extract(_ds(**{field: "A" * (limit + 1)}), "t1")
    assert isinstance(bad, ExtractionError)
    assert (bad.code, bad.field) == (Code.VALUE_TOO_LONG, field)


def test_bounds_count_bytes_not_characters() -> None:
    # 22 three-byte characters = 66 bytes: over VARCHAR(64) in Doris, as in the seeds' Rust str::len.
    bad = extract(_ds(PatientName="\u5c71" * 22), "t1")
    assert isinstance(bad, ExtractionError) and bad.field == "PatientName"


@pytest.mark.parametrize(("raw", "want"), [("07", time(7)), ("0730", time(7, 30)), ("073015", time(7, 30, 15)),
                                           ("073015.5", time(7, 30, 15, 500000)),
                                           ("073015.123456", time(7, 30, 15, 123456)),
                                           ("07:30:15", time(7, 30, 15))])
def test_partial_times(raw: str, want: time) -> None:
    result = extract(_ds(StudyTime=raw, SeriesTime=raw, PatientBirthTime=raw, ContentTime=raw), "t1")
    assert isinstance(result, Extracted)
    assert result.state.study_time == result.state.series_time == want
    assert result.state.patient_birth_time == result.image.content_time == want


@pytest.mark.parametrize("field", ["StudyTime", "SeriesTime", "PatientBirthTime", "ContentTime"])
def test_bad_time_rejects(field: str) -> None:
    result = extract(_ds(**{field: "2561"}), "t1")
    assert isinstance(result, ExtractionError)
    assert (result.code, result.field) == (Code.INVALID_TIME, field)


def test_bad_optional_date_is_null() -> None:
    result = extract(_ds(SeriesDate="20241341", PatientBirthDate="x"), "t1")
    assert isinstance(result, Extracted)
    assert result.state.series_date is None and result.state.patient_birth_date is None


@pytest.mark.parametrize(("value", "fallback"), [(None, True), ("", True), ("A" * 16, False), ("A" * 17, True)])
def test_accession_rules(value: str | None, fallback: bool) -> None:
    result = extract(_ds(AccessionNumber=value), "tenant-x")
    assert isinstance(result, Extracted)
    want = accession_fallback("tenant-x", "1.2.3") if fallback else value
    assert result.state.accession_number == want


def test_transfer_syntax_defaults_to_implicit_le() -> None:
    ds = _ds()
    del ds.file_meta.TransferSyntaxUID
    result = extract(ds, "t1")
    assert isinstance(result, Extracted)
    assert result.image.transfer_syntax_uid == "1.2.840.10008.1.2"


def test_non_ascii_person_name(tmp_path: Path) -> None:
    ds = _ds(PatientName="M\u00fcller^J\u00fcrgen", StudyDescription="\u80f8\u90e8CT")
    path = tmp_path / "utf8.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = extract(path, "t1")
    assert isinstance(result, Extracted)
    assert result.state.patient_name == "M\u00fcller^J\u00fcrgen"
    assert result.state.study_description == "\u80f8\u90e8CT"


def test_latin1_charset_from_bundled_file() -> None:
    # CT_small declares ISO_IR 100; decoding must honour it, not assume ASCII
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    ds.PatientName = "Fran\u00e7ois^\u00c9lise"
    result = extract(ds, "t1")
    assert isinstance(result, Extracted) and result.state.patient_name == "Fran\u00e7ois^\u00c9lise"


def test_pixel_data_never_read(tmp_path: Path, ct_small: Path) -> None:
    # A file whose pixel data is cut off mid-element still extracts: we stop before pixels.
    data = ct_small.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 20000])
    assert isinstance(extract(cut, "t1"), Extracted)


def test_not_dicom_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a DICOM file")
    r1 = extract(text, "t1")
    assert isinstance(r1, ExtractionError) and r1.code == Code.NOT_DICOM
    r2 = extract(tmp_path / "absent.dcm", "t1")
    assert isinstance(r2, Exception) and r2.code == Code.FILE_MISSING  # type: ignore[attr-defined]


def test_uids_are_distinct_per_clone() -> None:
    a = extract(_ds(SeriesInstanceUID=generate_uid()), "t1")
    b = extract(_ds(SeriesInstanceUID=generate_uid()), "t1")
    assert isinstance(a, Extracted) and isinstance(b, Extracted)
    assert a.state.series_uid_hash != b.state.series_uid_hash


@pytest.mark.parametrize("cut", [132, 200, 800, 1200, 2000])
def test_truncated_header_is_named(tmp_path: Path, ct_small: Path, cut: int) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(ct_small.read_bytes()[:cut])
    result = extract(path, "t1")
    assert isinstance(result, ExtractionError)
    assert (result.code, result.field) == (Code.FILE_TRUNCATED, "file_path")
