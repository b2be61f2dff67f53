"""Bounded property-based fuzz suite (issue 12): the C-STORE parse path, SEG reading,
SUV header handling and the SR reader, each against its contract (tests/fuzz/targets.py).

Fixed seed (``derandomize=True``, no example database), about 3,000 cases in all, well
under 60 s on one core; the long run (100,000 cases) is ``python -m tests.fuzz.long_run``
and its figures are in the README.  The regression tests at the end are the crashes the
fuzzer found, each reduced to the smallest input that showed it.
"""

from __future__ import annotations

import copy
import io
import logging
import struct
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pipelines.dicom.seg import read_segments
from pipelines.dicom.suv import compute_suv, suv_or_fallback
from pipelines.errors import ReportError, SegmentationError, SuvError
from pipelines.sr.reader import read_measurement_report
from tests.fuzz import targets as T

pytestmark = [
    pytest.mark.fuzz,
    # mutants are full of values pydicom warns about on access; the contract is what is checked
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def bounded(n: int) -> settings:
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


POS = st.integers(0, 1 << 24)
FOCUS = st.sampled_from(["head", "head", "head", "all"])
BYTE_OP = st.one_of(
    st.tuples(st.sampled_from(["flip", "set"]), POS, st.integers(0, 255), FOCUS),
    st.tuples(st.just("u16"), POS, st.sampled_from(T.BOUNDARY_U16) | st.integers(0, 0xFFFF), FOCUS),
    st.tuples(st.just("u32"), POS, st.sampled_from(T.BOUNDARY_U32) | st.integers(0, 0xFFFFFFFF), FOCUS),
    st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=12) | st.sampled_from(
        [b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"SQ\x00\x00\xff\xff\xff\xff"]),
        FOCUS),
    st.tuples(st.just("delete"), POS, st.integers(1, 16), FOCUS),
    st.tuples(st.just("truncate"), POS, st.just(0), FOCUS),
)
BYTE_OPS = st.lists(BYTE_OP, min_size=1, max_size=4)
STRUCT_OPS = st.lists(
    st.tuples(st.sampled_from(["delete", "raw", "raw", "drop_item", "dup_item"]), st.integers(0, 1 << 16),
              st.integers(0, 255)),
    min_size=1, max_size=4,
)
SEED = st.integers(0, 1 << 16)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals are logged at WARNING by design; thousands of them are noise here."""
    caplog.set_level(logging.CRITICAL)


# ---------------------------------------------------------------------------------------
# Properties (each target raises ContractViolation or crashes when the contract breaks)
# ---------------------------------------------------------------------------------------
PARSE_STATUSES = {"0xC210 malformed_dataset", "0xC213 invalid_uid", "0xC212 sop_instance_mismatch",
                  "0xA900 sop_class_mismatch", "0x0000 indexed", "0x0000 indexed_unreadable_by_pydicom"}


@bounded(2500)
@given(SEED, BYTE_OPS)
def test_cstore_parse_path_answers_a_defined_status(which: int, ops: T.Ops) -> None:
    status = T.parse_target(which, ops)
    assert status in PARSE_STATUSES or status.startswith("0x0000 indexed_invalid_")


@bounded(150)
@given(SEED, st.sampled_from(["bytes", "struct"]), st.data())
def test_seg_reading_gives_masks_or_a_coded_error(which: int, mode: str, data: st.DataObject) -> None:
    ops = data.draw(BYTE_OPS if mode == "bytes" else STRUCT_OPS)
    assert T.seg_target(which, mode, ops)


@bounded(250)
@given(SEED, STRUCT_OPS, st.booleans())
def test_suv_headers_give_finite_factors_or_a_coded_refusal(which: int, ops: T.Ops, one_slice: bool) -> None:
    status = T.suv_target(which, ops, one_slice)
    assert status in ("suv", "bqml_fallback", "unencodable_mutant") or status.startswith(("suv_refused:",
                                                                                            "no_quantity:"))


@bounded(100)
@given(SEED, st.sampled_from(["bytes", "struct"]), st.data())
def test_sr_reader_gives_a_report_or_a_coded_error(which: int, mode: str, data: st.DataObject) -> None:
    ops = data.draw(BYTE_OPS if mode == "bytes" else STRUCT_OPS)
    assert T.sr_target(which, mode, ops)


def test_unmutated_seeds_pass() -> None:
    """The seeds themselves are valid: every failure above is caused by a mutation."""
    assert {T.parse_target(i, []) for i in range(len(T.parse_inputs()))} == {"0x0000 indexed"}
    assert {T.seg_target(i, "struct", []) for i in range(len(T.seg_seeds()))} == {"read"}
    assert {T.suv_target(i, [], False) for i in range(len(T.suv_seeds()))} == {"suv"}
    assert [T.sr_target(i, "struct", []) for i in range(len(T.sr_seeds()))] == [
        "read", "read", "read", "sr_not_measurement_report"]  # the DICOMscope SR is not TID 1500


def test_long_run_script_counts_and_replays(tmp_path: Path) -> None:
    """The long-run script on a few cases: every case is counted under one outcome."""
    from tests.fuzz import long_run

    summary = long_run.run(40, seed=3, weights={"parse": 1, "suv": 1}, hang_s=30, out=tmp_path)
    got = summary["targets"]
    assert sum(s["cases"] for s in got.values()) == 40
    for s in got.values():
        assert sum(s["statuses"].values()) + s["crashes"] + s["contract_violations"] + s["hangs"] == s["cases"]
    assert "| parse |" in long_run.markdown(summary)
    assert (tmp_path / "summary.json").is_file()


# ---------------------------------------------------------------------------------------
# Regressions: crashes the fuzzer found (each failed before its fix)
# ---------------------------------------------------------------------------------------
def _replace_first(data: bytes, old: bytes, new: bytes) -> bytes:
    at = data.index(old)
    return data[:at] + new + data[at + len(old):]


def test_regression_sr_with_an_unknown_vr_is_a_coded_error(tmp_path: Path) -> None:
    """A byte flip turned a content item's VR into 'ON': pydicom raised NotImplementedError
    on access, which escaped read_measurement_report."""
    seed = T.sr_seeds()[1]
    relationship = struct.pack("<HH", 0x0040, 0xA010) + b"CS"  # Relationship Type, Explicit VR LE
    path = tmp_path / "sr.dcm"
    path.write_bytes(_replace_first(seed.data, relationship, relationship[:4] + b"ON"))
    with pytest.raises(ReportError) as err:
        read_measurement_report(path)
    assert err.value.code == "sr_unparseable" and "NotImplementedError" in err.value.reason


REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.json"))


@pytest.mark.parametrize("case", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_found_cases_replay_to_a_defined_outcome(case: Path) -> None:
    """Reproducers the long run wrote, kept as found. A ``crash`` one crashed before its fix
    (the field says how) and now ends in a coded error. A ``contract_violation`` one broke
    the target's contract (the target raises :class:`ContractViolation` again if it does)
    and now ends in the recorded ``outcome``."""
    import json

    from tests.fuzz.long_run import from_json

    found = json.loads(case.read_text())
    status = T.TARGETS[found["target"]](*from_json(found["args"]))
    if "outcome" in found:
        assert status == found["outcome"], (status, found["contract_violation"])
    else:
        assert status in {"seg_malformed", "seg_unreadable", "sr_unparseable", "sr_unreadable"}, (status, found["crash"])


def test_regression_seg_with_a_multivalued_segment_number_is_a_coded_error() -> None:
    """SegmentNumber '1\\2' decoded to a list; int(list) raised TypeError in SegObject."""
    ds = pydicom.dcmread(io.BytesIO(T.seg_seeds()[1].data))
    item = ds.SegmentSequence[0]
    item[Tag("SegmentNumber")] = RawDataElement(Tag("SegmentNumber"), "US", 4, b"\x01\x00\x02\x00", 0, False, True)
    with pytest.raises(SegmentationError) as err:
        read_segments(ds)
    assert err.value.code == "seg_malformed"


def test_regression_seg_with_an_odd_length_us_is_a_coded_error() -> None:
    """A Segment Number (US) of 5 bytes: pydicom raised BytesLengthException on access."""
    ds = pydicom.dcmread(io.BytesIO(T.seg_seeds()[0].data))
    ds.SegmentSequence[0][Tag("SegmentNumber")] = RawDataElement(
        Tag("SegmentNumber"), "US", 5, b"1e309", 0, False, True)
    with pytest.raises(SegmentationError) as err:
        read_segments(ds)
    assert err.value.code == "seg_malformed"


def test_regression_suv_with_an_impossible_date_is_not_a_crash() -> None:
    """AcquisitionDate 20250230: datetime() raised ValueError out of compute_suv. An
    impossible date is unusable like an absent one: the other reference-time rules apply."""
    headers = [pydicom.dcmread(io.BytesIO(T._to_bytes(ds)), stop_before_pixels=True) for ds in T.suv_seeds()[0]]
    for ds in headers:
        ds.AcquisitionDate = "20250230"
    conv = compute_suv(headers)
    assert conv.info.decay_reference == "series_time"  # the series time needs no acquisition time
    assert all(f > 0 for f in conv.factors.values())


def test_regression_suv_with_an_undecodable_value_is_a_coded_refusal() -> None:
    """Units of the wrong VR length and an IS of '1e309': pydicom's lazy conversion raised
    BytesLengthException / OverflowError out of compute_suv and suv_or_fallback."""
    headers = [pydicom.dcmread(io.BytesIO(T._to_bytes(ds)), stop_before_pixels=True) for ds in T.suv_seeds()[0]]
    for ds in headers:
        ds[Tag("Units")] = RawDataElement(Tag("Units"), "US", 5, b"BQML ", 0, False, True)
    with pytest.raises(SuvError) as err:
        suv_or_fallback(headers)
    assert err.value.code == "invalid_pet_header" and "BytesLengthException" in err.value.reason
    headers = [pydicom.dcmread(io.BytesIO(T._to_bytes(ds)), stop_before_pixels=True) for ds in T.suv_seeds()[0]]
    for ds in headers:
        ds[Tag("PatientWeight")] = RawDataElement(Tag("PatientWeight"), "US", 3, b"70 ", 0, False, True)
    with pytest.raises(SuvError) as err:
        compute_suv(headers)
    assert err.value.code == "invalid_pet_header"
    conv = suv_or_fallback(headers)  # Bq/ml does not need the weight: still a quantity
    assert conv.info.kind.value == "Bq/mL" and "invalid_pet_header" in conv.info.flags[0].message


def test_regression_seg_with_a_forged_frame_count_is_refused_at_once() -> None:
    """Number of Frames 19000101 on a 3-frame, 96-byte SEG: highdicom sized its frame
    tables by it (a hang in the long run, seg seed 12 case 3556). Now refused before
    anything is allocated; a count that only disagrees with the pixel data likewise."""
    ds = pydicom.dcmread(io.BytesIO(T.seg_seeds()[1].data))
    forged = copy.deepcopy(ds)
    forged.NumberOfFrames = 19000101
    with pytest.raises(SegmentationError) as err:
        read_segments(forged)
    assert err.value.code == "seg_malformed" and "per-frame items" in err.value.reason
    del ds.PerFrameFunctionalGroupsSequence[1:]
    ds.NumberOfFrames = 1
    ds.PixelData = b""
    with pytest.raises(SegmentationError) as err:
        read_segments(ds)
    assert err.value.code == "seg_malformed" and "Pixel Data holds 0 bytes" in err.value.reason
