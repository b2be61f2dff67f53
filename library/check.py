"""Validator for the anatomy library (``locus library check``).

Collects *every* problem with a precise location instead of stopping at the first, so that a
reviewer editing the YAML sees the whole list.  Checks:

- shape: every entry parses (ids snake_case, required fields, code mappings);
- identifiers unique across all region files;
- hierarchy: regions have no parent, coarse nodes sit under regions, sites under coarse nodes,
  no parent cycles, every node reachable from a region, no coarse node without sites;
- codes: every code resolves in pydicom's code dictionaries (``pydicom.sr._concepts_dict``) with
  the recorded meaning, and is a member of the recorded context group (``pydicom.sr._cid_dict``);
  ``99LOCUS`` codes only when flagged ``private: true`` (and never with a CID); a node that uses a
  private code or says ``approximate`` must explain why in ``approximation``;
- laterality: the value is one of left/right/bilateral/none and agrees with the name (a "Left ..."
  site is left, an unsided name is not sided), descriptions never name the opposite side, and a
  sided code meaning ("Left lobe of thyroid") agrees with the laterality;
- descriptions: unique across the library (retrieval inverts text -> site) and short enough for
  a 77-token CLIP text encoder;
- HCL-AL crosswalk: final strings unique, every final maps to an existing site, every coarse key
  to an existing node.

pydicom is imported lazily here (not in the loader) because only validation needs it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from library.anatomy import (
    ID_PATTERN,
    PRIVATE_SCHEME,
    Laterality,
    LibraryError,
    RawLibrary,
    Site,
    parse_code,
    parse_crosswalk,
    parse_node,
    read_raw,
)

#: Descriptions longer than this (in words) risk the 77-token limit of the CLIP text tower.
MAX_DESCRIPTION_WORDS = 40

_SIDE_WORDS = {"left": re.compile(r"\bleft\b", re.I), "right": re.compile(r"\bright\b", re.I)}


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class CheckReport:
    """Outcome of :func:`check_library`; ``ok`` when there are no problems."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    content_hash: str | None = None
    version: str | None = None
    hclal_stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))


class _CodeTables:
    """Index of pydicom's DICOM code dictionaries: (scheme, value) -> meanings, and CID members."""

    def __init__(self) -> None:
        from pydicom.sr._cid_dict import cid_concepts as _cid_concepts
        from pydicom.sr._concepts_dict import concepts as _concepts

        # pydicom's generated tables are annotated loosely; their layout is fixed by its generator.
        concepts = cast("dict[str, dict[str, dict[str, tuple[str, list[int]]]]]", _concepts)
        cid_concepts: dict[int, dict[str, list[str]]] = _cid_concepts

        self.meanings: dict[tuple[str, str], set[str]] = {}
        for scheme, by_keyword in concepts.items():
            for codes in by_keyword.values():
                for value, (meaning, _cids) in codes.items():
                    self.meanings.setdefault((scheme, value), set()).add(meaning)
        self.cid_members: dict[int, dict[tuple[str, str], set[str]]] = {}
        for cid, by_scheme in cid_concepts.items():
            members: dict[tuple[str, str], set[str]] = {}
            for scheme, keywords in by_scheme.items():
                for kw in keywords:
                    for value, (meaning, cids) in concepts.get(scheme, {}).get(kw, {}).items():
                        if cid in cids:
                            members.setdefault((scheme, value), set()).add(meaning)
            self.cid_members[cid] = members


_TABLES: _CodeTables | None = None


def _tables() -> _CodeTables:
    global _TABLES
    if _TABLES is None:
        _TABLES = _CodeTables()
    return _TABLES


def check_code(code: Any, where: str, report: CheckReport) -> bool:
    """Check one code mapping; returns True if it is private (``99LOCUS``)."""
    try:
        c = parse_code(code, where)
    except LibraryError as exc:
        report.add(where, _strip(exc.message, where))
        return False
    if c.scheme == PRIVATE_SCHEME:
        if not c.private:
            report.add(where, f"{PRIVATE_SCHEME} code {c.value!r} must be flagged 'private: true'")
        if c.cid is not None:
            report.add(where, f"private code {c.value!r} cannot come from a DICOM context group (remove 'cid')")
        return True
    if c.private:
        report.add(where, f"'private: true' is only allowed for {PRIVATE_SCHEME} codes, not {c.scheme}")
    tables = _tables()
    meanings = tables.meanings.get((c.scheme, c.value))
    if meanings is None:
        report.add(where, f"code {c.scheme} {c.value} ({c.meaning!r}) does not resolve in pydicom's code dictionaries")
        return False
    if c.cid is None:
        report.add(where, f"code {c.scheme} {c.value} must record the context group ('cid') it was taken from")
        return False
    members = tables.cid_members.get(c.cid)
    if members is None:
        report.add(where, f"CID {c.cid} does not exist in pydicom's context groups")
        return False
    if (c.scheme, c.value) not in members:
        report.add(where, f"code {c.scheme} {c.value} ({c.meaning!r}) is not a member of CID {c.cid}")
        return False
    if c.meaning not in members[(c.scheme, c.value)]:
        expected = " or ".join(repr(m) for m in sorted(members[(c.scheme, c.value)]))
        report.add(where, f"code {c.scheme} {c.value} has meaning {expected} in CID {c.cid}, not {c.meaning!r}")
    return False


def _check_laterality(node: Site, where: str, report: CheckReport) -> None:
    lat = node.laterality
    named = {side for side, rx in _SIDE_WORDS.items() if rx.search(node.name)}
    if lat in (Laterality.LEFT, Laterality.RIGHT):
        opposite = "right" if lat is Laterality.LEFT else "left"
        if lat.value not in named:
            report.add(where, f"laterality is {lat.value} but the name {node.name!r} does not say '{lat.value}'")
        if opposite in named:
            report.add(where, f"laterality is {lat.value} but the name {node.name!r} says '{opposite}'")
        for d in node.descriptions:
            if _SIDE_WORDS[opposite].search(d):
                report.add(where, f"laterality is {lat.value} but description {d!r} says '{opposite}'")
        if _SIDE_WORDS[opposite].search(node.code.meaning):
            report.add(where, f"laterality is {lat.value} but the code meaning {node.code.meaning!r} says '{opposite}'")
    elif lat is Laterality.NONE:
        if named:
            report.add(where, f"name {node.name!r} says '{sorted(named)[0]}' but laterality is none")
        side_in_code = {side for side, rx in _SIDE_WORDS.items() if rx.search(node.code.meaning)}
        if side_in_code:
            report.add(where, f"code meaning {node.code.meaning!r} is sided but laterality is none")
    elif lat is Laterality.BILATERAL and len(named) == 1:
        report.add(where, f"laterality is bilateral but the name {node.name!r} names one side")


def check_library(path: str | Path | None = None, *, raw: RawLibrary | None = None) -> CheckReport:
    """Validate the library at ``path`` (default: the shipped one) and return every problem found."""
    if raw is None:
        try:
            raw = read_raw(path)
        except LibraryError as exc:
            report = CheckReport(root=Path(path) if path else Path("."))
            report.add("library", exc.message)
            return report
    report = CheckReport(root=raw.root, content_hash=raw.content_hash(), version=raw.manifest.get("version"))
    if not isinstance(report.version, str) or not report.version:
        report.add("library.yaml", "'version' must be a non-empty string")

    nodes: dict[str, Site] = {}
    where_of: dict[str, str] = {}
    seen_ids: Counter[str] = Counter()
    for fn, level, i, entry in raw.entries():
        base = fn if level == "region" else f"{fn}: {'coarse' if level == 'coarse' else 'sites'}[{i}]"
        if entry is None:
            report.add(base, f"missing {level} entry")
            continue
        eid = entry.get("id") if isinstance(entry, dict) else None
        where = f"{base} '{eid}'" if isinstance(eid, str) else base
        if isinstance(eid, str) and ID_PATTERN.match(eid):
            seen_ids[eid] += 1
            if seen_ids[eid] > 1:
                report.add(where, f"duplicate id {eid!r} (first defined in {where_of[eid]})")
                continue
        # codes are checked on the raw mappings so that every bad code is reported
        private_used = False
        if isinstance(entry, dict):
            if "code" in entry:
                private_used |= check_code(entry["code"], f"{where}: code", report)
            mods = entry.get("modifiers", [])
            if isinstance(mods, list):
                for mi, m in enumerate(mods):
                    private_used |= check_code(m, f"{where}: modifiers[{mi}]", report)
        try:
            node = parse_node(entry, level, base)
        except LibraryError as exc:
            report.add(where, _strip(_strip(exc.message, where), base))
            continue
        nodes[node.id] = node
        where_of[node.id] = where
        if private_used and not node.approximate:
            report.add(where, f"uses a private {PRIVATE_SCHEME} code but is not marked 'approximate: true'")
        if node.approximate and not (node.approximation or "").strip():
            report.add(where, "is approximate but gives no 'approximation' reason")
        if not node.approximate and node.approximation:
            report.add(where, "has an 'approximation' reason but is not marked 'approximate: true'")
        _check_laterality(node, where, report)
        for d in node.descriptions:
            if len(d.split()) > MAX_DESCRIPTION_WORDS:
                report.add(where, f"description {d!r} has more than {MAX_DESCRIPTION_WORDS} words "
                                  "(CLIP text encoders accept 77 tokens)")
            if d != " ".join(d.split()):
                report.add(where, f"description {d!r} has leading, trailing or repeated whitespace")

    _check_hierarchy(nodes, where_of, report)
    _check_descriptions(nodes, where_of, report)
    _check_crosswalk(raw, nodes, report)

    levels = Counter(n.level for n in nodes.values())
    report.stats = {
        "regions": levels["region"],
        "coarse": levels["coarse"],
        "sites": levels["site"],
        "approximate_sites": sum(1 for n in nodes.values() if n.level == "site" and n.approximate),
        "private_codes": sum(1 for n in nodes.values() for c in (n.code, *n.modifiers) if c.private),
    }
    return report


def _check_hierarchy(nodes: dict[str, Site], where_of: dict[str, str], report: CheckReport) -> None:
    expected = {"coarse": "region", "site": "coarse"}
    for node in nodes.values():
        where = where_of[node.id]
        if node.level == "region":
            continue
        parent = nodes.get(node.parent or "")
        if parent is None:
            report.add(where, f"parent {node.parent!r} does not exist")
        elif parent.level != expected[node.level]:
            report.add(where, f"a {node.level} must sit under a {expected[node.level]}, but parent "
                              f"{parent.id!r} is a {parent.level}")
    # cycles and reachability: follow parent links from every node
    for node in nodes.values():
        path = [node.id]
        current = node
        while current.parent is not None:
            if current.parent in path:
                cycle = " -> ".join([*path[path.index(current.parent):], current.parent])
                report.add(where_of[node.id], f"hierarchy cycle {cycle}")
                break
            nxt = nodes.get(current.parent)
            if nxt is None:
                report.add(where_of[node.id], f"not reachable from any region (chain {' -> '.join(path)} "
                                              f"stops at missing {current.parent!r})")
                break
            path.append(nxt.id)
            current = nxt
        else:
            if current.level != "region":
                report.add(where_of[node.id], f"not reachable from any region (top of chain is {current.level} {current.id!r})")
    has_child = {n.parent for n in nodes.values() if n.parent}
    for node in nodes.values():
        if node.level != "site" and node.id not in has_child:
            report.add(where_of[node.id], f"{node.level} {node.id!r} has no children")


def _strip(message: str, prefix: str) -> str:
    """Drop a location prefix that the caller reports separately."""
    return message[len(prefix) + 2:] if message.startswith(prefix + ": ") else message


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _check_descriptions(nodes: dict[str, Site], where_of: dict[str, str], report: CheckReport) -> None:
    owner: dict[str, str] = {}
    for node in nodes.values():
        for d in node.descriptions:
            key = _norm(d)
            if key in owner:
                report.add(where_of[node.id], f"description {d!r} duplicates one of {owner[key]!r} "
                                              "(retrieval needs unique descriptions)")
            else:
                owner[key] = node.id


def _check_crosswalk(raw: RawLibrary, nodes: dict[str, Site], report: CheckReport) -> None:
    fn = raw.manifest.get("hclal_crosswalk")
    if fn is None:
        return
    try:
        cw = parse_crosswalk(raw.files.get(fn), fn)
    except LibraryError as exc:
        report.add(fn, _strip(exc.message, fn))
        return
    finals = Counter(e.final for e in cw.entries)
    for final, n in finals.items():
        if n > 1:
            report.add(fn, f"HCL-AL final string {final!r} appears {n} times")
    pairs = Counter((e.coarse_key, e.fine_word) for e in cw.entries)
    for (ck, fw), n in pairs.items():
        if n > 1:
            report.add(fn, f"HCL-AL fine word {fw!r} appears {n} times under coarse key {ck!r}")
    for e in cw.entries:
        target = nodes.get(e.site_id)
        if target is None:
            report.add(fn, f"HCL-AL final {e.final!r} maps to unknown site {e.site_id!r}")
        elif target.level != "site":
            report.add(fn, f"HCL-AL final {e.final!r} maps to {e.site_id!r}, a {target.level}, not a site")
        else:
            _check_hclal_side(fn, e.final, target, report)
    for key, node_id in cw.coarse_nodes.items():
        if node_id not in nodes:
            report.add(fn, f"HCL-AL coarse key {key!r} maps to unknown node {node_id!r}")
    report.hclal_stats = {
        "regions": len({e.region for e in cw.entries}),
        "coarse": len(cw.coarse_nodes),
        "finals": len(finals),
    }


def _check_hclal_side(fn: str, final: str, site: Site, report: CheckReport) -> None:
    """An HCL-AL string that names a side ("Left ilium", "Rib L5") must map to a site of that side."""
    side = None
    if _SIDE_WORDS["left"].search(final) or re.search(r"\bRib L\d", final):
        side = "left"
    elif _SIDE_WORDS["right"].search(final) or re.search(r"\bRib R\d", final):
        side = "right"
    if side is not None and site.laterality.value != side:
        report.add(fn, f"HCL-AL final {final!r} is {side}-sided but maps to {site.id!r} with laterality {site.laterality.value}")
