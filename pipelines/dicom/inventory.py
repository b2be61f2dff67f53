"""Take stock of one received PET/CT study: which series is the PET, which CT goes with it, which SEGs.

Instances are grouped by Series Instance UID and classified by SOP Class UID (PS3.4 B.5;
Modality only as a fallback): CT image series (CT, Enhanced CT, Legacy Converted Enhanced
CT), PET image series (PET, Legacy Converted Enhanced PET, Enhanced PET) and Segmentation
objects (Segmentation and Label Map Segmentation Storage, PS3.3 A.51 / A.51.2).  Everything
else (RTSTRUCT, SR, presentation states, localizers, ...) is ignored with a recorded reason.

Instances without SOP Instance, Study Instance or Series Instance UID (all Type 1) are
refused and recorded: they cannot be referenced from a report and must not be grouped with
other UID-less files.  Nothing is repaired here.

The CT used with the PET must share the PET's Frame of Reference (same acquisition, no
registration needed, PS3.3 C.7.4.1.1.1) and, among those, is the one that covers the PET's
extent along the PET slice normal best.  Every choice is recorded as a
:class:`~pipelines.findings.SeriesChoice` with its reason.

Headers are read with ``stop_before_pixels``; each keeps its ``filename`` so
:func:`pipelines.dicom.series.build_volume` and the SEG reader load pixels later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.dicom.series import slice_refs
from pipelines.errors import InputError, LocusError
from pipelines.findings import Flag, SeriesChoice

log = logging.getLogger(__name__)

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
PET_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
}
SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
_MODALITY_ROLE = {"CT": "ct", "PT": "pet", "SEG": "seg"}


@dataclass(frozen=True)
class IgnoredItem:
    """An input that is not used, and why (``code`` is stable snake_case)."""

    source: str  # file path, or SOP Instance UID for in-memory datasets (local use only)
    code: str
    reason: str  # never holds a path: it goes to reports (see ``label``)
    sop_instance_uid: str = ""  # empty when the input could not be read or has no UID
    ordinal: int = 0  # 1, 2, ... for inputs without a UID, so each one is told apart in a report

    @property
    def label(self) -> str:
        """How reports and the database name this input: by UID only, never by path.

        A spool path (``.../spool/<study>/<series>/<sop>.dcm``) is a server detail; an SR
        travels to the PACS and must not carry it (issue 12, defect 6).
        """
        if self.sop_instance_uid:
            return f"SOP Instance {self.sop_instance_uid}"
        return f"input #{self.ordinal} (no readable SOP Instance UID)"


@dataclass(frozen=True)
class SeriesGroup:
    """The instances of one series, classified."""

    series_instance_uid: str
    role: str  # "ct", "pet", "seg"
    modality: str
    frame_of_reference_uid: str
    headers: tuple[Dataset, ...]
    description: str = ""

    @property
    def paths(self) -> tuple[str | None, ...]:
        """The files of the series' instances (None where a header was not read from a file)."""
        return tuple(_filename(ds) for ds in self.headers)


@dataclass
class StudyInventory:
    """What one study holds and which series an analysis uses."""

    study_instance_uid: str
    pet: SeriesGroup
    ct: SeriesGroup | None
    segs: tuple[SeriesGroup, ...]
    series: tuple[SeriesGroup, ...]  # every classified series (chosen or not)
    choices: list[SeriesChoice] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    ignored: list[IgnoredItem] = field(default_factory=list)

    @property
    def pet_headers(self) -> list[Dataset]:
        """The PET series' headers, in instance order."""
        return list(self.pet.headers)

    @property
    def ct_headers(self) -> list[Dataset] | None:
        """The CT series' headers, or None when the study has no usable CT."""
        return list(self.ct.headers) if self.ct is not None else None

    @property
    def seg_headers(self) -> list[Dataset]:
        """Every SEG header of the study."""
        return [ds for g in self.segs for ds in g.headers]


def _filename(ds: Dataset) -> str | None:
    name = getattr(ds, "filename", None)
    return str(name) if isinstance(name, (str, Path)) else None


def _source(ds: Dataset) -> str:
    return _filename(ds) or str(ds.get("SOPInstanceUID", "") or "<in-memory dataset>")


def _ignored(ds: Dataset, code: str, reason: str, ignored: list[IgnoredItem]) -> IgnoredItem:
    uid = _uid(ds, "SOPInstanceUID")
    ordinal = 0 if uid else 1 + sum(1 for i in ignored if not i.sop_instance_uid)
    return IgnoredItem(_source(ds), code, reason, uid, ordinal)


def _read_error(exc: BaseException, item: str | Path) -> str:
    """The reason a file could not be read, without its path (OSError messages name it)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    for name in {str(item), Path(item).name}:
        text = text.replace(name, "<file>")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


#: Files a study folder may hold beside its instances (its README, notes, OS metadata). Found
#: while walking a folder and not DICOM, they are skipped without an "ignored instance" note.
_FOLDER_DOCS = (".md", ".txt", ".rst", ".json", ".csv", ".pdf", ".html")


def _is_folder_doc(path: Path) -> bool:
    return path.suffix.lower() in _FOLDER_DOCS or path.name.upper().startswith("README") or path.name.startswith(".")


def _expand(items: Iterable[str | Path | Dataset]) -> Iterable[tuple[str | Path | Dataset, bool]]:
    """Each item with whether it was found by walking a folder (rather than named by the caller)."""
    for item in items:
        if isinstance(item, Dataset):
            yield item, False
        elif Path(item).is_dir():
            yield from ((p, True) for p in sorted(p for p in Path(item).rglob("*") if p.is_file()))
        else:
            yield item, False


def _read(items: Iterable[str | Path | Dataset], ignored: list[IgnoredItem]) -> list[Dataset]:
    out: list[Dataset] = []
    for item, walked in _expand(items):
        if isinstance(item, Dataset):
            out.append(item)
            continue
        try:
            out.append(pydicom.dcmread(str(item), stop_before_pixels=True))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            if walked and _is_folder_doc(Path(item)):
                log.debug("skipped %s: a document beside the study's instances, not DICOM", Path(item).name)
                continue
            reason = f"not a readable DICOM file ({_read_error(exc, item)})"
            ordinal = 1 + sum(1 for i in ignored if not i.sop_instance_uid)
            ignored.append(IgnoredItem(str(item), "not_dicom", reason, ordinal=ordinal))
    return out


def _role(ds: Dataset) -> tuple[str | None, str]:
    sop_class = _uid(ds, "SOPClassUID")
    for role, table in (("ct", CT_SOP_CLASSES), ("pet", PET_SOP_CLASSES), ("seg", SEG_SOP_CLASSES)):
        if sop_class in table:
            return role, table[sop_class]
    modality = str(ds.get("Modality", "") or "")
    if not sop_class and modality in _MODALITY_ROLE:
        return _MODALITY_ROLE[modality], f"Modality {modality} (no SOP Class UID)"
    return None, f"SOP Class {sop_class or 'absent'}, Modality {modality or 'absent'}"


def _extent(group_headers: Sequence[Dataset], normal: np.ndarray) -> tuple[float, float, int] | None:
    """Min and max image position along ``normal`` (mm) and the number of 2-D images, or None."""
    try:
        d = [float(normal @ r.position) for ds in group_headers for r in slice_refs(ds)]
    except LocusError:
        return None
    return (min(d), max(d), len(d)) if d else None


def _normal(headers: Sequence[Dataset]) -> np.ndarray | None:
    try:
        ref = slice_refs(headers[0])[0]
    except LocusError:
        return None
    n = np.cross(ref.orientation[:3], ref.orientation[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _seg_referenced_series(seg: Dataset) -> set[str]:
    refs = set()
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        uid = _uid(item, "SeriesInstanceUID")
        if uid:
            refs.add(uid)
    return refs


def _is_attenuation_corrected(ds: Dataset) -> bool:
    return "ATTN" in {str(v).upper() for v in (ds.get("CorrectedImage") or [])}


def take_inventory(items: Iterable[str | Path | Dataset]) -> StudyInventory:
    """Group, classify and choose the series of one PET/CT study (see module docstring).

    Raises :class:`InputError` with code ``mixed_studies`` when the items span studies and
    ``no_pet`` when no usable PET series is present.
    """
    ignored: list[IgnoredItem] = []
    flags: list[Flag] = []
    datasets = _read(items, ignored)

    by_series: dict[str, list[Dataset]] = {}
    roles: dict[str, tuple[str, str]] = {}
    seen_sops: set[str] = set()
    studies: set[str] = set()
    for ds in datasets:
        missing = [kw for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _uid(ds, kw)]
        if missing:
            meta_uid = _uid(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPInstanceUID")
            note = f" (file meta MediaStorageSOPInstanceUID {meta_uid} is not used as a repair)" if meta_uid else ""
            ignored.append(
                _ignored(
                    ds,
                    "missing_uid",
                    f"Type 1 UID(s) empty or absent: {', '.join(missing)}{note}; "
                    "the instance cannot be grouped or referenced",
                    ignored,
                )
            )
            continue
        sop = _uid(ds, "SOPInstanceUID")
        if sop in seen_sops:
            ignored.append(_ignored(ds, "duplicate_sop_instance", f"SOP Instance {sop} given twice", ignored))
            continue
        seen_sops.add(sop)
        role, what = _role(ds)
        if role is None:
            ignored.append(_ignored(ds, "not_used", f"{what}: not an image or SEG Locus analyses", ignored))
            continue
        if role == "ct" and "LOCALIZER" in {str(v).upper() for v in (ds.get("ImageType") or [])}:
            ignored.append(_ignored(ds, "localizer", "CT localizer (scout) image", ignored))
            continue
        studies.add(_uid(ds, "StudyInstanceUID"))
        series_uid = _uid(ds, "SeriesInstanceUID")
        if series_uid in roles and roles[series_uid][0] != role:
            ignored.append(_ignored(ds, "mixed_series",
                                       f"series {series_uid} mixes {roles[series_uid][0]} and {role} instances", ignored))
            continue
        roles[series_uid] = (role, what)
        by_series.setdefault(series_uid, []).append(ds)

    refused = sum(1 for i in ignored if i.code == "missing_uid")
    if refused:
        flags.append(Flag("instances_refused", f"{refused} instance(s) refused for missing Type 1 UIDs"))
    if len(studies) > 1:
        raise InputError(f"the instances belong to {len(studies)} studies; one study is analysed at a time",
                         code="mixed_studies")

    groups = []
    for uid, headers in by_series.items():
        role, _what = roles[uid]
        ds0 = headers[0]
        groups.append(
            SeriesGroup(
                series_instance_uid=uid,
                role=role,
                modality=str(ds0.get("Modality", "") or ""),
                frame_of_reference_uid=_uid(ds0, "FrameOfReferenceUID"),
                headers=tuple(headers),
                description=str(ds0.get("SeriesDescription", "") or ""),
            )
        )
    pets = [g for g in groups if g.role == "pet"]
    cts = [g for g in groups if g.role == "ct"]
    segs = [g for g in groups if g.role == "seg"]

    if not pets:
        extra = f" ({refused} instance(s) were refused for missing UIDs)" if refused else ""
        raise InputError(f"the study holds no usable PET image series{extra}", code="no_pet")
    study_uid = next(iter(studies))
    choices: list[SeriesChoice] = []

    pet, pet_reason = _choose_pet(pets, segs)
    choices.append(SeriesChoice("pet", pet.series_instance_uid, pet_reason))

    ct, ct_reason = _choose_ct(pet, cts)
    if ct is None:
        flags.append(Flag("no_ct", ct_reason))
    else:
        choices.append(SeriesChoice("ct", ct.series_instance_uid, ct_reason))
        if len(cts) > 1:
            flags.append(Flag("ct_series_chosen", ct_reason))

    if not segs:
        flags.append(Flag("no_seg", "the study holds no SEG object: no lesions to measure"))
    for g in segs:
        refs = {r for ds in g.headers for r in _seg_referenced_series(ds)}
        on = "the chosen PET" if pet.series_instance_uid in refs else (
            "the chosen CT" if ct is not None and ct.series_instance_uid in refs else
            f"series {', '.join(sorted(refs))}" if refs else "no referenced series")
        same_for = g.frame_of_reference_uid == pet.frame_of_reference_uid
        choices.append(SeriesChoice("seg", g.series_instance_uid,
                                    f"{len(g.headers)} SEG instance(s) referencing {on}; FoR "
                                    f"{'matches' if same_for else 'differs from'} the PET"))

    log.info("study %s: PET %s, CT %s, %d SEG series, %d ignored", study_uid, pet.series_instance_uid,
             ct.series_instance_uid if ct else None, len(segs), len(ignored))
    return StudyInventory(
        study_instance_uid=study_uid,
        pet=pet,
        ct=ct,
        segs=tuple(segs),
        series=tuple(groups),
        choices=choices,
        flags=flags,
        ignored=ignored,
    )


def _choose_pet(pets: list[SeriesGroup], segs: list[SeriesGroup]) -> tuple[SeriesGroup, str]:
    """Prefer the PET the SEGs were drawn on, then attenuation-corrected, then the most images."""
    seg_refs: dict[str, int] = {}
    for g in segs:
        for ds in g.headers:
            for uid in _seg_referenced_series(ds):
                seg_refs[uid] = seg_refs.get(uid, 0) + 1

    def score(g: SeriesGroup) -> tuple[int, int, int]:
        return (seg_refs.get(g.series_instance_uid, 0), int(_is_attenuation_corrected(g.headers[0])), len(g.headers))

    ranked = sorted(pets, key=score, reverse=True)
    best = ranked[0]
    if len(pets) == 1:
        return best, f"only PET series ({len(best.headers)} instances)"
    s = score(best)
    parts = []
    if s[0]:
        parts.append(f"referenced by {s[0]} SEG instance(s)")
    parts.append("attenuation corrected" if s[1] else "not attenuation corrected")
    parts.append(f"{s[2]} instances")
    return best, f"chosen among {len(pets)} PET series: " + ", ".join(parts)


def _choose_ct(pet: SeriesGroup, cts: list[SeriesGroup]) -> tuple[SeriesGroup | None, str]:
    """The CT in the PET's Frame of Reference that covers the PET's extent along its normal best."""
    if not cts:
        return None, "the study holds no CT image series"
    same_for = [g for g in cts if g.frame_of_reference_uid and g.frame_of_reference_uid == pet.frame_of_reference_uid]
    if not same_for:
        return None, (f"none of the {len(cts)} CT series shares the PET's Frame of Reference "
                      f"{pet.frame_of_reference_uid}; registration would be needed")
    normal = _normal(pet.headers)
    pet_ext = _extent(pet.headers, normal) if normal is not None else None
    if pet_ext is None or normal is None:
        best = max(same_for, key=lambda g: len(g.headers))
        return best, "PET geometry unreadable: the CT in its Frame of Reference with the most images"
    pet_len = max(pet_ext[1] - pet_ext[0], 1e-6)

    scored = []
    for g in same_for:
        ext = _extent(g.headers, normal)
        if ext is None:
            continue
        if pet_ext[1] - pet_ext[0] < 1e-3:  # single-slice PET: covered or not
            coverage = 1.0 if ext[0] - 1e-3 <= pet_ext[0] <= ext[1] + 1e-3 else 0.0
        else:
            coverage = max(0.0, min(ext[1], pet_ext[1]) - max(ext[0], pet_ext[0])) / pet_len
        scored.append((round(coverage, 6), ext[2], g, ext))
    if not scored:
        return None, "no CT series in the PET's Frame of Reference has usable geometry"
    # best coverage, then most images (finer sampling), then the UID for a deterministic choice
    scored.sort(key=lambda t: (-t[0], -t[1], t[2].series_instance_uid))
    cov, n, best, ext = scored[0]
    if cov <= 0:
        return None, "no CT series in the PET's Frame of Reference overlaps the PET along its axis"
    reason = (f"shares the PET's Frame of Reference and covers {cov:.0%} of the PET extent "
              f"({pet_ext[0]:.1f}..{pet_ext[1]:.1f} mm along the PET normal; CT {ext[0]:.1f}..{ext[1]:.1f} mm, "
              f"{n} images)")
    if len(same_for) > 1 or len(cts) > 1:
        reason += f"; best of {len(cts)} CT series ({len(same_for)} in the PET's Frame of Reference)"
    return best, reason
