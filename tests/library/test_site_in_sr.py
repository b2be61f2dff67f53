"""A coded library site becomes a valid TID 300 Finding Site in a TID 1500 SR (dciodvfy-clean).

The SR is built directly with highdicom (the production builder lives in pipelines/sr) around a
real single-segment SEG from the highdicom test files, using the single-segment workaround of
PS3.16 TID 1419.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from library.anatomy import Code, Site, load_library
from tests.helpers.dicomcheck import assert_dciodvfy_clean


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def finding_site(site: Site) -> list[hd.sr.FindingSite]:
    """One FindingSite carrying the location, CID 244 laterality and every topographical modifier.

    highdicom's FindingSite takes a single topographical modifier, so a site with several
    modifiers is written as one FindingSite per modifier (PS3.16 TID 1419 allows 1-n Finding Sites).
    """
    coding = site.to_assignment()
    laterality = _concept(coding.laterality) if coding.laterality else None
    location = _concept(coding.code)
    mods = coding.modifiers or (None,)
    return [hd.sr.FindingSite(anatomic_location=location, laterality=laterality,
                              topographical_modifier=_concept(m) if m else None) for m in mods]


def _referenced_segment(seg: hd.seg.Segmentation, number: int) -> hd.sr.ReferencedSegment:
    try:
        return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
    except AttributeError:  # single-segment SEG (PS3.3 §C.8.20.2)
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        )


@pytest.fixture(scope="module")
def seg_and_sources(data_dir: Path) -> tuple[hd.seg.Segmentation, list[pydicom.Dataset]]:
    base = data_dir / "seg-sr-highdicom-smallct"
    seg = hd.seg.segread(base / "seg" / "seg_image_ct_binary.dcm")
    assert seg.number_of_segments == 1  # the fixture must exercise the single-segment path
    sources = [pydicom.dcmread(p) for p in sorted((base / "ct2_pydicom").iterdir())]
    return seg, sources


def test_rib_and_liver_segment_sites_in_tid1500_sr(tmp_path: Path, seg_and_sources) -> None:
    seg, sources = seg_and_sources
    lib = load_library()
    rib = lib.hclal_site("Rib R5")
    liver = lib.hclal_site("Liver S7")
    spinous = lib.hclal_site("Spinous process of vertebra T5")
    assert rib.laterality.value == "right" and rib.modifiers
    assert liver.code.cid == 7170

    groups = []
    for i, site in enumerate((rib, liver, spinous), start=1):
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"Lesion {i}", uid=hd.UID()),
            referenced_segment=_referenced_segment(seg, 1),
            finding_type=codes.SCT.Lesion,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            finding_sites=finding_site(site),
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=1.5, unit=codes.UCUM.CubicMillimeter)],
        ))
    observer = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="locus-test")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=observer))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=codes.SCT.PETCTFDGImagingOfWholeBody,
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=[seg, *sources], content=report, series_instance_uid=hd.UID(),
                                 series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
                                 manufacturer="Locus tests", is_complete=True)
    out = tmp_path / "sr.dcm"
    sr.save_as(out)
    assert_dciodvfy_clean(out)

    # read back: the coded site, laterality and modifiers survive exactly
    parsed = hd.sr.srread(out)
    read_groups = parsed.content.get_volumetric_roi_measurement_groups()
    assert len(read_groups) == 3
    rib_sites = read_groups[0].finding_sites
    assert rib_sites[0].value == hd.sr.CodedConcept("113197003", "SCT", "Rib")
    assert rib_sites[0].laterality == codes.SCT.Right
    assert rib_sites[0].topographical_modifier == hd.sr.CodedConcept("RIB-05", "99LOCUS", "Fifth rib")
    liver_sites = read_groups[1].finding_sites
    assert liver_sites[0].value == codes.cid7170.CouinaudHepaticSegmentVII
    assert liver_sites[0].laterality is None and liver_sites[0].topographical_modifier is None
    t5 = read_groups[2].finding_sites
    assert t5[0].value == hd.sr.CodedConcept("55678000", "SCT", "Spinous process of vertebra")
    assert t5[0].topographical_modifier == codes.cid7603.T5Vertebra


def test_every_site_builds_a_finding_site() -> None:
    """highdicom accepts the coding of every site (code lengths, schemes, meanings)."""
    lib = load_library()
    for site in lib.sites:
        items = finding_site(site)
        assert items and all(item.value.value == site.code.value for item in items), site.id
