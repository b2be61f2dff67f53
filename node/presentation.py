"""Tables for people (rich); scripts use ``--json`` instead.

One lesion view for the demo, ``locus analyse`` and ``locus results``: the same columns,
the same rounding and the units always shown.  Text that comes from data (SEG labels,
site names, UCUM units such as ``g/ml{SUVbw}``, whose brackets rich would read as markup)
is escaped.  A table that does not fit the terminal (80 columns) is printed as one block
per lesion instead of being folded into unreadable columns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

#: What the label and site columns mean, printed under every lesion table.
LESION_LEGEND = ("label: the sender's SEG segment label; site: the location the localizer predicted "
                 "(— = not assessed); volume: the SEG segment's volume (not a threshold-based MTV)")


def wide_console() -> Console:
    """A console for tables: the terminal's width (or ``$COLUMNS`` when set), else 200 columns
    when output is redirected (rich would otherwise fold long site names into 80 columns in
    logs and CI output)."""
    explicit = os.environ.get("COLUMNS", "").isdigit()
    return Console(soft_wrap=False, highlight=False, width=None if sys.stdout.isatty() or explicit else 200)


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 study``, ``2 studies``: the count with the right form of the noun."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def fmt_number(value: float | None, digits: int = 2) -> str:
    """A measurement for people; "—" when it was not measured."""
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_hu(value: float | None) -> str:
    """Mean CT number, rounded the same way in every view (0.1 HU)."""
    return fmt_number(value, 1)


@dataclass(frozen=True)
class LesionView:
    """One lesion as the tables show it, whichever source (analysis JSON or database row)."""

    lesion_id: str
    segment: int | None
    label: str
    site: str | None
    suv_max: float | None
    suv_mean: float | None
    suv_peak: float | None
    suv_unit: str | None
    volume_ml: float | None
    tlg: float | None
    ct_mean_hu: float | None
    study_uid: str | None = None


def lesion_views_from_result(result: dict[str, Any]) -> list[LesionView]:
    """The lesions of an ``AnalysisResult.to_json()``."""
    unit = (result.get("suv") or {}).get("unit")
    bqml = (result.get("suv") or {}).get("kind") == "Bq/mL"
    views = []
    for les in result.get("lesions") or []:
        m = les.get("measurements") or {}
        site = lesion_site(les)
        views.append(LesionView(
            lesion_id=str(les["lesion_id"]), segment=les.get("segment_number"), label=les.get("segment_label") or "",
            site=None if site == "-" else site, suv_max=m.get("suv_max"), suv_mean=m.get("suv_mean"), suv_peak=m.get("suv_peak"),
            # TLG is an SUV quantity: not shown for Bq/ml fallback values (the SR omits it too).
            suv_unit=m.get("suv_unit") or unit, volume_ml=m.get("volume_ml"), tlg=None if bqml else m.get("tlg"),
            ct_mean_hu=m.get("ct_mean_hu"),
        ))
    return views


def _is_activity(unit: str) -> bool:
    """Whether a PET unit is an activity concentration (the Bq/ml fallback), not an SUV."""
    return unit.lower() == "bq/ml"


def _pet_names(views: Sequence[LesionView]) -> tuple[str, str, str]:
    """Names of the max/mean/peak columns: SUV, or activity for Bq/ml fallback values
    (PS3.16 DCM 110821: not SUVs, so not called SUV)."""
    units = {v.suv_unit for v in views if v.suv_unit}
    if units and all(_is_activity(u) for u in units):
        return "activity max", "activity mean", "activity peak"
    return "SUVmax", "SUVmean", "SUVpeak"


def _units(views: Sequence[LesionView]) -> tuple[str, str]:
    """(SUV unit, TLG unit) of a set of lesions: ``g/ml{SUVbw}`` and ``g`` (SUV in g/ml times ml)."""
    units = sorted({v.suv_unit for v in views if v.suv_unit})
    suv = " / ".join(units) or "SUV"
    tlg = "g" if units and all(u.startswith("g/ml") for u in units) else f"{suv}·ml"
    return suv, tlg


def lesion_table(views: Sequence[LesionView], *, title: str, with_study: bool = False) -> Table:
    """The wide layout: one row per lesion, units in the headers."""
    suv_unit, tlg_unit = _units(views)
    pmax, pmean, ppeak = _pet_names(views)
    table = Table(title=escape(title), caption=LESION_LEGEND, caption_justify="left")
    if with_study:
        table.add_column("Study Instance UID", no_wrap=True)
    for name, right in (("lesion", False), ("seg", True), ("label", False), ("site", False),
                        (f"{pmax}\n[{suv_unit}]", True), (pmean, True), (ppeak, True),
                        ("volume\n[ml]", True), (f"TLG\n[{tlg_unit}]", True), ("CT mean\n[HU]", True)):
        table.add_column(escape(name), justify="right" if right else "left")
    for v in views:
        table.add_row(
            *([v.study_uid or ""] if with_study else []),
            escape(v.lesion_id), "—" if v.segment is None else str(v.segment),
            # SEG labels come from the sender: escaped so brackets are shown, not read as markup
            escape(v.label), escape(v.site or "—"),
            fmt_number(v.suv_max), fmt_number(v.suv_mean), fmt_number(v.suv_peak), fmt_number(v.volume_ml),
            fmt_number(v.tlg), fmt_hu(v.ct_mean_hu),
        )
    return table


def _lesion_blocks(views: Sequence[LesionView], *, title: str, with_study: bool, console: Console) -> None:
    """The narrow layout: a few short labelled lines per lesion, nothing folded mid-word."""
    suv_unit, tlg_unit = _units(views)
    pmax, pmean, ppeak = _pet_names(views)
    console.print(escape(title), style="bold")
    for v in views:
        console.print(f"{escape(v.lesion_id)}  site: {escape(v.site or '—')}", style="bold")
        if with_study and v.study_uid:
            console.print(f"    study {v.study_uid}")
        seg = "" if v.segment is None else f"segment {v.segment} "
        console.print(f"    {seg}label: {escape(v.label)}")
        console.print(f"    {pmax} {fmt_number(v.suv_max)}  {pmean} {fmt_number(v.suv_mean)}  "
                      f"{ppeak} {fmt_number(v.suv_peak)} {escape(suv_unit)}")
        console.print(f"    volume {fmt_number(v.volume_ml)} ml  TLG {fmt_number(v.tlg)} {escape(tlg_unit)}  "
                      f"CT mean {fmt_hu(v.ct_mean_hu)} HU")
    console.print(LESION_LEGEND, style="dim")


def print_lesions(views: Sequence[LesionView], console: Console, *, title: str, with_study: bool = False) -> None:
    """Print lesions as a table when it fits the console, else as one block per lesion."""
    table = lesion_table(views, title=title, with_study=with_study)
    if not views:
        console.print(escape(title))
    elif fits(table, console):
        console.print(table)
    else:
        _lesion_blocks(views, title=title, with_study=with_study, console=console)


def fits(table: Table, console: Console) -> bool:
    """Whether ``table`` fits the console without folding or abbreviating any cell."""
    return Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width


def print_table(console: Console, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                no_wrap: Sequence[str] = (), right: Sequence[str] = ()) -> None:
    """A table when it fits the console, else one record per row: the first cell as a
    heading, then ``header value`` pairs that wrap between pairs, never inside a UID.

    Cells are rich markup: escape data (labels, names) before passing it.
    """
    table = Table(title=escape(title))
    for h in headers:
        table.add_column(escape(h), no_wrap=h in no_wrap, justify="right" if h in right else "left")
    for r in rows:
        table.add_row(*r)
    if not rows:  # the title says "0 ..."; an empty grid of squeezed headers says nothing more
        console.print(escape(title))
        return
    if fits(table, console):
        console.print(table)
        return
    console.print(escape(title), style="bold")
    for r in rows:
        console.print(r[0] if "UID" in headers[0] else f"{escape(headers[0])} {r[0]}", style="bold")
        line = ""
        for h, c in zip(headers[1:], r[1:], strict=True):  # pack whole pairs into lines
            pair = f"{escape(h)} {c}"
            candidate = f"{line}  {pair}" if line else f"    {pair}"
            if line and Text.from_markup(candidate).cell_len > console.width:
                console.print(line)
                candidate = f"    {pair}"
            line = candidate
        if line:
            console.print(line)


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
    views = lesion_views_from_result(result)
    print_lesions(views, console, title=f"Study {result.get('study_instance_uid')}: {plural(len(views), 'lesion')}")
    reason = no_report_reason(result)
    if reason is not None:
        console.print(f"[bold]no report[/bold]: {escape(reason)}")
    for flag in result.get("flags") or []:
        console.print(f"[yellow]{escape(flag['code'])}[/yellow]: {escape(flag['message'])}")
