"""Tables for people (rich); scripts use ``--json`` instead."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def wide_console() -> Console:
    """A console for tables: the terminal's width, or 200 columns when output is redirected
    (rich would otherwise fold long site names into 80 columns in logs and CI output)."""
    return Console(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() else 200)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


#: Result flags that mean "analysed, but no report": shown wherever the outcome is shown.
NO_REPORT_FLAGS = ("no_seg", "no_lesions")


def no_report_reason(result: dict[str, Any] | None) -> str | None:
    """Why an analysed study has no report (e.g. ``no_seg: …``), or None when it has one or failed."""
    for flag in (result or {}).get("flags") or []:
        if flag.get("code") in NO_REPORT_FLAGS:
            return f"{flag['code']}: {flag.get('message', '')}"
    return None


def lesion_site(les: dict[str, Any]) -> str:
    """The site shown for a lesion: the localizer's, else the SEG's own region (marked), else "-"."""
    loc = les.get("localization") or {}
    site = (loc.get("site") or {}).get("name") or loc.get("final_label")
    if site:
        return str(site)
    regions = [r.get("meaning") for r in les.get("seg_anatomic_regions") or [] if r.get("meaning")]
    return f"{', '.join(regions)} (from the SEG)" if regions else "-"


def print_lesion_table(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the lesions of an ``AnalysisResult.to_json()`` plus its flags."""
    console = console or wide_console()
    suv = result.get("suv") or {}
    unit = suv.get("unit") or "SUV"
    table = Table(title=f"Study {result.get('study_instance_uid')}: {len(result.get('lesions') or [])} lesion(s)")
    for col in ("lesion", "segment", "label", f"SUVmax [{unit}]", "SUVmean", "SUVpeak", "MTV [ml]", "TLG",
                "CT HU", "site"):
        table.add_column(col)
    for les in result.get("lesions") or []:
        m = les["measurements"]
        site = lesion_site(les)
        table.add_row(
            # SEG labels come from the sender: escaped so brackets are shown, not read as markup
            les["lesion_id"], str(les["segment_number"]), escape(les.get("segment_label") or ""),
            _fmt(m.get("suv_max")), _fmt(m.get("suv_mean")), _fmt(m.get("suv_peak")), _fmt(m.get("volume_ml")),
            _fmt(m.get("tlg")), _fmt(m.get("ct_mean_hu"), 1), escape(site),
        )
    console.print(table)
    reason = no_report_reason(result)
    if reason is not None:
        console.print(f"[bold]no report[/bold]: {escape(reason)}")
    for flag in result.get("flags") or []:
        console.print(f"[yellow]{escape(flag['code'])}[/yellow]: {escape(flag['message'])}")
