"""Tables for people show sender-supplied text literally (rich markup is not interpreted)."""

from __future__ import annotations

import io

from rich.console import Console

from node.presentation import print_lesion_table


def test_seg_labels_with_brackets_are_shown_not_interpreted() -> None:
    # A SEG segment label is free text from the sending modality; "[red]" or "[/]" in it must
    # neither vanish nor break the table (rich would read it as markup and raise on "[/]").
    result = {
        "study_instance_uid": "1.2.3",
        "suv": {"unit": "g/ml{SUVbw}"},
        "lesions": [{
            "lesion_id": "S1", "segment_number": 1, "segment_label": "node [red]L2[/] (level [II])",
            "measurements": {"suv_max": 5.0, "suv_mean": 3.0, "suv_peak": 4.0, "volume_ml": 1.5,
                             "tlg": 4.5, "ct_mean_hu": 30.0},
            "localization": {"site": {"name": "Level [II] nodes"}},
        }],
        "flags": [{"code": "instance_ignored", "message": "/spool/[x]/a.dcm: not DICOM"}],
    }
    out = io.StringIO()
    print_lesion_table(result, Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert "node [red]L2[/] (level [II])" in text
    assert "Level [II] nodes" in text
    assert "/spool/[x]/a.dcm: not DICOM" in text


def test_bqml_fallback_names_activity_not_suv() -> None:
    """Issue 12, defect 3: without SUV the values are Bq/ml activity, not SUVmax, and no TLG."""
    result = {
        "study_instance_uid": "1.2.3",
        "suv": {"kind": "Bq/mL", "unit": "Bq/ml"},
        "lesions": [{
            "lesion_id": "S1", "segment_number": 1, "segment_label": "lesion",
            "measurements": {"suv_max": 41234.5, "suv_mean": 20000.25, "suv_peak": 30000.0, "volume_ml": 1.5,
                             "tlg": 30000.375, "ct_mean_hu": None},
        }],
        "flags": [{"code": "suv_fallback_bqml", "message": "SUV not computed (missing_radiopharmaceutical)"}],
    }
    out = io.StringIO()
    print_lesion_table(result, Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    assert "activity max [Bq/ml]" in text and "activity peak" in text and "SUV" not in text.split("suv_fallback")[0]
    assert "41234.50" in text and "30000.38" not in text  # TLG is not shown in Bq/ml
    assert "suv_fallback_bqml" in text
