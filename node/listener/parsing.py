"""Just enough parsing of a received data set to file and index it.

:func:`checked_index_fields` is the C-STORE fast path (well under a millisecond for a
512×512 CT). In one walk of the element structure (PS3.5 §7.1 data elements, §7.5
nested sequences, §A.4 encapsulated pixel data), without decoding values, it fails if
the stream is truncated or is not a data set at all, and keeps the raw values of the
few top-level attributes the database indexes. pydicom alone cannot do the first part:
``dcmread`` silently returns a shorter data set when the stream is cut, even in the
middle of Pixel Data. :func:`index_fields` reads the same attributes with pydicom
(``stop_before_pixels``); it is used for Segmentation objects, whose referenced source
images sit in nested sequences, and as the reference the fast path is tested against.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import IS

#: Segmentation Storage and Label Map Segmentation Storage (PS3.4 B.5; P6).
SEGMENTATION_SOP_CLASSES: frozenset[str] = frozenset(
    {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}
)

# Explicit VRs with a 2-byte reserved field and a 32-bit length (PS3.5 §7.1.2, Table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_MAX_DEPTH = 32


class MalformedDataSet(ValueError):
    """The received bytes are not a complete DICOM data set."""


@dataclass(frozen=True)
class IndexFields:
    """What the listener needs from a data set to file and index it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str | None
    number_of_slices: int | None
    instance_number: int | None
    referenced_instances: list[tuple[str, str]] = field(default_factory=list)
    # General Equipment (PS3.3 C.7.5.1): how an object made by a Locus node is recognised.
    manufacturer: str = ""
    manufacturer_model_name: str = ""


class _Walker:
    """Element-structure walker over one encoding (little/big endian, explicit/implicit)."""

    def __init__(
        self, data: bytes | memoryview, *, implicit: bool, big_endian: bool, collect: frozenset[int] = frozenset()
    ) -> None:
        self.data = memoryview(data)
        # Top-level elements whose value bytes are kept (``values``) while walking.
        self.collect = collect
        self.values: dict[int, bytes] = {}
        self.end = len(self.data)
        self.implicit = implicit
        e = ">" if big_endian else "<"
        self._tag = struct.Struct(e + "HH")
        self._u16 = struct.Struct(e + "H")
        self._u32 = struct.Struct(e + "L")
        # Item and delimiter tags/lengths: PS3.5 §7.5 says they follow the TS byte order.
        self._item_hdr = struct.Struct(e + "HHL")

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.end:
            raise MalformedDataSet(
                f"data set truncated: {what} at byte {pos} needs {n} bytes, "
                f"{max(self.end - pos, 0)} left"
            )

    def dataset(self, pos: int, stop: int, depth: int, *, implicit: bool | None = None) -> int:
        """Walk elements from ``pos`` to ``stop`` (or to an item delimiter if stop is None)."""
        if depth > _MAX_DEPTH:
            raise MalformedDataSet("sequences nested too deeply")
        implicit = self.implicit if implicit is None else implicit
        last_tag = -1
        while pos < stop:
            self._need(pos, 8, "element header")
            group, elem = self._tag.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            if tag == _ITEM_DELIM:
                return pos + 8
            if group == 0xFFFE:
                raise MalformedDataSet(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}")
            if tag <= last_tag and depth == 0:
                raise MalformedDataSet(
                    f"elements out of order at byte {pos} ({group:04X},{elem:04X}): not a data set"
                )
            last_tag = tag
            if implicit:
                (length,) = self._u32.unpack_from(self.data, pos + 4)
                vr = b""
                pos += 8
            else:
                vr = bytes(self.data[pos + 4 : pos + 6])
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise MalformedDataSet(
                        f"invalid VR {vr!r} for ({group:04X},{elem:04X}) at byte {pos}"
                    )
                if vr in _LONG_VRS:
                    self._need(pos, 12, "element header")
                    (length,) = self._u32.unpack_from(self.data, pos + 8)
                    pos += 12
                else:
                    (length,) = self._u16.unpack_from(self.data, pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                # SQ, encapsulated Pixel Data, or UN holding an undefined-length sequence
                # (which is then encoded Implicit VR Little Endian, PS3.5 §6.2.2).
                inner_implicit = True if vr == b"UN" else implicit
                pos = self.undefined_sequence(pos, depth + 1, inner_implicit)
            else:
                self._need(pos, length, f"value of ({group:04X},{elem:04X})")
                if depth == 0 and tag in self.collect:
                    self.values[tag] = bytes(self.data[pos : pos + length])
                pos += length
        if pos != stop:
            raise MalformedDataSet(f"element overruns its container at byte {pos}")
        return pos

    def undefined_sequence(self, pos: int, depth: int, implicit: bool) -> int:
        """Walk items up to the Sequence Delimitation Item; return the position after it."""
        while True:
            self._need(pos, 8, "item header")
            group, elem, length = self._item_hdr.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise MalformedDataSet(f"expected an item, found ({group:04X},{elem:04X})")
            if length == _UNDEFINED:
                pos = self.item_undefined(pos, depth, implicit)
            else:
                # Defined-length items (sequence items or pixel data fragments) are only
                # bounds-checked: their content is not needed to know where they end.
                self._need(pos, length, "item value")
                pos += length

    def item_undefined(self, pos: int, depth: int, implicit: bool) -> int:
        # No stop position: the nested data set ends at its Item Delimitation Item, and
        # running out of bytes first raises MalformedDataSet.
        return self.dataset(pos, self.end + 1, depth, implicit=implicit)


def _raw_after_meta(raw: bytes, transfer_syntax: str) -> bytes:
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = d.decompress(raw)
        except zlib.error as exc:
            raise MalformedDataSet(f"deflated data set cannot be inflated: {exc}") from exc
        if not d.eof:
            raise MalformedDataSet("deflated data set truncated")
        return out
    return raw


def _walk(raw: bytes, transfer_syntax: str, collect: frozenset[int] = frozenset()) -> _Walker:
    """Raise :class:`MalformedDataSet` unless ``raw`` (no File Meta) is a complete data set.

    Walks top-level and nested elements by length; values are not decoded, only the
    top-level ones in ``collect`` are kept. The stream must end exactly at the end of
    its last element.
    """
    data = _raw_after_meta(raw, transfer_syntax)
    if not data:
        raise MalformedDataSet("empty data set")
    walker = _Walker(
        data,
        implicit=transfer_syntax == ImplicitVRLittleEndian,
        big_endian=transfer_syntax == ExplicitVRBigEndian,
        collect=collect,
    )
    # At top level an Item Delimitation tag cannot occur; walk until the end.
    end = walker.dataset(0, len(data), 0)
    if end != len(data):
        raise MalformedDataSet(f"trailing bytes after the data set at byte {end}")
    return walker


# Top-level attributes indexed for every instance (PS3.6 tags). All are UI, CS or IS
# (default character repertoire, PS3.5 §6.1.2.1, so ASCII) except Number of Slices (US).
_SOP_CLASS, _SOP_INSTANCE, _MODALITY = 0x00080016, 0x00080018, 0x00080060
_STUDY, _SERIES, _INSTANCE_NUMBER, _FRAME_OF_REFERENCE = 0x0020000D, 0x0020000E, 0x00200013, 0x00200052
_NUMBER_OF_SLICES = 0x00540081
_MANUFACTURER, _MODEL_NAME = 0x00080070, 0x00081090  # LO; compared with Locus's own ASCII names
_INDEXED_TAGS = frozenset(
    {
        _SOP_CLASS, _SOP_INSTANCE, _MODALITY, _STUDY, _SERIES, _INSTANCE_NUMBER, _FRAME_OF_REFERENCE,
        _NUMBER_OF_SLICES, _MANUFACTURER, _MODEL_NAME,
    }
)


def _ascii(values: dict[int, bytes], tag: int) -> str:
    # As pydicom reads these VRs: trailing NUL (UI) / space (CS, IS) padding removed.
    return values.get(tag, b"").decode("ascii", "replace").strip("\0 \t\r\n")


def _integer_string(values: dict[int, bytes], tag: int) -> int | None:
    """An IS value (PS3.5 §6.2, Table 6.2-1) read exactly as pydicom reads it.

    The analysis reads the stored file with pydicom, so the index must hold the number
    pydicom sees, also for values outside the IS repertoire ("0"-"9", "+", "-", space):
    pydicom decodes ISO 8859-1 and Python's ``int``/``float`` accept any Unicode
    whitespace (b"100\\xa0", a NO-BREAK SPACE, is 100 to pydicom; found by the fuzz long
    run, tests/fuzz/regressions/parse-seed12-case62624.json), "1.0" and "1e2". Hence
    pydicom's own ``IS`` type, with validation off (the listener does not refuse an
    instance for its Instance Number). Several values, or none, give None, as in
    :func:`index_fields`.
    """
    raw = values.get(tag)
    if raw is None:
        return None
    # pydicom.values.multi_string: padding removed, then split on the backslash (PS3.5 §6.4).
    items = raw.decode("latin-1").rstrip(" \x00").split("\\")
    if len(items) != 1:
        return None
    try:
        value = IS(items[0], validation_mode=config.IGNORE)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):  # not a number (or nan/inf): no instance number
        return None


def checked_index_fields(raw: bytes, transfer_syntax: str, file_bytes: bytes) -> IndexFields:
    """Check the structure and read the indexed attributes in one walk of the data set.

    The C-STORE fast path: the indexed attributes are taken from the top-level element
    values met while checking the structure, instead of a second parse with pydicom
    (a third of the handler's CPU for a 512×512 CT). Segmentations still go through
    :func:`index_fields`, which reads their nested source-image references. Same
    results as :func:`index_fields` (tests/node/test_parsing.py compares them on the
    shared test data).
    """
    walker = _walk(raw, transfer_syntax, _INDEXED_TAGS)
    values = walker.values
    sop_class = _ascii(values, _SOP_CLASS)
    if sop_class in SEGMENTATION_SOP_CLASSES:
        return index_fields(file_bytes)
    slices = values.get(_NUMBER_OF_SLICES, b"")
    return IndexFields(
        study_uid=_ascii(values, _STUDY),
        series_uid=_ascii(values, _SERIES),
        sop_uid=_ascii(values, _SOP_INSTANCE),
        sop_class_uid=sop_class,
        modality=_ascii(values, _MODALITY),
        frame_of_reference_uid=_ascii(values, _FRAME_OF_REFERENCE) or None,
        # US, one value (PS3.3 C.8.9.1); a different length is not a usable count.
        number_of_slices=walker._u16.unpack(slices)[0] if len(slices) == 2 else None,
        instance_number=_integer_string(values, _INSTANCE_NUMBER),
        manufacturer=_ascii(values, _MANUFACTURER),
        manufacturer_model_name=_ascii(values, _MODEL_NAME),
    )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _seg_references(ds: Dataset) -> list[tuple[str, str]]:
    """(series UID, SOP UID) of the images a SEG was derived from.

    Sources (PS3.3 C.8.20 Segmentation IOD): Referenced Series Sequence (0008,1115) in
    the Common Instance Reference module, and Source Image Sequence (0008,2112) inside
    Derivation Image Sequence (0008,9124) in the shared and per-frame functional groups
    (C.7.6.16.2.6). Per-frame sources carry no series UID; it is filled from the
    Referenced Series Sequence when the instance is listed there, else left empty.
    """
    series_of: dict[str, str] = {}
    ordered: dict[str, None] = {}
    for series_item in ds.get("ReferencedSeriesSequence", []) or []:
        series_uid = _text(series_item, "SeriesInstanceUID")
        for inst in series_item.get("ReferencedInstanceSequence", []) or []:
            sop = _text(inst, "ReferencedSOPInstanceUID")
            if sop:
                series_of.setdefault(sop, series_uid)
                ordered.setdefault(sop)
    groups = list(ds.get("SharedFunctionalGroupsSequence", []) or []) + list(
        ds.get("PerFrameFunctionalGroupsSequence", []) or []
    )
    for group in groups:
        for derivation in group.get("DerivationImageSequence", []) or []:
            for source in derivation.get("SourceImageSequence", []) or []:
                sop = _text(source, "ReferencedSOPInstanceUID")
                if sop:
                    ordered.setdefault(sop)
    return [(series_of.get(sop, ""), sop) for sop in ordered]


def index_fields(file_bytes: bytes) -> IndexFields:
    """Read the indexed attributes from a complete Part 10 file (preamble + File Meta)."""
    try:
        ds = dcmread(BytesIO(file_bytes), stop_before_pixels=True)
        sop_class = _text(ds, "SOPClassUID")
        fields = IndexFields(
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            sop_uid=_text(ds, "SOPInstanceUID"),
            sop_class_uid=sop_class,
            modality=_text(ds, "Modality"),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID") or None,
            number_of_slices=_int_or_none(ds, "NumberOfSlices"),
            instance_number=_int_or_none(ds, "InstanceNumber"),
            referenced_instances=(
                _seg_references(ds) if sop_class in SEGMENTATION_SOP_CLASSES else []
            ),
            manufacturer=_text(ds, "Manufacturer"),
            manufacturer_model_name=_text(ds, "ManufacturerModelName"),
        )
    except MalformedDataSet:
        raise
    except Exception as exc:  # pydicom raises many types on broken input
        raise MalformedDataSet(f"data set cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return fields
