"""Synthetic PET/CT phantom: determinism, label geometry, tissue values, DICOM round trip."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from library.anatomy import load_library
from pipelines.errors import InputError
from tests.helpers.dicomcheck import assert_dciodvfy_clean
from training.phantom import STRUCTURE_SITES, make_phantom, write_study
from training.phantom.dicom_writer import F18_HALF_LIFE_S
from training.phantom.generate import Phantom, grid_of


@pytest.fixture(scope="module")
def ph() -> Phantom:
    return make_phantom(11, "tiny")


@pytest.fixture(scope="module")
def study(ph: Phantom, tmp_path_factory: pytest.TempPathFactory):
    return write_study(ph, tmp_path_factory.mktemp("phantom"), with_scout=True)


def _arrays(p: Phantom) -> dict[str, np.ndarray]:
    return {"ct": p.ct.array, "pet": p.pet.array, "ct_labels": p.ct_labels.array, "pet_labels": p.pet_labels.array,
            "ct_lesions": p.ct_lesions.array, "pet_lesions": p.pet_lesions.array}


# -- determinism --------------------------------------------------------------------------
def test_same_seed_same_phantom(ph: Phantom) -> None:
    again = make_phantom(11, "tiny")
    for name, arr in _arrays(ph).items():
        np.testing.assert_array_equal(arr, _arrays(again)[name], err_msg=name)
        np.testing.assert_array_equal(getattr(ph, name).affine, getattr(again, name).affine)
    assert again.uids == ph.uids
    assert again.lesions == ph.lesions


def test_different_seed_different_phantom(ph: Phantom) -> None:
    other = make_phantom(12, "tiny")
    assert not np.array_equal(other.ct.array, ph.ct.array)
    assert not np.array_equal(other.pet.array, ph.pet.array)
    assert other.lesions != ph.lesions
    mine = {ph.uids.study, ph.uids.frame_of_reference, ph.uids.ct_series, ph.uids.pet_series, ph.uids.seg_series,
            *ph.uids.ct_instances, *ph.uids.pet_instances, *(les.tracking_uid for les in ph.lesions)}
    theirs = {other.uids.study, other.uids.frame_of_reference, other.uids.ct_series, other.uids.pet_series,
              *other.uids.ct_instances, *other.uids.pet_instances}
    assert not mine & theirs
    assert len(mine) == 5 + len(ph.uids.ct_instances) + len(ph.uids.pet_instances) + len(ph.lesions)
    for uid in mine:
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


# -- geometry and labels ------------------------------------------------------------------
def test_label_maps_match_analytic_owner(ph: Phantom) -> None:
    """Rasterised labels equal Anatomy.owner at voxel centres (same painting rules)."""
    rng = np.random.default_rng(0)
    for vol in (ph.ct_labels, ph.pet_labels):
        g = grid_of(vol)
        kji = np.stack([rng.integers(0, n, 400) for n in vol.array.shape], axis=1)
        pts = np.array([g.voxel_center(tuple(v)) for v in kji])
        assert np.array_equal(ph.anatomy.owner(pts), vol.array[kji[:, 0], kji[:, 1], kji[:, 2]])
        present = set(np.unique(vol.array).tolist())
        for name in ("liver_s7", "heart", "lung_right_lower_posterior_basal", "vertebra_t12", "spleen"):
            assert ph.anatomy.label_of(name) in present, name


def test_lesions_lie_in_their_labelled_sites(ph: Phantom) -> None:
    assert len(ph.lesions) == 3
    for les in ph.lesions:
        label = ph.anatomy.label_of(les.structure)
        assert ph.anatomy.owner(np.array([les.center_mm]))[0] == label
        for lab_vol in (ph.ct_labels, ph.pet_labels):
            k, j, i = grid_of(lab_vol).nearest_index(les.center_mm)
            assert lab_vol.array[k, j, i] == label
            assert ph.site_of_label(int(lab_vol.array[k, j, i])) == les.site_id
        assert les.site_id == STRUCTURE_SITES[les.structure]


def test_lesion_masks_boxes_and_volumes(ph: Phantom) -> None:
    for les_vol in (ph.ct_lesions, ph.pet_lesions):
        g = grid_of(les_vol)
        assert set(np.unique(les_vol.array).tolist()) == {0, *(les.label for les in ph.lesions)}
        for les in ph.lesions:
            kji = np.argwhere(les_vol.array == les.label)
            centres = np.array([g.voxel_center(tuple(v)) for v in kji])
            assert np.all(centres >= np.array(les.box_min_mm) - 1e-6)
            assert np.all(centres <= np.array(les.box_max_mm) + 1e-6)
            # every voxel centre lies inside the analytic ellipsoid
            local = (centres - np.array(les.center_mm)) @ np.array(les.axes).T / np.array(les.radii_mm)
            assert np.all((local**2).sum(axis=1) <= 1 + 1e-4)
            # one connected lesion whose centroid is within a voxel of the analytic centre
            _, n_cc = ndimage.label(les_vol.array == les.label, structure=np.ones((3, 3, 3)))
            assert n_cc == 1
            assert np.linalg.norm(centres.mean(axis=0) - np.array(les.center_mm)) <= np.linalg.norm(g.spacing)
    for les in ph.lesions:
        assert les.volume_ml == pytest.approx(4 / 3 * math.pi * np.prod(les.radii_mm) / 1000)
        n_ct = int((ph.ct_lesions.array == les.label).sum())
        vox_ml = grid_of(ph.ct_lesions).spacing[0] * grid_of(ph.ct_lesions).spacing[1] * \
            grid_of(ph.ct_lesions).spacing[2] / 1000
        assert 0.4 * les.volume_ml < n_ct * vox_ml < 1.8 * les.volume_ml


def test_requested_sites_and_placement_errors() -> None:
    p = make_phantom(3, "tiny", n_lesions=2, lesion_sites=["liver_s7", "vertebra_t11"])
    assert [les.site_id for les in p.lesions] == ["liver_s7", "vertebra_t11"]
    with pytest.raises(InputError) as err:
        make_phantom(3, "tiny", n_lesions=1, lesion_sites=["femur_left"])  # outside the tiny field of view
    assert err.value.code == "phantom_lesion_placement"


def test_site_ids_exist_in_the_library(ph: Phantom) -> None:
    lib = load_library()
    for name, site in STRUCTURE_SITES.items():
        if site is not None:
            assert lib.site(site).id == site, name
    assert lib.site("outside_body")
    # background tissues are the only structures without a site, and never host lesions
    unsited = {s.name for s in ph.anatomy.structures if s.site_id is None}
    assert unsited == {"subcutaneous_fat", "muscle_and_soft_tissue"}
    assert all(ph.anatomy.structure(n).lesion_weight == 0 for n in unsited)


# -- tissue values ------------------------------------------------------------------------
def _interior(vol: np.ndarray, labels: set[int]) -> np.ndarray:
    return ndimage.binary_erosion(np.isin(vol, list(labels)), iterations=1)


@pytest.mark.parametrize(
    ("group", "hu_range", "suv_range"),
    [
        ("liver_s", (40, 75), (1.5, 3.2)),
        ("lung_", (-900, -750), (0.15, 0.9)),
        ("muscle_and_soft_tissue", (15, 75), (0.4, 1.1)),
        ("vertebra_t", (150, 700), (0.6, 2.5)),
        ("spleen", (30, 65), (1.3, 2.6)),
    ],
)
def test_tissue_values_are_plausible(ph: Phantom, group: str, hu_range: tuple[float, float],
                                     suv_range: tuple[float, float]) -> None:
    labels = {ph.anatomy.label_of(s.name) for s in ph.anatomy.structures
              if s.name.startswith(group) and not s.name.endswith("spinous_process")}
    lesion_free_ct = ph.ct_lesions.array == 0
    m = _interior(ph.ct_labels.array, labels) & lesion_free_ct
    assert m.sum() > 5
    assert hu_range[0] <= ph.ct.array[m].mean() <= hu_range[1]
    mp = np.isin(ph.pet_labels.array, list(labels)) & (ph.pet_lesions.array == 0)
    assert mp.sum() > 0
    assert suv_range[0] <= float(np.median(ph.pet.array[mp])) <= suv_range[1]


def test_ranges_noise_and_lesion_contrast(ph: Phantom) -> None:
    ct, pet = ph.ct.array, ph.pet.array
    assert ct.dtype == np.int16 and ct.min() >= -1024 and ct.max() <= 3071
    assert pet.dtype == np.float32 and pet.min() >= 0 and pet.max() < 60
    outside = ndimage.binary_erosion(ph.ct_labels.array == 0, iterations=2)
    assert ct[outside].mean() < -980
    # noise: a uniform region is not constant, and is of the intended magnitude (~12 HU, ~10 % SUV)
    liver = _interior(ph.ct_labels.array, {ph.anatomy.label_of(f"liver_s{n}") for n in range(1, 9)})
    liver &= ph.ct_lesions.array == 0
    assert 6 < ct[liver].std() < 25
    for les in ph.lesions:
        in_les = ph.pet_lesions.array == les.label
        host = (ph.pet_labels.array == ph.anatomy.label_of(les.structure)) & (ph.pet_lesions.array == 0)
        host_level = float(np.median(pet[host])) if host.any() else ph.anatomy.structure(les.structure).suv
        assert pet[in_les].max() > 1.5 * host_level, les


# -- DICOM --------------------------------------------------------------------------------
def _read_series(paths: tuple[Path, ...]) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(p) for p in paths]
    return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))


def _affine(dss: list[pydicom.Dataset]) -> np.ndarray:
    row, col = np.array(dss[0].ImageOrientationPatient[:3], float), np.array(dss[0].ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in dss[0].PixelSpacing)
    first, last = np.array(dss[0].ImagePositionPatient, float), np.array(dss[-1].ImagePositionPatient, float)
    a = np.eye(4)
    a[:3, 0], a[:3, 1] = row * dc, col * dr
    a[:3, 2] = (last - first) / (len(dss) - 1)
    a[:3, 3] = first
    return a


def test_ct_round_trip(ph: Phantom, study) -> None:
    dss = _read_series(study.ct_paths)
    assert len(dss) == ph.ct.array.shape[0]
    np.testing.assert_allclose(_affine(dss), ph.ct.affine, atol=1e-5)
    hu = np.stack([d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept) for d in dss])
    np.testing.assert_array_equal(hu, ph.ct.array)
    assert [d.SOPInstanceUID for d in dss] == list(ph.uids.ct_instances)
    d = dss[0]
    assert (d.SOPClassUID, d.Modality, d.RescaleIntercept, d.RescaleSlope) == (
        pydicom.uid.CTImageStorage, "CT", -1024, 1)
    assert d.FrameOfReferenceUID == ph.uids.frame_of_reference and d.StudyInstanceUID == ph.uids.study
    assert str(d.PatientName).startswith("Phantom^") and d.PatientID == f"LOCUS-PH-{ph.seed}"


def test_pet_suv_from_headers(ph: Phantom, study) -> None:
    dss = _read_series(study.pet_paths)
    n = len(dss)
    assert n == ph.pet.array.shape[0]
    np.testing.assert_allclose(_affine(dss), ph.pet.affine, atol=1e-5)
    d0 = dss[0]
    assert d0.Units == "BQML" and d0.DecayCorrection == "START" and d0.NumberOfSlices == n
    assert {"ATTN", "DECY"} <= set(d0.CorrectedImage)
    rp = d0.RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideHalfLife) == F18_HALF_LIFE_S
    # QIBA: Series Date/Time is the reference because it is not after any Acquisition Time
    series = dt.datetime.strptime(d0.SeriesDate + d0.SeriesTime, "%Y%m%d%H%M%S")
    acquisitions = [dt.datetime.strptime(d.AcquisitionDate + d.AcquisitionTime, "%Y%m%d%H%M%S") for d in dss]
    assert series <= min(acquisitions) and len(set(acquisitions)) > 1
    injection = dt.datetime.strptime(rp.RadiopharmaceuticalStartDateTime, "%Y%m%d%H%M%S")
    decayed = float(rp.RadionuclideTotalDose) * 2 ** (-(series - injection).total_seconds() / F18_HALF_LIFE_S)
    factor = float(d0.PatientWeight) * 1000.0 / decayed
    assert factor == pytest.approx(study.suv_scale_factor, rel=1e-12)
    slopes = [float(d.RescaleSlope) for d in dss]
    assert len(set(slopes)) > 1  # per-slice slope, as GE writes it
    suv = np.stack([(d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)) * factor for d in dss])
    truth = ph.pet.array
    step = np.array(slopes)[:, None, None] * factor  # one stored unit in SUV, per slice
    assert np.all(np.abs(suv - truth) <= 0.5 * step + 1e-6)
    significant = truth >= 0.5
    assert significant.sum() > 100
    rel = np.abs(suv[significant] - truth[significant]) / truth[significant]
    assert rel.max() < 1e-3


def _check_seg(ph: Phantom, seg_path: Path, sources: list[pydicom.Dataset], lesion_map: np.ndarray) -> None:
    seg = hd.seg.segread(seg_path)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.number_of_segments == len(ph.lesions)
    assert seg.StudyInstanceUID == ph.uids.study and seg.FrameOfReferenceUID == ph.uids.frame_of_reference
    source_uids = [d.SOPInstanceUID for d in sources]
    assert {u[2] for u in seg.get_source_image_uids()} <= set(source_uids)
    lib = load_library()
    for les in ph.lesions:
        desc = seg.get_segment_description(les.label)
        assert desc.tracking_uid == les.tracking_uid and desc.tracking_id == les.tracking_id
        assert desc.segmented_property_category.value == "49755003"
        assert desc.segmented_property_type.value == "52988006"
        assert desc.anatomic_regions[0].value == lib.site(les.site_id).code.value
        px = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[les.label],
                                               assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(px[..., 0].astype(bool), lesion_map == les.label)


def test_seg_on_pet_grid(ph: Phantom, study) -> None:
    _check_seg(ph, study.seg_path, _read_series(study.pet_paths), ph.pet_lesions.array)


def test_seg_on_ct_grid(ph: Phantom, tmp_path: Path) -> None:
    w = write_study(ph, tmp_path, seg_on="ct")
    _check_seg(ph, w.seg_path, _read_series(w.ct_paths), ph.ct_lesions.array)
    assert_dciodvfy_clean(w.seg_path)


def test_scout_is_a_separate_frame_of_reference(ph: Phantom, study) -> None:
    (path,) = study.scout_paths
    d = pydicom.dcmread(path)
    assert d.ImageType[2] == "LOCALIZER" and d.StudyInstanceUID == ph.uids.study
    assert d.FrameOfReferenceUID != ph.uids.frame_of_reference
    assert d.SeriesInstanceUID not in (ph.uids.ct_series, ph.uids.pet_series)
    assert_dciodvfy_clean(path)


def test_written_objects_validate(study) -> None:
    assert_dciodvfy_clean(study.ct_paths[len(study.ct_paths) // 2])
    assert_dciodvfy_clean(study.pet_paths[len(study.pet_paths) // 2])
    out = assert_dciodvfy_clean(study.seg_path)
    assert "Segmentation" in out


def test_write_is_deterministic(ph: Phantom, study, tmp_path: Path) -> None:
    again = write_study(ph, tmp_path, with_scout=True)
    for a, b in zip(study.paths, again.paths, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        if "PixelData" in da:
            assert da.PixelData == db.PixelData
    assert again.series_datetime == study.series_datetime and again.suv_scale_factor == study.suv_scale_factor


def test_cli_writes_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from training.phantom.cli import main

    assert main([str(tmp_path), "--seed", "4", "--size", "tiny", "--lesions", "1", "--site", "spleen",
                 "--scout"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == {"ct": 60, "pet": 30, "seg": 1, "scout": 1}
    assert [les["site_id"] for les in summary["lesions"]] == ["spleen"]
    assert len(list((tmp_path / "CT").glob("*.dcm"))) == 60
    assert pydicom.dcmread(tmp_path / "SEG" / "SEG_0001.dcm").StudyInstanceUID == summary["study_uid"]
