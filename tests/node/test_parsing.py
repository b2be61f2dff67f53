"""The listener's one-walk index parsing agrees with pydicom on every shared test file.

``checked_index_fields`` (the C-STORE fast path) reads the indexed attributes from the
raw top-level element values; ``index_fields`` reads them with pydicom. Both must give
the same result for every DICOM file in ../shared/data, in every transfer syntax the
file can be re-encoded to without a codec, and both must refuse a truncated stream.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from node.listener.handlers import file_meta_bytes
from node.listener.parsing import MalformedDataSet, checked_index_fields, index_fields
from tests.conftest import DATA_DIR


def _dicom_files() -> list[Path]:
    files = []
    for path in sorted(DATA_DIR.rglob("*")):
        if path.is_file() and path.suffix.lower() not in {".md", ".json", ".txt", ".csv", ".gz", ".docx", ".py"}:
            try:
                pydicom.filereader.read_file_meta_info(path)
            except Exception:
                continue
            files.append(path)
    return files


FILES = _dicom_files()


def _after_meta(data: bytes) -> int:
    """Offset of the data set: after preamble, "DICM" and the group 0002 elements, which
    are Explicit VR Little Endian (PS3.10 §7.1); some files omit the group length."""
    pos = 132
    while int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return pos


def _split(path: Path) -> tuple[bytes, bytes, str, str, str]:
    """(file bytes as the listener writes them, data set bytes, TS, SOP class, SOP instance)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    data = path.read_bytes()
    raw = data[_after_meta(data) :]
    ts = str(meta.TransferSyntaxUID)
    sop_class, sop = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    return file_meta_bytes(sop_class, sop, ts) + raw, raw, ts, sop_class, sop


def test_the_shared_data_has_files_to_compare() -> None:
    assert len(FILES) > 100


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(DATA_DIR)))
def test_fast_fields_equal_pydicom_fields(path: Path) -> None:
    file_bytes, raw, ts, _, _ = _split(path)
    assert checked_index_fields(raw, ts, file_bytes) == index_fields(file_bytes)


def _reencoded(path: Path, ts: str) -> tuple[bytes, bytes]:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        pytest.skip("compressed pixel data cannot be re-encoded without a codec")
    ds.file_meta.TransferSyntaxUID = ts
    sop_class, sop = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if ts == ExplicitVRBigEndian:  # the data set alone, re-encoded big endian
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = False, False
        write_dataset(fp, ds)
        raw = fp.getvalue()
        return file_meta_bytes(sop_class, sop, ts) + raw, raw
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)  # deflates for the Deflated syntax
    written = buffer.getvalue()
    raw = written[_after_meta(written) :]
    return file_meta_bytes(sop_class, sop, ts) + raw, raw


# One PET (Number of Slices, US: byte order matters), one CT, one SEG.
SAMPLES = [p for p in FILES if "pet-ge-sts001/mirp_suv_pet" in str(p)][:1] + [
    p for p in FILES if "seg-ct-liver3slice-multivendor/ct" in str(p)
][:1] + [p for p in FILES if p.name == "dcmqi_liver.dcm"]


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_fast_fields_equal_pydicom_fields_in_other_encodings(path: Path, ts: str) -> None:
    file_bytes, raw = _reencoded(path, ts)
    fast = checked_index_fields(raw, ts, file_bytes)
    assert fast == index_fields(file_bytes)
    if "pet" in str(path):
        assert fast.number_of_slices and fast.number_of_slices > 1


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_truncated_streams_are_refused(path: Path) -> None:
    file_bytes, raw, ts, _, _ = _split(path)
    with pytest.raises(MalformedDataSet):
        checked_index_fields(raw[: len(raw) // 2], ts, file_bytes[: len(file_bytes) - len(raw) // 2])


def _explicit_le(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    """Explicit VR Little Endian data set from (tag, VR, value) with short-length VRs (PS3.5 §7.1.2)."""
    out = b""
    for tag, vr, value in elements:
        value += b"\0" if vr == b"UI" and len(value) % 2 else b" " * (len(value) % 2)
        out += (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr
        out += len(value).to_bytes(2, "little") + value
    return out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"100\xa0", 100),  # NO-BREAK SPACE (ISO 8859-1), found by the fuzz long run (seed 12, case 62624)
        (b" 7 ", 7),
        (b"1.0 ", 1),
        (b"1e2 ", 100),
        (b"1.5 ", 1),  # pydicom: ISfloat(1.5), int() of it
        (b"12\\3", None),  # several values: not an instance number
        (b"abc ", None),
        (b"nan ", None),
        (b"  ", None),
    ],
)
def test_fast_instance_number_reads_an_is_value_as_pydicom_does(value: bytes, expected: int | None) -> None:
    """Instance Number (IS, PS3.5 Table 6.2-1) outside the IS repertoire: the fast path
    indexes what pydicom (and so the analysis) reads, not None."""
    ct, sop = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    raw = _explicit_le([
        (0x00080016, b"UI", ct.encode()), (0x00080018, b"UI", sop.encode()), (0x00080060, b"CS", b"CT"),
        (0x0020000D, b"UI", b"1.2.3"), (0x0020000E, b"UI", b"1.2.3.4"), (0x00200013, b"IS", value),
    ])
    file_bytes = file_meta_bytes(ct, sop, "1.2.840.10008.1.2.1") + raw
    fast = checked_index_fields(raw, "1.2.840.10008.1.2.1", file_bytes)
    assert fast.instance_number == expected
    if value != b"nan ":  # pydicom cannot read a NaN IS at all (index_fields refuses it)
        assert fast == index_fields(file_bytes)
