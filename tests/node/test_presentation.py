"""Tables for people show sender-supplied text literally (rich markup is not interpreted)."""

from __future__ import annotations

import io

from rich.console import Console

from node.presentation import lesion_site, no_report_reason, print_lesion_table


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


def test_no_report_outcome_shows_its_reason_in_the_table() -> None:
    result = {"study_instance_uid": "1.2.3", "lesions": [],
              "flags": [{"code": "no_seg", "message": "the study holds no SEG object: no lesions to measure, no report"}]}
    out = io.StringIO()
    print_lesion_table(result, Console(file=out, width=200, color_system=None))
    assert "no report: no_seg: the study holds no SEG object" in out.getvalue()
    assert no_report_reason(result) == "no_seg: the study holds no SEG object: no lesions to measure, no report"
    assert no_report_reason({"flags": [{"code": "suv_fallback_bqml", "message": "x"}]}) is None


def test_results_show_gives_the_no_seg_reason_in_the_versions_table(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from node import cli_results
    from node.cli import main as locus_cli

    detail = {
        "study_uid": "1.2.3", "status": "analysed", "instances": 2, "first_received_at": None,
        "last_received_at": None, "has_late_instances": False, "series": [], "reports": [],
        "versions": [{"version": 1, "state": "ready", "completion_rule": "quiet", "ready_at": None, "instances": 2,
                      "analysis": {"status": "succeeded", "reason_code": None, "reason": None,
                                   "result": {"flags": [{"code": "no_seg", "message": "the study holds no SEG"}]}}}],
    }
    monkeypatch.setattr(cli_results.repo, "study_detail", lambda s, uid: detail)
    monkeypatch.setattr(cli_results.repo, "list_lesions", lambda s, uid: [])
    env = {"LOCUS_STORAGE__DATA_DIR": str(tmp_path)}
    out = CliRunner().invoke(locus_cli, ["results", "show", "1.2.3"], env=env)
    assert out.exit_code == 0, out.output
    assert "no_seg: the study holds no SEG" in out.output


def test_site_column_falls_back_to_the_segs_own_region() -> None:
    les = {"localization": None, "seg_anatomic_regions": [{"value": "10200004", "scheme": "SCT", "meaning": "Liver"}]}
    assert lesion_site(les) == "Liver (from the SEG)"
    assert lesion_site({"localization": {"site": {"name": "Lung"}}, "seg_anatomic_regions": []}) == "Lung"
    assert lesion_site({}) == "-"
