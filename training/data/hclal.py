"""Read a dataset directory in HCL-AL's layout into :class:`~training.data.records.StudyRecord` objects.

Two producers write this layout: HCL-AL's own data (``CT.nii.gz``, ``SUV.nii.gz``,
``SEG_MultiLabel.nii.gz`` per study and the CSVs of HCL-AL's release, Gao et al. 2025) and ``locus dataset
export`` (the same, with ``mask.nii.gz``, extra ``locus_*`` columns and a ``manifest.json``).

What is read:

* ``anno.csv`` (required): one row per lesion, ``image_path`` (the study's CT), the box
  ``x, y, z, width, height, depth`` (LPS mm) and ``GT``, the acceptable HCL-AL final strings.
  Every string is mapped to a coded library site through the crosswalk; an unknown string
  raises :class:`~pipelines.datasets.hclal_layout.DatasetFormatError` naming the file and row.
* the SUV and mask paths: from ``bbox.csv`` (``image_path1``, ``image_path2`` of the row with
  the same ``image_path``) when it has the study, else the conventional names beside the CT.
* which mask label is the lesion: ``locus_label`` when the row has it; otherwise the label whose
  voxel-edge box overlaps the row's box most (HCL-AL's own IoU matching, §5), and a row whose box
  overlaps no label is an error rather than a lesion without a mask.
* ``locus_site_id`` (Locus exports): the reviewed site, put first in ``LesionRecord.sites``.

Relative image paths are resolved against the dataset directory.  ``study_id`` is the study
folder name (HCL-AL's study key); ``source`` names the manifest's study version when there is one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library import AnatomyLibrary, load_library
from library.errors import LibraryError
from pipelines.datasets.hclal_layout import (
    ANNO_COLUMNS,
    ANNO_CSV,
    BBOX_COLUMNS,
    BBOX_CSV,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Box,
    DatasetFormatError,
    find_study_images,
    label_boxes,
    read_csv,
    read_nifti,
    resolve_image_path,
    split_labels,
)
from pipelines.datasets.hclal_truth import coarse_keys_for_finals, sites_for_finals
from pipelines.dicom.volume import Volume
from training.data.records import LesionRecord, StudyRecord

log = logging.getLogger(__name__)


@dataclass
class _StudyRows:
    folder: Path
    ct: Path
    suv: Path
    mask: Path
    rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # (line number, row)


def _locus_sources(root: Path) -> dict[str, str]:
    """Study folder name -> ``locus:<Study Instance UID>@v<version>`` from a Locus manifest."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        return {}
    return {s["folder"]: f"locus:{s['study_uid']}@v{s['version']}" for s in manifest.get("studies", [])}


def _studies(root: Path) -> list[_StudyRows]:
    anno_path = root / ANNO_CSV
    anno = read_csv(anno_path, ANNO_COLUMNS)
    channels: dict[Path, tuple[Path, Path]] = {}
    if (root / BBOX_CSV).is_file():
        for row in read_csv(root / BBOX_CSV, BBOX_COLUMNS):
            ct = resolve_image_path(row["image_path"], root).resolve()
            channels.setdefault(ct, (resolve_image_path(row["image_path1"], root),
                                     resolve_image_path(row["image_path2"], root)))
    studies: dict[Path, _StudyRows] = {}
    for line, row in enumerate(anno, start=2):  # line 1 is the header
        ct = resolve_image_path(row["image_path"], root).resolve()
        study = studies.get(ct)
        if study is None:
            if ct in channels:
                suv, mask = channels[ct]
            else:
                found = find_study_images(ct.parent)
                suv, mask = found.suv, found.mask
            study = studies[ct] = _StudyRows(folder=ct.parent, ct=ct, suv=suv, mask=mask)
        study.rows.append((line, row))
    return list(studies.values())


def _label_array(mask: Volume, where: str) -> Volume:
    arr = np.asarray(mask.array)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DatasetFormatError(f"{where}: the lesion mask holds non-integer values")
        arr = rounded
    return mask.with_array(arr.astype(np.int32, copy=False))


def _lesion(library: AnatomyLibrary, row: dict[str, str], where: str, boxes: dict[int, Box]) -> LesionRecord:
    finals = split_labels(row["GT"])
    sites = sites_for_finals(library, finals, where=where)
    reviewed = (row.get("locus_site_id") or "").strip()
    if reviewed:
        try:
            library.site(reviewed)
        except LibraryError as exc:
            raise DatasetFormatError(f"{where}: locus_site_id {reviewed!r}: {exc}", code="unknown_site") from exc
        sites = (reviewed, *(s for s in sites if s != reviewed))
    box = Box.from_row(row, where=where)
    label_text = (row.get("locus_label") or "").strip()
    if label_text:
        try:
            label = int(label_text)
        except ValueError as exc:
            raise DatasetFormatError(f"{where}: locus_label {label_text!r} is not an integer") from exc
        if label not in boxes:
            raise DatasetFormatError(f"{where}: locus_label {label} does not occur in the lesion mask")
    else:
        scored = sorted(((box.iou(b), lab) for lab, b in boxes.items()), key=lambda t: (-t[0], t[1]))
        if not scored or scored[0][0] <= 0:
            raise DatasetFormatError(f"{where}: no lesion of the mask overlaps the box {box.centre} {box.size}")
        label = scored[0][1]
    lesion_id = (row.get("locus_lesion_id") or "").strip() or f"L{label}"
    return LesionRecord(
        lesion_id=lesion_id,
        label=label,
        sites=sites,
        hclal_locations=finals,
        coarse_keys=coarse_keys_for_finals(library, finals),
    )


def iter_hclal_dataset(root: str | Path, *, library: AnatomyLibrary | None = None,
                       with_ct: bool = True) -> Iterator[StudyRecord]:
    """Yield one :class:`StudyRecord` per study of ``root``, reading its images lazily.

    All CSV rows are validated (columns, GT strings) before the first image is read, so a
    dataset with an unknown location string fails at once, not after an hour of loading.
    """
    root = Path(root)
    library = library or load_library()
    studies = _studies(root)
    for study in studies:  # fail fast on strings the library does not know
        for line, row in study.rows:
            sites_for_finals(library, split_labels(row["GT"]), where=f"{root / ANNO_CSV}: line {line}")
    sources = _locus_sources(root)
    for study in studies:
        name = study.folder.name
        labels = _label_array(read_nifti(study.mask, modality="SEG"), f"{study.mask}")
        boxes = label_boxes(labels)
        lesions = [_lesion(library, row, f"{root / ANNO_CSV}: line {line} ({name})", boxes)
                   for line, row in study.rows]
        yield StudyRecord(
            study_id=name,
            suv=read_nifti(study.suv, modality="PT"),
            ct=read_nifti(study.ct, modality="CT") if with_ct else None,
            labels=labels,
            lesions=lesions,
            source=sources.get(name, f"hclal:{study.folder}"),
        )
        log.debug("read study %s: %d lesions", name, len(lesions))


def hclal_study_ids(root: str | Path) -> list[str]:
    """The study keys (folder names) of ``root``'s ``anno.csv``, in file order, without reading an image."""
    return [study.folder.name for study in _studies(Path(root))]


def read_hclal_dataset(root: str | Path, *, library: AnatomyLibrary | None = None,
                       with_ct: bool = True) -> list[StudyRecord]:
    """Every study of ``root`` (see :func:`iter_hclal_dataset`)."""
    return list(iter_hclal_dataset(root, library=library, with_ct=with_ct))
