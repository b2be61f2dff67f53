"""Fuzz targets and mutators shared by the bounded CI suite and the long-run script.

Four inputs come from outside the node and are fuzzed here (issue 12, "Fuzzing in the
project"):

* ``parse``: the C-STORE parsing path, :func:`node.listener.parsing.checked_index_fields`
  on the received data set bytes (Explicit VR LE, Implicit VR LE, Deflated), followed by
  the handler's UID checks (node/listener/handlers.py steps 2-3);
* ``seg``: SEG reading, :func:`pipelines.dicom.seg.read_segments` on a file, then every
  segment's mask;
* ``suv``: SUV header handling, :func:`pipelines.dicom.suv.compute_suv` and
  :func:`~pipelines.dicom.suv.suv_or_fallback` on the headers of a PET series;
* ``sr``: the SR reader, :func:`pipelines.sr.reader.read_measurement_report`.

Every target checks its **contract**, not just "no crash": it returns a status label (the
DICOM status the listener would answer, or the defined error code) or raises
:class:`ContractViolation` when the result breaks a stated property; any other exception
is a crash.  Seeds are real objects: the demo study (node/demo_study), the public data in
``../shared/data`` and a Locus SR built from the demo study.

Mutations are plain data (lists of tuples) so hypothesis can shrink them and the
long-run script can draw the same kinds with :mod:`random`:

* byte operations on the encoded object (flip, set, insert, delete, truncate, overwrite
  a 16/32-bit field with a boundary value), biased to the bytes before Pixel Data;
* structural operations on the decoded data set: delete an element, replace its value
  with raw bytes from a pool of hostile values (kept raw, as a received file would be),
  empty a sequence, drop or duplicate an item.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.listener.handlers import file_meta_bytes
from node.listener.parsing import IndexFields, MalformedDataSet, checked_index_fields, index_fields
from node.storage import is_valid_uid
from pipelines.errors import LocusError

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LOCUS_TEST_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py
DEMO = REPO / "node" / "demo_study"

#: Boundary values for 16/32-bit length and count fields.
BOUNDARY_U32 = (0, 1, 2, 3, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
BOUNDARY_U16 = (0, 1, 2, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
#: Hostile element values (raw bytes, as a sender could put them on the wire).
HOSTILE = (
    b"", b" ", b"\x00", b"0", b"-1", b"1e309", b"-1e309", b"nan", b"NaN ", b"inf", b"abc ", b"1\\2\\3",
    b"99999999999999999", b"0.000000000001", b"20250230", b"99991399", b"19000101", b"246000", b"2400",
    b"12:00:00", b"120000.999999", b"20250101240000", b"20250101120000+9999", b"BQML", b"CNTS", b"GML",
    b"CM2ML", b"START", b"ADMIN", b"NONE", b"PT", b"CT", b"SEG", b"SR", b"1.2.3", b"1.2.840.10008.5.1.4.1.1.66.4",
    b"\xff\xfe\x00\x01", b"\\\\\\", b"ATTN\\DECY", b"M ", b"F ", b"O ", b"LABELMAP", b"FRACTIONAL", b"BINARY",
    b"\x00" * 8, b"\xff" * 8, b"A" * 70,
)

Ops = list[tuple[Any, ...]]


class ContractViolation(AssertionError):
    """A target returned or raised something its contract does not allow."""


@dataclass(frozen=True)
class Seed:
    """A real object the mutators start from."""

    name: str
    data: bytes  # Part 10 file bytes
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str


# ---------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------
def _seed(path: Path, name: str | None = None) -> Seed:
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return Seed(name or path.name, data, str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID),
                str(ds.SOPInstanceUID))


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _first(folder: Path, n: int = 1) -> list[Path]:
    return sorted(p for p in folder.glob("*.dcm"))[:n]


@cache
def parse_seeds() -> tuple[Seed, ...]:
    """Objects a modality sends: CT, PET, SEG (demo study and public data)."""
    paths = [*_first(DEMO / "CT"), *_first(DEMO / "PT"), *_first(DEMO / "SEG"),
             DATA / "seg-sr-highdicom-smallct" / "seg" / "seg_image_ct_binary_overlap.dcm",
             *_first(DATA / "suv-dro" / "DRO" / "DRO_3_3" / "PT")]
    return tuple(_seed(p) for p in paths)


@cache
def seg_seeds() -> tuple[Seed, ...]:
    folder = DATA / "seg-sr-highdicom-smallct" / "seg"
    paths = [*_first(DEMO / "SEG"), *(folder / n for n in (
        "seg_image_ct_binary.dcm", "seg_image_ct_binary_overlap.dcm", "seg_image_ct_true_fractional.dcm",
        "seg_image_ct_binary_single_frame.dcm")),
        DATA / "seg-ct-liver3slice-multivendor" / "seg" / "dcmqi_liver.dcm"]
    return tuple(_seed(p) for p in paths)


@cache
def suv_seeds() -> tuple[tuple[Dataset, ...], ...]:
    """PET series headers (2 slices each): DRO edge cases, the GE FDG PET, the demo PET."""
    series: list[list[Path]] = []
    for case in ("DRO_0_0", "DRO_2_3", "DRO_2_4", "DRO_2_5", "DRO_3_3", "DRO_3_4", "DRO_4_1", "DRO_4_2"):
        series.append(_first(DATA / "suv-dro" / "DRO" / case / "PT", 2))
    series.append(sorted((DATA / "pet-ge-sts001" / "raw_pet").glob("*.dcm"))[100:102])
    series.append(_first(DEMO / "PT", 2))
    return tuple(tuple(pydicom.dcmread(p, stop_before_pixels=True) for p in s) for s in series)


@cache
def sr_seeds() -> tuple[Seed, ...]:
    """A Locus SR (demo study, Bq/ml fallback flags included) and other producers' SRs."""
    from pipelines.analysis import analyse_study

    result = analyse_study([DEMO])
    assert result.sr_dataset is not None
    locus = _to_bytes(result.sr_dataset)
    sop = str(result.sr_dataset.SOPInstanceUID)
    others = [_seed(DATA / "seg-sr-highdicom-smallct" / "sr" / n) for n in
              ("sr_document.dcm", "sr_document_with_multiple_groups.dcm")]
    others.append(_seed(DATA / "sr-samples" / "dcmtk_dscope" / "test-SR.dcm"))
    return (Seed("locus_demo_sr", locus, ExplicitVRLittleEndian, str(result.sr_dataset.SOPClassUID), sop),
            *others)


# ---------------------------------------------------------------------------------------
# Mutators
# ---------------------------------------------------------------------------------------
def _header_end(data: bytes) -> int:
    """Offset of Pixel Data (7FE0,0010) in little-endian bytes, or the length: mutations focus before it."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


def mutate_bytes(data: bytes, ops: Ops) -> bytes:
    """Apply byte operations; positions are taken modulo the focused region (see module doc)."""
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        kind, where = op[0], op[1]
        end = _header_end(bytes(buf)) if op[-1] == "head" else len(buf)
        pos = where % max(end, 1)
        if kind == "flip":
            buf[pos] ^= 1 << (op[2] % 8)
        elif kind == "set":
            buf[pos] = op[2] % 256
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos:pos + op[2]]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "u16":
            buf[pos:pos + 2] = struct.pack("<H", op[2] & 0xFFFF)
        elif kind == "u32":
            buf[pos:pos + 4] = struct.pack("<L", op[2] & 0xFFFFFFFF)
        else:
            raise ValueError(f"unknown byte op {kind}")
    return bytes(buf)


def _paths(ds: Dataset, prefix: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    """Element paths (tag, item index, tag, ...) of ``ds``: three items per sequence, depth 8."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)  # not converted: an earlier mutation may have left an undecodable value
        path = (*prefix, int(tag))
        yield path
        if raw is not None and raw.VR == "SQ" and depth < 8:
            try:
                items = ds[tag].value or []
            except Exception:  # a mutated sequence that no longer parses: leave it as it is
                continue
            for i, item in enumerate(items[:3]):
                yield from _paths(item, (*path, i), depth + 1)


def element_paths(ds: Dataset) -> list[tuple[Any, ...]]:
    return list(_paths(ds))


def _resolve(ds: Dataset, path: tuple[Any, ...]) -> tuple[Dataset, BaseTag] | None:
    node = ds
    for step in range(0, len(path) - 1, 2):
        tag, index = path[step], path[step + 1]
        if tag not in node:
            return None
        seq = node[tag].value
        if not isinstance(seq, (list, DicomSequence)) or index >= len(seq):
            return None
        node = seq[index]
    return node, Tag(path[-1])


def mutate_dataset(ds: Dataset, ops: Ops, focus: frozenset[int] = frozenset()) -> Dataset:
    """Apply structural operations (a copy). ``ops``: (action, path index, value index).

    With ``focus``, only elements with those tags (at any depth) are mutated.
    """
    ds = copy.deepcopy(ds)
    for action, which, value in ops:
        paths = element_paths(ds)
        if focus:
            paths = [p for p in paths if p[-1] in focus]
        if not paths:
            break
        target = _resolve(ds, paths[which % len(paths)])
        if target is None:
            continue
        parent, tag = target
        if tag not in parent:
            continue
        elem = parent.get_item(tag)
        if action == "delete":
            del parent[tag]
        elif action == "raw" and elem.VR != "SQ":
            raw = HOSTILE[value % len(HOSTILE)]
            vr = str(elem.VR) if elem.VR in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                                              "TM", "UI", "UT", "US", "SS", "UL", "SL", "FL", "FD", "OB", "OW",
                                              "UN", "UC", "UR", "AT") else "UN"
            parent[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        elif action == "raw" and elem.VR == "SQ":
            parent[tag].value = []
        elif action in ("drop_item", "dup_item") and elem.VR == "SQ":
            items = parent[tag].value
            if not items:
                continue
            if action == "drop_item":
                del items[value % len(items)]
            else:
                items.append(copy.deepcopy(items[value % len(items)]))
    return ds


def reencode(ds: Dataset) -> bytes | None:
    """Encode as a received file would be; None when pydicom itself cannot write the mutant."""
    try:
        return _to_bytes(ds)
    except Exception:  # the mutant is not encodable at all: not an input the node can receive
        return None


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------
_STATUS_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_code(exc: LocusError) -> str:
    if not _STATUS_RE.match(exc.code or "") or not exc.reason:
        raise ContractViolation(f"{type(exc).__name__} without a snake_case code and a reason: {exc.code!r}")
    return exc.code


def _dataset_bytes(part10: bytes) -> tuple[bytes, str] | None:
    """Data set bytes after the File Meta group, and the transfer syntax; None if no usable meta."""
    if len(part10) < 144 or part10[128:132] != b"DICM":
        return None
    (meta_len,) = struct.unpack_from("<L", part10, 140)
    start = 144 + meta_len
    try:
        meta = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True).file_meta
        return part10[start:], str(meta.TransferSyntaxUID)
    except Exception:
        return None


@cache
def parse_inputs() -> tuple[tuple[Seed, str, bytes], ...]:
    """(seed, transfer syntax, data set bytes) for every seed in three encodings."""
    out: list[tuple[Seed, str, bytes]] = []
    for seed in parse_seeds():
        got = _dataset_bytes(seed.data)
        assert got is not None, seed.name
        raw, ts = got
        if ts != ExplicitVRLittleEndian:
            continue
        out.append((seed, ExplicitVRLittleEndian, raw))
        ds = pydicom.dcmread(io.BytesIO(seed.data))
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=True)
        implicit = buf.getvalue()
        out.append((seed, ImplicitVRLittleEndian, implicit[_meta_end(implicit):]))
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out.append((seed, DeflatedExplicitVRLittleEndian, comp.compress(raw) + comp.flush()))
    return tuple(out)


def _meta_end(data: bytes) -> int:
    """Where a written object's data set starts (after preamble and File Meta, if any)."""
    if data[128:132] == b"DICM":
        (meta_len,) = struct.unpack_from("<L", data, 140)
        return 144 + meta_len
    return 0


def parse_target(input_index: int, ops: Ops) -> str:
    """C-STORE parse path: the status the listener would answer for a mutated data set.

    Contract: :class:`MalformedDataSet` (0xC210) or :class:`IndexFields` with the declared
    types; a data set whose UIDs are not valid answers 0xC213, a SOP Instance or Class
    that differs from the command's 0xC212 / 0xA900 (handlers.py steps 2-3).
    """
    inputs = parse_inputs()
    seed, ts, raw = inputs[input_index % len(inputs)]
    mutated = mutate_bytes(raw, ops)
    file_bytes = file_meta_bytes(seed.sop_class_uid, seed.sop_instance_uid, ts) + mutated
    try:
        fields = checked_index_fields(mutated, ts, file_bytes)
    except MalformedDataSet as exc:
        if not str(exc):
            raise ContractViolation("MalformedDataSet without a reason") from exc
        return "0xC210 malformed_dataset"
    if not isinstance(fields, IndexFields):
        raise ContractViolation(f"checked_index_fields returned {type(fields).__name__}")
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality"):
        if not isinstance(getattr(fields, name), str):
            raise ContractViolation(f"{name} is {type(getattr(fields, name)).__name__}, not str")
    if fields.frame_of_reference_uid is not None and not isinstance(fields.frame_of_reference_uid, str):
        raise ContractViolation("frame_of_reference_uid is not str or None")
    if fields.number_of_slices is not None and not 0 <= fields.number_of_slices <= 0xFFFF:
        raise ContractViolation(f"number_of_slices {fields.number_of_slices} is not a US value")
    if fields.instance_number is not None and not isinstance(fields.instance_number, int):
        raise ContractViolation("instance_number is not int or None")
    if not all(isinstance(s, str) and isinstance(u, str) for s, u in fields.referenced_instances):
        raise ContractViolation("referenced_instances are not (str, str) pairs")
    if not all(is_valid_uid(u) for u in (fields.sop_uid, fields.sop_class_uid, fields.study_uid,
                                         fields.series_uid)):
        return "0xC213 invalid_uid"
    if fields.sop_uid != seed.sop_instance_uid:
        return "0xC212 sop_instance_mismatch"
    if fields.sop_class_uid != seed.sop_class_uid:
        return "0xA900 sop_class_mismatch"
    # Oracle: what the fast path indexes, pydicom reads the same (parsing.py promises the
    # results of index_fields); the analysis later reads these files with pydicom.
    try:
        reference = index_fields(file_bytes)
    except MalformedDataSet:
        # Stored and indexed, but pydicom cannot decode it (e.g. a NUL inside Specific
        # Character Set): the analysis later ignores the file with reason not_dicom.
        # An open finding of the listener (issue 12 fuzz figures), counted apart.
        return "0x0000 indexed_unreadable_by_pydicom"
    # The handler checks only the four UIDs above: a Frame of Reference UID that is not a
    # UID, or a Modality outside the default repertoire, is stored and indexed as the fast
    # path decoded it (non-ASCII bytes become U+FFFD; pydicom reads Latin-1). Counted apart
    # so the figures show it; every other field must agree with pydicom.
    invalid = [name for name, ok in (
        ("frame_of_reference_uid", fields.frame_of_reference_uid is None or is_valid_uid(fields.frame_of_reference_uid)),
        ("modality", fields.modality.isascii() and fields.modality.isprintable()),
    ) if not ok]
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality", "frame_of_reference_uid",
                 "number_of_slices", "instance_number"):
        if name not in invalid and getattr(fields, name) != getattr(reference, name):
            raise ContractViolation(f"{name}: fast path {getattr(fields, name)!r}, pydicom {getattr(reference, name)!r}")
    return f"0x0000 indexed_invalid_{invalid[0]}" if invalid else "0x0000 indexed"


def _mutant_file(seeds: Sequence[Seed], seed_index: int, mode: str, ops: Ops) -> bytes | None:
    seed = seeds[seed_index % len(seeds)]
    if mode == "bytes":
        return mutate_bytes(seed.data, ops)
    return reencode(mutate_dataset(pydicom.dcmread(io.BytesIO(seed.data)), ops))


def seg_target(seed_index: int, mode: str, ops: Ops) -> str:
    """SEG reading: a :class:`SegObject` whose masks decode, or a coded :class:`LocusError`.

    Contract: read_segments raises only LocusError subclasses (the analysis records their
    code as the study's reason); every segment's mask is 3-D boolean on the SEG's grid,
    with a finite affine, or the segment's error is a LocusError too.
    """
    from pipelines.dicom.seg import read_segments

    data = _mutant_file(seg_seeds(), seed_index, mode, ops)
    if data is None:
        return "unencodable_mutant"
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        try:
            seg = read_segments(f.name)
            regions = seg.source_regions(None, "segments")
        except LocusError as exc:
            return _check_code(exc)
    if [r.segment_number for r in regions] != list(seg.segment_numbers):
        raise ContractViolation("source_regions does not return one region per segment")
    for r in regions:
        n = r.segment_number
        if r.mask.ndim != 3 or r.mask.dtype != bool:
            raise ContractViolation(f"segment {n}: mask {r.mask.shape} {r.mask.dtype}")
        if r.mask.size and not all(o >= 0 and o + m <= g for o, m, g in zip(r.offset, r.mask.shape,
                                                                          r.grid_shape, strict=True)):
            raise ContractViolation(f"segment {n}: mask {r.mask.shape} at {r.offset} outside grid {r.grid_shape}")
        if not all(math.isfinite(float(v)) for v in r.affine.ravel()):
            raise ContractViolation(f"segment {n}: non-finite affine")
    return "read"


#: What SUV header handling reads (PS3.3 C.8.9.1, C.8.9.2, C.7.6.1, the vendors' private
#: factors and scan time): the SUV target mutates these only, so cases are not wasted on
#: attributes SUV never looks at.
SUV_FOCUS = frozenset(int(Tag(k)) for k in (
    "Units", "DecayCorrection", "SUVType", "PatientSex", "PatientWeight", "PatientSize", "CorrectedImage",
    "Modality", "SOPInstanceUID", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime", "FrameReferenceTime", "ActualFrameDuration", "Manufacturer", "NumberOfFrames",
    "RadiopharmaceuticalInformationSequence", "RadionuclideTotalDose", "RadionuclideHalfLife",
    "RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime",
)) | {0x7053_0010, 0x7053_1000, 0x7053_1009, 0x0009_0010, 0x0009_100D}


def suv_target(series_index: int, ops: Ops, one_slice: bool) -> str:
    """SUV header handling on a mutated PET series (headers written and read back).

    Contract: compute_suv gives finite, positive factors for every slice or raises
    SuvError with a code; suv_or_fallback then gives either that SUV or Bq/ml flagged
    ``suv_fallback_bqml`` first, or raises SuvError (no quantity at all).
    """
    from pipelines.dicom.suv import UNITS, compute_suv, suv_or_fallback
    from pipelines.errors import SuvError
    from pipelines.findings import SuvKind

    seeds = suv_seeds()
    series = seeds[series_index % len(seeds)]
    headers: list[Dataset] = []
    for i, ds in enumerate(series):
        mutant = mutate_dataset(ds, ops, SUV_FOCUS) if (i == 0 or not one_slice) else copy.deepcopy(ds)
        data = reencode(mutant)
        if data is None:
            return "unencodable_mutant"
        headers.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))

    def check(conv: Any, kind: SuvKind) -> None:
        if conv.info.kind is not kind or conv.info.unit != UNITS[kind]:
            raise ContractViolation(f"kind {conv.info.kind} unit {conv.info.unit} for {kind}")
        keys = {(str(h.get("SOPInstanceUID", "") or ""), None) for h in headers}
        if not conv.factors or not all(
            isinstance(v, float) and math.isfinite(v) and v > 0 for v in conv.factors.values()
        ):
            raise ContractViolation(f"factors not finite and positive: {dict(conv.factors)}")
        if not keys <= set(conv.factors) and not any(
            "PerFrameFunctionalGroupsSequence" in h or "SharedFunctionalGroupsSequence" in h for h in headers
        ):
            raise ContractViolation("a slice has no factor")
        if kind is not SuvKind.BQML and not (conv.info.scale_factor and math.isfinite(conv.info.scale_factor)):
            raise ContractViolation(f"SUV scale factor {conv.info.scale_factor}")

    try:
        suv = compute_suv(headers)
        check(suv, SuvKind.SUV_BW)
        status = "suv"
    except SuvError as exc:
        status = f"suv_refused:{_check_code(exc)}"
    try:
        conv = suv_or_fallback(headers)
    except SuvError as exc:
        if status == "suv":
            raise ContractViolation("suv_or_fallback refused what compute_suv accepted") from exc
        return f"no_quantity:{_check_code(exc)}"
    if status == "suv":
        check(conv, SuvKind.SUV_BW)
        return status
    check(conv, SuvKind.BQML)
    if not conv.info.flags or conv.info.flags[0].code != "suv_fallback_bqml":
        raise ContractViolation("Bq/ml without the suv_fallback_bqml flag first")
    return "bqml_fallback"


def sr_target(seed_index: int, mode: str, ops: Ops) -> str:
    """SR reader: a ReadReport, or NotAMeasurementReport / ReportError with a code.

    Contract: only ReportError subclasses escape; a report read has lesions whose
    measurement values are numbers and units coded, and tuples where tuples are declared.
    """
    from pipelines.sr.reader import ReadReport, read_measurement_report

    data = _mutant_file(sr_seeds(), seed_index, mode, ops)
    if data is None:
        return "unencodable_mutant"
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(data)
        f.flush()
        try:
            report = read_measurement_report(f.name)
        except LocusError as exc:
            return _check_code(exc)
    if not isinstance(report, ReadReport) or not isinstance(report.lesions, tuple):
        raise ContractViolation(f"read_measurement_report returned {type(report).__name__}")
    for lesion in report.lesions:
        for m in lesion.measurements:
            if not isinstance(m.value, (int, float)) or m.unit is None:
                raise ContractViolation(f"lesion {lesion.tracking_uid}: measurement {m!r}")
    if not isinstance(report.notes, tuple):
        raise ContractViolation("notes are not a tuple")
    return "read"


TARGETS: dict[str, Callable[..., str]] = {
    "parse": parse_target, "seg": seg_target, "suv": suv_target, "sr": sr_target,
}
