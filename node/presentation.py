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


def print_lesion_table(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the lesions of an ``AnalysisResult.to_json()`` plus its flags."""
    console = console or wide_console()
    suv = result.get("suv") or {}
    unit = suv.get("unit") or "SUV"
    # Bq/ml fallback (no SUV): the values are activity concentrations and are named so;
    # TLG is an SUV quantity and is not shown (the SR omits it too).
    bqml = suv.get("kind") == "Bq/mL"
    pet_cols = ((f"activity max [{unit}]", "activity mean", "activity peak") if bqml
                else (f"SUVmax [{unit}]", "SUVmean", "SUVpeak"))
    table = Table(title=f"Study {result.get('study_instance_uid')}: {len(result.get('lesions') or [])} lesion(s)")
    for col in ("lesion", "segment", "label", *pet_cols, "MTV [ml]", "TLG", "CT HU", "site"):
        table.add_column(col)
    for les in result.get("lesions") or []:
        m = les["measurements"]
        loc = les.get("localization") or {}
        site = (loc.get("site") or {}).get("name") or loc.get("final_label") or "-"
        table.add_row(
            # SEG labels come from the sender: escaped so brackets are shown, not read as markup
            les["lesion_id"], str(les["segment_number"]), escape(les.get("segment_label") or ""),
            _fmt(m.get("suv_max")), _fmt(m.get("suv_mean")), _fmt(m.get("suv_peak")), _fmt(m.get("volume_ml")),
            _fmt(None if bqml else m.get("tlg")), _fmt(m.get("ct_mean_hu"), 1), escape(site),
        )
    console.print(table)
    for flag in result.get("flags") or []:
        console.print(f"[yellow]{escape(flag['code'])}[/yellow]: {escape(flag['message'])}")
