"""Reports name instances by UID only, never by server path (issue 12, defect 6).

An SR's notes once carried the spool path of an ignored instance
(``.../spool/<study>/<series>/<sop>.dcm``) to the PACS.  The path scan itself lives in
:mod:`tests.helpers.dicomcheck`, which every SR the suite writes goes through.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.cli_demo import SAMPLE_STUDY
from pipelines.analysis import analyse_study
from pipelines.dicom.inventory import take_inventory
from pipelines.sr.reader import read_measurement_report
from tests.helpers.dicomcheck import assert_dciodvfy_clean, assert_no_server_paths, path_like

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.parametrize("text", [
    "/var/lib/locus/spool/1.2.3/1.2.4/1.2.5.dcm: not an image (not_used)",
    "see '/srv/locus/reports/x.dcm'",
    "spool/1.2.3/1.2.4/1.2.5.dcm is a duplicate",
    r"C:\locus\spool\1.2.5.dcm",
    r"\\nas\share\study",
    "D:/spool/a",
    "(~/spool/x)",
    "/tmp/pytest-of-u/pytest-1/test_x0/a.dcm",
])
def test_path_like_values_are_found(text: str) -> None:
    assert path_like(text)


@pytest.mark.parametrize("text", [
    "g/ml{SUVbw}", "Bq/ml", "cm2/ml{SUVbsa}", "g/ml{SUVlbm(Janma)}",
    "SUV not computed (missing_radiopharmaceutical: no sequence); values are Bq/ml",
    "Units GML/CM2ML", "1/2 of the voxels", "https://github.com/oncoray/suv_computation",
    "SOP Instance 1.2.840.113619.2.55.3: not an image or SEG Locus analyses (not_used)",
    "lesions=segments", "tilt=resample", "pet_quantity=Bq/mL",
])
def test_legitimate_values_are_not_paths(text: str) -> None:
    assert path_like(text) == []


def _spool_study(root: Path) -> tuple[Path, str]:
    """The demo study laid out like the node's spool, plus a foreign instance and a junk file."""
    study = root / "spool" / "study"
    shutil.copytree(SAMPLE_STUDY, study)
    ct = pydicom.dcmread(sorted((study / "CT").glob("*.dcm"))[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.SeriesInstanceUID = generate_uid()
    folder = study / str(ct.SeriesInstanceUID)
    folder.mkdir()
    ct.save_as(folder / f"{ct.SOPInstanceUID}.dcm", enforce_file_format=True)
    (folder / "notes.dcm").write_bytes(b"operator notes, not DICOM")
    return study, str(ct.SOPInstanceUID)


def test_ignored_instances_are_named_by_uid_in_result_and_sr(tmp_path: Path) -> None:
    study, foreign_uid = _spool_study(tmp_path)
    inv = take_inventory([study])
    # the junk file is not DICOM, the secondary capture is not used (the demo study's README.md
    # is a document beside the instances: skipped, not reported)
    assert sorted(i.code for i in inv.ignored) == ["not_dicom", "not_used"]
    for item in inv.ignored:  # the path stays available locally, the reason never carries it
        assert Path(item.source).is_file()
        assert str(tmp_path) not in item.reason and not path_like(item.reason)
    r = analyse_study([study])
    ignored = [f.message for f in r.flags if f.code == "instance_ignored"]
    assert len(ignored) == 2
    assert any(m.startswith(f"SOP Instance {foreign_uid}:") for m in ignored)
    assert all(str(tmp_path) not in m and not path_like(m) for m in ignored)
    out = tmp_path / "sr.dcm"
    r.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)  # scans every text value of the SR for paths
    notes = read_measurement_report(out).notes
    assert [n.message for n in notes if n.code == "instance_ignored"] == ignored


def test_scan_catches_a_path_in_any_nested_text_value(tmp_path: Path) -> None:
    """The scan is not limited to the notes: a path anywhere in the content tree fails it."""
    study, _ = _spool_study(tmp_path)
    r = analyse_study([study])
    sr = r.sr_dataset
    assert_no_server_paths(sr)
    leaf = sr.ContentSequence[-1]
    while "ContentSequence" in leaf:
        leaf = leaf.ContentSequence[-1]
    leaf.TextValue = f"{study}/CT/1.dcm"
    with pytest.raises(AssertionError, match="server paths"):
        assert_no_server_paths(sr)
