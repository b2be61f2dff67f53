"""End to end: a real analysed study -> review -> `locus dataset export` -> `training.data.hclal` reader.

The bundled demo study (synthetic PET/CT + SEG, ``node/demo_study``; see tests/node/review_export_helpers.py) is filed into a node's spool
and results database through the node's own ingest functions (spool ``put_atomic``, the
listener's ``index_fields``, ``repo.record_instance``), declared complete, and analysed by the
worker's job function with a configured localizer (small random-weight checkpoints in HCL-AL's
release layout, real HCL-AL strings, as in tests/integration/test_node_localizer.py), so lesions
carry a predicted site and a coarse ranking.  One lesion's prediction is confirmed, another is
corrected and then confirmed; the export is read back and the lesion's mask voxels are compared,
position by position, with its SEG segment.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from library import load_library
from node.cli_demo import SAMPLE_STUDY
from node.settings import LocusSettings
from pipelines.datasets.hclal_layout import ANNO_COLUMNS, BBOX_COLUMNS, read_csv
from pipelines.datasets.hclal_truth import truth_for_site
from pipelines.dicom.seg import read_segments
from tests.node.review_export_helpers import (
    CONFIRMED,
    LESION,
    SITE,
    T0,
    analysed_and_reviewed_node,
    lesion_rows,
)
from tests.node.review_export_helpers import run_cli as _run
from tests.pipelines.localizer import factory as F
from tests.pipelines.localizer.conftest import COARSE, FINE
from training.data.hclal import read_hclal_dataset

REGIONS = ("Chest", "Abdomen", "Axial skeleton")


@pytest.fixture(scope="module")
def analysed_node(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocusSettings, str]:
    release = F.write_release_dir(tmp_path_factory.mktemp("release"), coarse=COARSE, fine=FINE, regions=REGIONS)
    return analysed_and_reviewed_node(tmp_path_factory.mktemp("node"), release)


def test_export_reads_back_with_the_confirmed_site_and_the_seg_voxels(
    analysed_node: tuple[LocusSettings, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, study_uid = analysed_node
    library = load_library()
    rows = lesion_rows(settings)
    predicted = rows[CONFIRMED].site_id
    assert predicted is not None and rows[LESION].site_id is not None  # the localizer ran
    truths = {CONFIRMED: truth_for_site(library, predicted), LESION: truth_for_site(library, SITE)}
    fine_expected = [lid for lid, t in truths.items() if t.fine is not None]  # leaf sites (not the >100 mm rule)

    out_dir = tmp_path / "dataset"
    result = _run(settings, monkeypatch, "dataset", "export", str(out_dir), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["studies"] == [study_uid] and summary["skipped"] == []
    assert (summary["lesions"], summary["ground_truth_rows"]) == (5, 2)  # every lesion in bbox.csv, two reviewed
    assert not out_dir.with_name("dataset.partial").exists()
    assert sorted(p.name for p in (out_dir / study_uid).iterdir()) == ["CT.nii.gz", "SUV.nii.gz", "mask.nii.gz"]

    # HCL-AL's column names, then Locus's; GT = the HCL-AL strings of the confirmed site
    bbox_rows = read_csv(out_dir / "bbox.csv", BBOX_COLUMNS)
    anno = read_csv(out_dir / "anno.csv", ANNO_COLUMNS)
    assert [(r["locus_lesion_id"], r["locus_status"]) for r in bbox_rows] == [
        ("S1", "confirmed"), ("S2", "confirmed"), ("S3", "predicted"), ("S4", "predicted"), ("S5", "predicted")]
    assert [(r["locus_lesion_id"], r["GT"], r["locus_site_id"]) for r in anno] == [
        (CONFIRMED, ",".join(truths[CONFIRMED].finals), predicted), (LESION, "Liver S7", SITE)]
    assert anno[1]["image_path"] == f"{study_uid}/CT.nii.gz"
    coarse = read_csv(out_dir / "train_coarse.csv", (*BBOX_COLUMNS, "coarse_gt"))
    assert [(r["locus_lesion_id"], r["coarse_gt"]) for r in coarse][-1] == (LESION, "Liver")
    assert coarse[-1]["image_path1"] == f"{study_uid}/SUV.nii.gz"
    fine = read_csv(out_dir / "train_fine.csv", (*BBOX_COLUMNS, "coarse_gt", "fine_gt", "coarse_labels"))
    assert [r["locus_lesion_id"] for r in fine] == fine_expected
    s2_fine = next(r for r in fine if r["locus_lesion_id"] == LESION)
    assert (s2_fine["coarse_gt"], s2_fine["fine_gt"]) == ("Liver", "Liver S7")
    ranking = [r["label"] for r in rows[LESION].localization["coarse_ranking"]][:3]  # stage-1 top-3
    assert s2_fine["coarse_labels"].split(",") == ranking and ranking

    # the manifest says who confirmed what and when, and carries no patient identity or free text
    manifest_text = (out_dir / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["library"] == library.stamp() and manifest["locus_version"]
    assert manifest["files"] == ["bbox.csv", "anno.csv", "train_coarse.csv", "train_fine.csv"]
    (study,) = manifest["studies"]
    assert (study["study_uid"], study["version"], study["folder"]) == (study_uid, 1, study_uid)
    entries = {les["lesion_id"]: les for les in study["lesions"]}
    entry = entries[LESION]
    assert (entry["status"], entry["site_id"], entry["reviewed_by"], entry["reviewed_at"]) == (
        "confirmed", SITE, "Dr Bo", (T0 + timedelta(hours=2)).isoformat())
    assert entry["predicted_site_id"] == rows[LESION].site_id
    assert [(r["action"], r["site_id"], r["by"]) for r in entry["review_history"]] == [
        ("correct", SITE, "Dr Ada"), ("confirm", SITE, "Dr Bo")]
    assert (entries[CONFIRMED]["site_id"], entries[CONFIRMED]["reviewed_by"]) == (predicted, "Dr Ada")
    assert (entries["S3"]["status"], entries["S3"]["site_id"], entries["S3"]["in_csv"]) == (
        "predicted", None, ["bbox.csv"])  # --reviewed-only: a prediction is not ground truth
    header = pydicom.dcmread(next((SAMPLE_STUDY / "PT").rglob("*.dcm")), stop_before_pixels=True)
    all_text = manifest_text + "".join(p.read_text() for p in out_dir.glob("*.csv"))
    for identity in (str(header.PatientName), str(header.PatientID), "Jane Doe"):
        assert identity and identity not in all_text

    # read back through the training reader
    (record,) = read_hclal_dataset(out_dir)
    assert (record.study_id, record.source) == (study_uid, f"locus:{study_uid}@v1")
    first, lesion = record.lesions
    assert (first.lesion_id, first.sites[0], first.hclal_locations) == (CONFIRMED, predicted, truths[CONFIRMED].finals)
    assert (lesion.lesion_id, lesion.sites, lesion.hclal_locations, lesion.coarse_keys) == (
        LESION, (SITE,), ("Liver S7",), ("Liver",))
    assert sorted(int(v) for v in np.unique(record.labels.array) if v) == [1, 2, 3, 4, 5]

    # the mask voxels of the lesion are its SEG segment, at the same patient positions
    seg = read_segments(next(settings.storage.spool_dir.rglob(f"{entry['seg_sop_uid']}.dcm")))
    region = seg.source_mask(entry["segment_number"])
    mask = record.labels.array == lesion.label
    assert int(mask.sum()) == region.voxel_count == entry["mask_voxels"] == rows[LESION].voxel_count > 0
    lps = record.labels.index_to_lps(np.argwhere(mask)[:, ::-1])  # mask voxel centres via the NIfTI affine
    inv = np.linalg.inv(region.affine)
    ijk = lps @ inv[:3, :3].T + inv[:3, 3]  # ... as indices of the SEG's own grid
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
    kji = np.round(ijk[:, ::-1]).astype(int) - np.asarray(region.offset)
    assert np.all((kji >= 0) & (kji < np.asarray(region.mask.shape)))
    assert np.all(region.mask[tuple(kji.T)])
    # and the SUV channel is the SUV the analysis measured there
    assert float(record.suv.array[mask].max()) == pytest.approx(rows[LESION].suv_max, rel=1e-5)


def test_export_with_missing_spool_files_is_skipped_with_a_reason(
    analysed_node: tuple[LocusSettings, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, study_uid = analysed_node
    result = _run(settings, monkeypatch, "dataset", "export", str(tmp_path / "out"), "--since", "2026-12-01")
    assert result.exit_code == 0, result.output
    assert "1 studies, 5 lesions (2 with ground truth)" in result.output

    # `--all`: predictions stand in where no review exists, and say so
    result = _run(settings, monkeypatch, "dataset", "export", str(tmp_path / "predicted"), "--all",
                  "--absolute-paths")
    assert result.exit_code == 0, result.output
    anno = read_csv(tmp_path / "predicted" / "anno.csv", ANNO_COLUMNS)
    predicted = lesion_rows(settings)
    assert [(r["locus_lesion_id"], r["locus_status"]) for r in anno] == [
        ("S1", "confirmed"), ("S2", "confirmed"), ("S3", "predicted"), ("S4", "predicted"), ("S5", "predicted")]
    assert [r["locus_site_id"] for r in anno[2:]] == [predicted[f"S{i}"].site_id for i in (3, 4, 5)]
    assert anno[0]["image_path"] == str((tmp_path / "predicted" / study_uid / "CT.nii.gz").resolve())

    # `--all`: a study whose spooled instance vanished is listed as skipped, never silently dropped
    victim = next((settings.storage.spool_dir / study_uid).rglob("*.dcm"))
    moved = victim.with_suffix(".bak")
    victim.rename(moved)
    try:
        result = _run(settings, monkeypatch, "dataset", "export", str(tmp_path / "all"), "--all", "--json")
    finally:
        moved.rename(victim)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["studies"] == []
    (skipped,) = summary["skipped"]
    assert (skipped["study_uid"], skipped["code"]) == (study_uid, "spool_missing")
    manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert manifest["skipped"] == summary["skipped"] and manifest["selection"]["ground_truth"] == "all"

    result = _run(settings, monkeypatch, "dataset", "export", str(tmp_path / "all"), "--all")
    assert result.exit_code == 1 and "is not an empty directory" in result.output

    result = _run(settings, monkeypatch, "dataset", "export", str(tmp_path / "late"), "--since", "2027-01-01")
    assert result.exit_code == 0 and "0 studies, 0 lesions" in result.output
