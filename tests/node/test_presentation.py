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


def _result(label: str = "Lesion 1 (Para-aortic mediastinal lymph nodes (station 6))") -> dict:  # type: ignore[type-arg]
    return {
        "study_instance_uid": "2.25.145141135922610682435115719206438308342",
        "suv": {"unit": "g/ml{SUVbw}"},
        "lesions": [{
            "lesion_id": f"S{i}", "segment_number": i, "segment_label": label,
            "measurements": {"suv_max": 10.444, "suv_mean": 10.01, "suv_peak": 9.6, "volume_ml": 3.32,
                             "tlg": 33.23, "ct_mean_hu": 66.46},
            "localization": {"site": {"name": "Para-aortic mediastinal lymph nodes (station 6)"}},
        } for i in (1, 2)],
        "flags": [],
    }


def _render(result: dict, width: int) -> str:  # type: ignore[type-arg]
    out = io.StringIO()
    print_lesion_table(result, Console(file=out, width=width, color_system=None, soft_wrap=False, highlight=False))
    return out.getvalue()


def test_lesions_at_80_columns_are_blocks_with_units_and_nothing_folded() -> None:
    text = _render(_result(), 80)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "…" not in text  # nothing abbreviated away
    assert "S1  site: Para-aortic mediastinal lymph nodes (station 6)" in text
    assert "segment 1 label: Lesion 1 (Para-aortic mediastinal lymph nodes (station 6))" in text
    assert "SUVmax 10.44  SUVmean 10.01  SUVpeak 9.60 g/ml{SUVbw}" in text
    assert "volume 3.32 ml  TLG 33.23 g  CT mean 66.5 HU" in text
    assert "2 lesions" in text and "label: the sender's SEG segment label" in text


def test_lesions_at_200_columns_are_a_table_with_units_in_the_headers() -> None:
    text = _render(_result(), 200)
    assert "┃" in text and "…" not in text
    for unit in ("[g/ml{SUVbw}]", "[ml]", "[g]", "[HU]"):
        assert unit in text
    assert "66.5" in text and "MTV [" not in text and "volume" in text
    assert "site: the location the localizer predicted" in text


def test_hu_rounding_and_singular_are_shared() -> None:
    from node.presentation import fmt_hu, plural

    assert fmt_hu(66.46) == "66.5" and fmt_hu(None) == "—"
    assert (plural(1, "study", "studies"), plural(2, "study", "studies"), plural(1, "lesion")) == \
        ("1 study", "2 studies", "1 lesion")
    one = _result()
    one["lesions"] = one["lesions"][:1]
    assert "1 lesion" in _render(one, 200) and "1 lesions" not in _render(one, 200)


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
    monkeypatch.setattr(cli_results.repo, "study_exists", lambda s, uid: True)
    env = {"LOCUS_STORAGE__DATA_DIR": str(tmp_path)}
    created = CliRunner().invoke(locus_cli, ["db", "upgrade"], env=env)  # queries never create a database
    assert created.exit_code == 0, created.output
    out = CliRunner().invoke(locus_cli, ["results", "show", "1.2.3"], env=env)
    assert out.exit_code == 0, out.output
    assert "no_seg: the study holds no SEG" in out.output


def test_site_column_falls_back_to_the_segs_own_region() -> None:
    les = {"localization": None, "seg_anatomic_regions": [{"value": "10200004", "scheme": "SCT", "meaning": "Liver"}]}
    assert lesion_site(les) == "Liver (from the SEG)"
    assert lesion_site({"localization": {"site": {"name": "Lung"}}, "seg_anatomic_regions": []}) == "Lung"
    assert lesion_site({}) == "-"


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
    assert "activity max" in text and "[Bq/ml]" in text and "activity peak" in text
    assert "SUVmax" not in text and "SUVpeak" not in text
    assert "41234.50" in text and "30000.38" not in text  # TLG is not shown in Bq/ml
    narrow = io.StringIO()
    print_lesion_table(result, Console(file=narrow, width=80, color_system=None))
    assert "activity max 41234.50" in narrow.getvalue() and "SUVmax" not in narrow.getvalue()
