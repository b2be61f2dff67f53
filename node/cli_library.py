"""``locus library``: inspect and validate the anatomy knowledge base.

- ``locus library check [--path DIR]`` runs :func:`library.check.check_library` and exits 1
  listing every problem (file, entry, field) when the library is invalid.
- ``locus library show [SITE] [--json]`` prints the library summary, or one node (by Locus id or
  HCL-AL final string) with its codes, hierarchy and descriptions; ``--json`` for scripts.
- ``locus library report`` regenerates ``library/APPROXIMATE_SITES.md``.

The lead attaches :data:`library` to the ``locus`` group in ``node/cli.py``.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

import click

from library.anatomy import AnatomyLibrary, Code, Site, load_library
from library.check import check_library
from library.errors import LibraryError
from library.report import write_report

_path_option = click.option(
    "--path", "path", type=click.Path(exists=True, path_type=Path), default=None,
    help="Library directory (holding library.yaml); default: the shipped library.",
)


def _load(path: Path | None) -> AnatomyLibrary:
    try:
        return load_library(path)
    except LibraryError as exc:
        raise click.ClickException(f"{exc.message} [{exc.code}]") from exc


@click.group("library")
def library() -> None:
    """Anatomy knowledge base: coded sites, hierarchy, HCL-AL crosswalk."""


@library.command("check")
@_path_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def check_cmd(path: Path | None, as_json: bool) -> None:
    """Validate codes, identifiers, hierarchy, laterality, descriptions and the HCL-AL crosswalk."""
    report = check_library(path)
    if as_json:
        click.echo(json.dumps({
            "ok": report.ok, "version": report.version, "content_hash": report.content_hash,
            "stats": report.stats, "hclal": report.hclal_stats,
            "problems": [{"where": p.where, "message": p.message} for p in report.problems],
        }, indent=2))
    else:
        for p in report.problems:
            click.echo(f"ERROR {p}", err=True)
        if report.ok:
            s, h = report.stats, report.hclal_stats
            click.echo(f"anatomy library {report.version} OK: {s['regions']} regions, {s['coarse']} coarse "
                       f"locations, {s['sites']} sites ({s['approximate_sites']} approximate, "
                       f"{s['private_codes']} private codes); HCL-AL crosswalk: {h.get('finals', 0)} final strings, "
                       f"{h.get('coarse', 0)} coarse keys; hash {report.content_hash}")
        else:
            click.echo(f"anatomy library invalid: {len(report.problems)} problem(s)", err=True)
    sys.exit(0 if report.ok else 1)


def _code_text(code: Code | None) -> str:
    if code is None:
        return "-"
    origin = "private" if code.private else f"CID {code.cid}"
    return f"{code.scheme} {code.value} \"{code.meaning}\" ({origin})"


def _find(lib: AnatomyLibrary, key: str) -> Site:
    if key in lib.nodes:
        return lib.nodes[key]
    if lib.hclal is not None and key in lib.hclal.finals:
        return lib.hclal_site(key)
    if lib.hclal is not None and key in lib.hclal.coarse_nodes:
        return lib.hclal_coarse_node(key)
    by_name = [n for n in lib.nodes.values() if n.name.lower() == key.lower()]
    if by_name:
        return next((n for n in by_name if n.level == "site"), by_name[0])
    candidates = list(lib.nodes) + [n.name for n in lib.nodes.values()]
    close = difflib.get_close_matches(key, candidates, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise click.ClickException(f"no anatomical site {key!r}{hint}")


def _site_json(lib: AnatomyLibrary, node: Site) -> dict[str, Any]:
    out = node.as_dict()
    out["path"] = [p.id for p in reversed(lib.parents(node.id))]
    out["children"] = [c.id for c in lib.children(node.id)]
    if node.level == "site":
        out["finding_site"] = node.to_assignment().as_dict()
    if lib.hclal is not None:
        out["hclal_finals"] = [e.final for e in lib.hclal.entries if e.site_id == node.id]
        out["hclal_coarse_keys"] = [k for k, v in lib.hclal.coarse_nodes.items() if v == node.id]
    return out


def _summary_json(lib: AnatomyLibrary) -> dict[str, Any]:
    return {
        "name": lib.name, "version": lib.version, "content_hash": lib.content_hash,
        "counts": {"regions": len(lib.regions), "coarse": len(lib.coarse), "sites": len(lib.sites),
                   "approximate_sites": sum(1 for s in lib.sites if s.approximate),
                   "hclal_finals": len(lib.hclal.entries) if lib.hclal else 0},
        "regions": [{"id": r.id, "name": r.name,
                     "coarse": [{"id": c.id, "name": c.name, "sites": [s.id for s in lib.children(c.id)]}
                                for c in lib.children(r.id)]}
                    for r in lib.regions],
    }


@library.command("show")
@click.argument("site", required=False)
@_path_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(site: str | None, path: Path | None, as_json: bool) -> None:
    """Show the library, or one SITE (Locus id, name, or HCL-AL final string / coarse key)."""
    lib = _load(path)
    if site is None:
        if as_json:
            click.echo(json.dumps(_summary_json(lib), indent=2, ensure_ascii=False))
            return
        click.echo(f"{lib.name} {lib.version}  hash {lib.content_hash}")
        click.echo(f"{len(lib.regions)} regions, {len(lib.coarse)} coarse locations, {len(lib.sites)} sites")
        for r in lib.regions:
            coarse = lib.children(r.id)
            n_sites = sum(len(lib.children(c.id)) for c in coarse)
            click.echo(f"  {r.id:<16} {r.name:<20} {len(coarse):>3} coarse, {n_sites:>3} sites")
        return
    node = _find(lib, site)
    if as_json:
        click.echo(json.dumps(_site_json(lib, node), indent=2, ensure_ascii=False))
        return
    path_txt = " > ".join(p.name for p in reversed(lib.parents(node.id)))
    click.echo(f"{node.id}  ({node.level})")
    click.echo(f"  name:        {node.name}")
    if path_txt:
        click.echo(f"  within:      {path_txt}")
    click.echo(f"  location:    {_code_text(node.code)}")
    click.echo(f"  laterality:  {node.laterality.value}" +
               (f"  [{_code_text(node.laterality.code)}]" if node.laterality.code else ""))
    for m in node.modifiers:
        click.echo(f"  modifier:    {_code_text(m)}")
    if node.approximate:
        click.echo(f"  approximate: {node.approximation}")
    for d in node.descriptions:
        click.echo(f"  description: {d}")
    children = lib.children(node.id)
    if children:
        click.echo("  contains:    " + ", ".join(c.id for c in children))
    if lib.hclal is not None:
        finals = [e.final for e in lib.hclal.entries if e.site_id == node.id]
        keys = [k for k, v in lib.hclal.coarse_nodes.items() if v == node.id]
        if finals:
            click.echo("  HCL-AL:      " + ", ".join(repr(f) for f in finals))
        if keys:
            click.echo("  HCL-AL coarse: " + ", ".join(repr(k) for k in keys))


@library.command("report")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Where to write (default: library/APPROXIMATE_SITES.md).")
@_path_option
def report_cmd(output: Path | None, path: Path | None) -> None:
    """Regenerate the report of approximately coded sites."""
    out = write_report(_load(path), output)
    click.echo(f"wrote {out}")
