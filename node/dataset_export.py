"""Export a site's reviewed lesions as a training dataset in HCL-AL's layout (``locus dataset export``).

For each selected study (its newest successfully analysed version, see
:func:`node.db.reviews.dataset_studies`) the study's spooled instances are rebuilt with the
analysis's own stages (:mod:`pipelines.datasets.rebuild`) and written as one folder::

    OUT_DIR/<Study Instance UID>/CT.nii.gz, SUV.nii.gz, mask.nii.gz   (label i = lesion i)
    OUT_DIR/bbox.csv        every lesion in a mask (HCL-AL box-mode inference input)
    OUT_DIR/anno.csv        lesions with a ground-truth site: GT = the acceptable HCL-AL strings
    OUT_DIR/train_coarse.csv, train_fine.csv   where coarse_gt / fine_gt (and the stage-1
                            coarse_labels, from the stored localizer ranking) are derivable
    OUT_DIR/manifest.json   library and Locus versions, each study's UID and version, each
                            lesion's status and who confirmed or corrected it when, and every
                            study or lesion left out with the reason

Ground truth: ``--reviewed-only`` (default) exports studies with at least one reviewed lesion
and gives GT rows only to reviewed lesions; ``--all`` exports every analysed study and uses the
localizer's prediction where no review exists (``locus_status`` = ``predicted`` says which).
Every lesion stays in the mask either way, so the mask channel shows the study as it is.

Privacy: the manifest and CSVs carry UIDs, site ids and reviewer names, never patient names or
IDs, and not the reviewers' free-text notes (which may quote the patient).  The dataset is
written to ``OUT_DIR.partial`` and renamed when complete, so a crash leaves a visibly partial
directory, never a plausible-looking incomplete dataset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library import AnatomyLibrary, load_library
from library.errors import LibraryError
from node.db import Database
from node.db.reviews import DatasetLesion, DatasetStudy, dataset_studies, record_dataset_export
from node.storage import LocalSpool
from pipelines.analysis import LOCUS_VERSION
from pipelines.datasets.hclal_layout import (
    ANNO_COLUMNS,
    ANNO_CSV,
    BBOX_COLUMNS,
    BBOX_CSV,
    CT_FILENAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MASK_FILENAME,
    SUV_FILENAME,
    TRAIN_COARSE_COLUMNS,
    TRAIN_COARSE_CSV,
    TRAIN_FINE_COLUMNS,
    TRAIN_FINE_CSV,
    Box,
    StudyImages,
    join_labels,
    relative_image_path,
    write_csv,
    write_study_images,
)
from pipelines.datasets.hclal_truth import HclAlTruth, truth_for_site
from pipelines.datasets.rebuild import LesionKey, lesion_label_map, rebuild_study
from pipelines.errors import InputError, LocusError

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
EXTRA_COLUMNS = ("locus_lesion_id", "locus_label", "locus_site_id", "locus_status")
COARSE_LABELS_TOPK = 3  # HCL-AL's coarse.topk default (HCL-AL, Gao et al. 2025)


class ExportError(InputError):
    """The export cannot start (output directory in the way)."""

    code = "export_refused"


@dataclass(frozen=True)
class ExportOptions:
    """What ``locus export-dataset`` writes: where, and which studies qualify."""
    out_dir: Path
    reviewed_only: bool = True
    since: dt.datetime | None = None
    absolute_paths: bool = False  # CSV image paths absolute (else relative to OUT_DIR)


@dataclass
class ExportSummary:
    """What an export wrote, printed as JSON so scripts can check it."""
    out_dir: Path
    studies: list[str] = field(default_factory=list)
    lesions: int = 0
    ground_truth_rows: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    manifest_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready values (paths as strings)."""
        return {
            "out_dir": str(self.out_dir),
            "studies": self.studies,
            "lesions": self.lesions,
            "ground_truth_rows": self.ground_truth_rows,
            "skipped": self.skipped,
            "files": self.files,
            "manifest_sha256": self.manifest_sha256,
        }


def select_studies(db: Database, options: ExportOptions) -> list[DatasetStudy]:
    """The studies an export would write, chosen in one read-only transaction."""
    with db.session(readonly=True) as session:
        return dataset_studies(session, reviewed_only=options.reviewed_only, since=options.since)


def _status(lesion: DatasetLesion) -> str:
    if lesion.review is not None:
        return "confirmed" if lesion.review.action == "confirm" else "corrected"
    return "predicted" if lesion.predicted_site_id else "unlabelled"


def _ground_truth_site(lesion: DatasetLesion, reviewed_only: bool) -> str | None:
    if lesion.review is not None:
        return lesion.review.site_id
    return None if reviewed_only else lesion.predicted_site_id


def _box(lesion: DatasetLesion) -> Box | None:
    b = lesion.bbox or {}
    try:
        c, s = b["center_mm"], b["size_mm"]
        return Box((float(c[0]), float(c[1]), float(c[2])), (float(s[0]), float(s[1]), float(s[2])))
    except (KeyError, TypeError, IndexError, ValueError):
        return None


@dataclass
class _Writer:
    """Collects the CSV rows and manifest entries of one export run."""

    root: Path  # where files are written now (the .partial directory)
    final_root: Path
    options: ExportOptions
    library: AnatomyLibrary
    bbox: list[dict[str, Any]] = field(default_factory=list)
    anno: list[dict[str, Any]] = field(default_factory=list)
    coarse: list[dict[str, Any]] = field(default_factory=list)
    fine: list[dict[str, Any]] = field(default_factory=list)
    studies: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    _truth: dict[str, HclAlTruth | None] = field(default_factory=dict)

    def path_text(self, path: Path) -> str:
        rel = relative_image_path(path, self.root)
        return str((self.final_root / rel).resolve()) if self.options.absolute_paths else rel

    def truth(self, site_id: str) -> HclAlTruth | None:
        if site_id not in self._truth:
            try:
                self._truth[site_id] = truth_for_site(self.library, site_id)
            except LibraryError:  # a site of an older library version
                self._truth[site_id] = None
        return self._truth[site_id]

    def skip(self, study: DatasetStudy, code: str, reason: str) -> None:
        log.warning("dataset export: study %s v%d skipped (%s): %s", study.study_uid, study.version, code, reason)
        self.skipped.append({"study_uid": study.study_uid, "version": study.version, "code": code, "reason": reason})

    def add_study(self, study: DatasetStudy, spool: LocalSpool) -> None:
        folder = self.root / study.study_uid
        try:
            files = [spool.path(p) for p in study.instance_paths]
            missing = [p for p in study.instance_paths if not spool.exists(p)]
            if missing:
                raise InputError(f"{len(missing)} of {len(files)} spooled instances are missing, e.g. {missing[0]}",
                                 code="spool_missing")
            rebuilt = rebuild_study(files)
            if rebuilt.ct is None:
                raise InputError("the study has no CT in the PET's Frame of Reference (HCL-AL channel 0)",
                                 code="no_ct")
            keys: list[LesionKey] = []
            unmeasurable: dict[str, str] = {}
            for les in study.lesions:
                if les.seg_sop_uid is None:
                    unmeasurable[les.lesion_id] = "the lesion row names no SEG instance"
                    continue
                keys.append(LesionKey(les.lesion_id, les.seg_sop_uid, les.segment_number, les.component,
                                      label=len(keys) + 1))
            label_map = lesion_label_map(rebuilt.suv, rebuilt.segs, keys)
            if not label_map.voxels:
                raise InputError("no lesion has a voxel on the PET grid", code="no_lesion_voxels")
            images = write_study_images(folder, ct=rebuilt.ct, suv=rebuilt.suv, labels=label_map.labels)
        except LocusError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self.skip(study, exc.code, exc.reason)
            return
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self.skip(study, "io_error", f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # a defect of ours: this study is listed, the others still export
            log.exception("dataset export: study %s failed", study.study_uid)
            shutil.rmtree(folder, ignore_errors=True)
            self.skip(study, "internal_error", f"{type(exc).__name__}: {exc}")
            return
        missing_lesions = {**unmeasurable, **label_map.missing}
        labels = {k.lesion_id: k.label for k in keys}
        entries = [self._lesion_rows(les, images, labels.get(les.lesion_id), label_map.voxels.get(les.lesion_id, 0),
                                     label_map.overlaps.get(les.lesion_id, 0), missing_lesions.get(les.lesion_id))
                   for les in study.lesions]
        self.studies.append({
            "study_uid": study.study_uid,
            "version": study.version,
            "folder": folder.name,
            "analysed_at": study.analysed_at.isoformat() if study.analysed_at else None,
            "suv": rebuilt.suv_info.unit,
            "files": [CT_FILENAME, SUV_FILENAME, MASK_FILENAME],
            "lesions": entries,
        })

    def _lesion_rows(self, les: DatasetLesion, images: StudyImages, label: int | None, voxels: int, overlap: int,
                     missing: str | None) -> dict[str, Any]:
        status = _status(les)
        entry: dict[str, Any] = {
            "lesion_id": les.lesion_id,
            "label": label if missing is None else None,
            "seg_sop_uid": les.seg_sop_uid,
            "segment_number": les.segment_number,
            "component": les.component,
            "mask_voxels": voxels,
            "status": status,
            "predicted_site_id": les.predicted_site_id,
            "site_id": None,
            "reviewed_by": les.review.reviewer if les.review else None,
            "reviewed_at": les.review.at.isoformat() if les.review else None,
            "review_library": (
                {"version": les.review.library_version, "content_hash": les.review.library_hash}
                if les.review else None
            ),
            # every review, oldest first; notes stay in the database (free text may name the patient)
            "review_history": [
                {"action": r.action, "site_id": r.site_id, "previous_site_id": r.previous_site_id,
                 "by": r.reviewer, "at": r.at.isoformat(), "on_version": r.version}
                for r in les.reviews
            ],
            "in_csv": [],
            "notes": [],
        }
        if overlap:
            entry["notes"].append(f"{overlap} voxel(s) overlap an earlier lesion and carry its label")
        if missing is not None:
            entry["notes"].append(f"not in the mask: {missing}")
            return entry
        box = _box(les)
        if box is None:
            entry["notes"].append("no bounding box stored for the lesion; not in the CSVs")
            return entry
        site_id = _ground_truth_site(les, self.options.reviewed_only)
        entry["site_id"] = site_id
        extras = {"locus_lesion_id": les.lesion_id, "locus_label": label, "locus_site_id": site_id or "",
                  "locus_status": status}
        images_row = {"image_path": self.path_text(images.ct), "image_path1": self.path_text(images.suv),
                      "image_path2": self.path_text(images.mask)}
        self.bbox.append({**images_row, **box.as_row(), **extras})
        entry["in_csv"].append(BBOX_CSV)
        if site_id is None:
            return entry
        truth = self.truth(site_id)
        if truth is None:
            entry["notes"].append(f"site {site_id!r} is not in anatomy library {self.library.version}; no GT row")
            return entry
        if not truth.finals:
            entry["notes"].append(f"site {site_id!r} has no HCL-AL location string; GT column left empty")
        self.anno.append({"image_path": images_row["image_path"], **box.as_row(), "GT": join_labels(truth.finals),
                          **extras})
        entry["in_csv"].append(ANNO_CSV)
        if truth.coarse_key is not None:
            self.coarse.append({**images_row, **box.as_row(), "coarse_gt": truth.coarse_key, **extras})
            entry["in_csv"].append(TRAIN_COARSE_CSV)
        if truth.fine is not None and les.coarse_ranking:
            self.fine.append({**images_row, **box.as_row(), "coarse_gt": truth.fine[0], "fine_gt": truth.fine[1],
                              "coarse_labels": join_labels(les.coarse_ranking[:COARSE_LABELS_TOPK]), **extras})
            entry["in_csv"].append(TRAIN_FINE_CSV)
        return entry

    def finish(self, now: dt.datetime) -> tuple[list[str], dict[str, Any]]:
        files = [BBOX_CSV, ANNO_CSV]
        write_csv(self.root / BBOX_CSV, BBOX_COLUMNS, self.bbox, extra_columns=EXTRA_COLUMNS)
        write_csv(self.root / ANNO_CSV, ANNO_COLUMNS, self.anno, extra_columns=EXTRA_COLUMNS)
        for name, columns, rows in ((TRAIN_COARSE_CSV, TRAIN_COARSE_COLUMNS, self.coarse),
                                    (TRAIN_FINE_CSV, TRAIN_FINE_COLUMNS, self.fine)):
            if rows:
                write_csv(self.root / name, columns, rows, extra_columns=EXTRA_COLUMNS)
                files.append(name)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "created_at": now.isoformat(),
            "locus_version": LOCUS_VERSION,
            "library": self.library.stamp(),
            "selection": {
                "ground_truth": "reviewed-only" if self.options.reviewed_only else "all",
                "since": self.options.since.isoformat() if self.options.since else None,
                "study_version": "newest successfully analysed version",
            },
            "layout": {
                "channels": {"image_path": "CT (HU), CT grid", "image_path1": "SUVbw, PET grid",
                             "image_path2": "lesion labels, PET grid; locus_label = a lesion's value"},
                "coordinates": "CSV boxes: centre x,y,z and extent width,height,depth in LPS mm, voxel edges; "
                               "NIfTI affines are RAS as the format requires",
                "paths": "absolute" if self.options.absolute_paths else "relative to this directory",
                "gt": "anno.csv GT = acceptable HCL-AL final strings of locus_site_id (library crosswalk)",
            },
            "files": files,
            "studies": self.studies,
            "skipped": self.skipped,
        }
        return files, manifest


def _prepare(out_dir: Path) -> Path:
    out_dir = out_dir.expanduser().absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory; choose a new output directory")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        raise ExportError(f"{partial} exists (an earlier export did not finish); remove it first")
    partial.mkdir(parents=True)
    return partial


def export_dataset(
    db: Database,
    spool: LocalSpool,
    studies: list[DatasetStudy],
    options: ExportOptions,
    *,
    library: AnatomyLibrary | None = None,
    now: dt.datetime | None = None,
    on_study: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write ``studies`` (from :func:`select_studies`) to ``options.out_dir``; see the module docstring."""
    now = now or dt.datetime.now(dt.UTC)
    final = options.out_dir.expanduser().absolute()
    partial = _prepare(final)
    writer = _Writer(root=partial, final_root=final, options=options, library=library or load_library())
    for study in studies:
        writer.add_study(study, spool)
        if on_study is not None:
            on_study(study.study_uid)
    files, manifest = writer.finish(now)
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    (partial / MANIFEST_NAME).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    if final.exists():
        final.rmdir()  # checked empty by _prepare
    os.replace(partial, final)
    summary = ExportSummary(
        out_dir=final,
        studies=[s["study_uid"] for s in writer.studies],
        lesions=len(writer.bbox),
        ground_truth_rows=len(writer.anno),
        skipped=writer.skipped,
        files=[*files, MANIFEST_NAME],
        manifest_sha256=sha,
    )
    with db.session() as session:
        record_dataset_export(session, dt.datetime.now(dt.UTC), study_uids=summary.studies, detail={
            "manifest": sha,
            "ground_truth": manifest["selection"]["ground_truth"],
            "since": manifest["selection"]["since"],
            "studies": len(summary.studies),
            "lesions": summary.lesions,
            "ground_truth_rows": summary.ground_truth_rows,
            "skipped": len(summary.skipped),
        })
    log.info("dataset export: %d studies, %d lesions (%d with GT), %d skipped, manifest %s",
             len(summary.studies), summary.lesions, summary.ground_truth_rows, len(summary.skipped), sha[:12])
    return summary
