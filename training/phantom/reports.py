"""Itemized phantom reports: one text item per lesion (or per site group) derived from ground truth.

ItemizedCLIP (Lyu et al., arXiv 2512.11141) is trained on *itemized* reports: every item
describes one independent finding, and a study whose only item is the normal statement is a
"normal" study (ItemizedCLIP, arXiv 2512.11141, training objectives, "normal check").  AFLoc- and CLEAR-style training
needs the same kind of text tied to ground-truth regions.  This module turns a phantom's
:class:`~training.phantom.lesions.LesionTruth` list into such a report, so every item knows
the lesion labels (in the phantom's lesion label maps) and the anatomy-library sites it
describes — what per-item AUC and the pointing game are scored against.

Rules:

* one item per lesion, or one per **site group** (the library's coarse location above the
  lesion's site, e.g. ``liver`` for Couinaud segment VII): ``grouping="lesion"`` /
  ``"group"``; ``"auto"`` (default) groups only the site groups holding ≥ 2 lesions, so a
  single lesion is always described by its own site;
* site words come from the anatomy library (the site's location description and name), not
  from the phantom's structure names, so the report speaks the vocabulary the SR uses;
* a lesion-free study gets exactly one item, the **normal item** ("No FDG-avid lesion.");
* several phrasings per item, rendered from versioned templates
  (``data/itemized_reports_v1.json``); the report picks one per item, and ``phrasings``
  keeps all of them for samplers that re-draw the wording every epoch;
* deterministic: the same lesions and seed give the same report, item order, wording and all.

The phrasings are synthetic, for phantom training; they are not validated clinical language.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from library import AnatomyLibrary, load_library
from training.phantom.lesions import LesionTruth

TEMPLATE_FILE = Path(__file__).resolve().parent / "data" / "itemized_reports_v1.json"
GROUPINGS = ("auto", "lesion", "group")
_COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight", 9: "Nine"}
NORMAL_KIND = "normal"


@dataclass(frozen=True)
class ReportTemplates:
    """The versioned phrasing templates (validated at load)."""

    name: str
    version: str
    normal: tuple[str, ...]
    lesion: dict[str, tuple[str, ...]]  # category ("default", "lymph_node", "bone", "lung") -> templates
    group: tuple[str, ...]
    sha256: str

    @property
    def stamp(self) -> str:
        return f"{self.name}/{self.version}"


@lru_cache(maxsize=4)
def load_templates(path: str | Path = TEMPLATE_FILE) -> ReportTemplates:
    """Read and check a template file: every list non-empty, ``default`` present, placeholders known."""
    raw = Path(path).read_bytes()
    doc: dict[str, Any] = json.loads(raw)
    known = {"where", "site", "group_where", "group", "suv", "size", "count", "bone_kind"}

    def texts(value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"report templates {Path(path).name}: {where} must be a non-empty list of strings")
        import string

        for v in value:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
            if names - known:
                raise ValueError(f"report templates {Path(path).name}: {where} uses unknown fields {sorted(names - known)}")
        return tuple(value)

    lesion = {str(k): texts(v, f"lesion.{k}") for k, v in dict(doc.get("lesion", {})).items()}
    if "default" not in lesion:
        raise ValueError(f"report templates {Path(path).name}: lesion.default is required")
    return ReportTemplates(name=str(doc["name"]), version=str(doc["version"]), normal=texts(doc.get("normal"), "normal"),
                           lesion=lesion, group=texts(doc.get("group"), "group"),
                           sha256=hashlib.sha256(raw).hexdigest())  # fmt: skip


@dataclass(frozen=True)
class ReportItem:
    """One report item and the ground truth it describes."""

    text: str  # the phrasing chosen for this report
    phrasings: tuple[str, ...]  # every rendering of this item (text is one of them)
    kind: str  # "lesion", "group" or "normal"
    lesion_labels: tuple[int, ...]  # lesion label values (SEG segment numbers); () for the normal item
    site_ids: tuple[str, ...]  # library site ids of those lesions (deduplicated, in lesion order)
    group_id: str | None  # library coarse location (site group); None for the normal item


@dataclass(frozen=True)
class ItemizedReport:
    """A study's itemized report; ``normal`` iff it is the single normal item (the §8 normal flag)."""

    items: tuple[ReportItem, ...]
    templates: str  # "<name>/<version>" of the templates used
    seed: int

    @property
    def normal(self) -> bool:
        return len(self.items) == 1 and self.items[0].kind == NORMAL_KIND

    def texts(self) -> list[str]:
        return [it.text for it in self.items]

    def text(self) -> str:
        """The report as one paragraph (items in order)."""
        return " ".join(self.texts())


def _lower_first(name: str) -> str:
    """Lower-case a site name's first letter unless it starts an acronym/level ("T7 vertebra" stays)."""
    if len(name) > 1 and name[0].isupper() and name[1].islower():
        return name[0].lower() + name[1:]
    return name


def _category(lesion: LesionTruth, group_id: str) -> str:
    if lesion.kind in ("lytic", "sclerotic"):
        return "bone"
    if "lymph" in lesion.site_id or "lymph" in group_id:
        return "lymph_node"
    if group_id.startswith("lung") or lesion.site_id.startswith("lung"):
        return "lung"
    return "default"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _group_of(library: AnatomyLibrary, site_id: str) -> str:
    """The site's coarse location id (its site group); the site itself when the library lacks it."""
    try:
        for node in library.parents(site_id):
            if node.level == "coarse":
                return node.id
    except Exception:
        return site_id
    return site_id


def _describe(library: AnatomyLibrary, node_id: str) -> tuple[str, str]:
    """(location description, name) of a library node, or a neutral wording for unknown ids."""
    try:
        node = library.site(node_id)
    except Exception:
        words = node_id.replace("_", " ")
        return f"in the {words}", words
    return node.description, _lower_first(node.name)


def itemize(lesions: Sequence[LesionTruth], seed: int, *, grouping: str = "auto",
            library: AnatomyLibrary | None = None, templates: ReportTemplates | None = None) -> ItemizedReport:
    """The itemized report of a study with ``lesions`` (ground truth), deterministic in ``seed``."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
    library = library or load_library()
    templates = templates or load_templates()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x1E7E5])
    if not lesions:
        k = int(rng.integers(len(templates.normal)))
        item = ReportItem(templates.normal[k], templates.normal, NORMAL_KIND, (), (), None)
        return ItemizedReport((item,), templates.stamp, int(seed))

    ordered = sorted(lesions, key=lambda les: les.label)
    groups: dict[str, list[LesionTruth]] = {}
    for les in ordered:
        groups.setdefault(_group_of(library, les.site_id), []).append(les)
    units: list[tuple[str, list[LesionTruth]]] = []  # (group id, lesions) per item, in first-lesion order
    for gid, members in groups.items():
        if grouping == "group" or (grouping == "auto" and len(members) >= 2):
            units.append((gid, members))
        else:
            units.extend((gid, [m]) for m in members)
    units.sort(key=lambda u: u[1][0].label)

    items = []
    for gid, members in units:
        group_where, group_name = _describe(library, gid)
        suv = max(m.suv for m in members)
        size = max(2.0 * max(m.radii_mm) for m in members)
        sites = tuple(dict.fromkeys(m.site_id for m in members))
        first = members[0]
        where, site_name = _describe(library, first.site_id)
        fields = {"where": where, "site": site_name, "group_where": group_where, "group": group_name,
                  "suv": f"{suv:.1f}", "size": f"{size:.0f}", "count": _COUNT_WORDS.get(len(members), str(len(members))),
                  "bone_kind": first.kind if first.kind in ("lytic", "sclerotic") else "osseous"}  # fmt: skip
        if len(members) >= 2:
            kind, pool = "group", templates.group
        else:
            kind = "lesion"
            pool = templates.lesion.get(_category(first, gid), templates.lesion["default"])
        phrasings = tuple(dict.fromkeys(_capitalise(t.format(**fields)) for t in pool))
        chosen = phrasings[int(rng.integers(len(phrasings)))]
        items.append(ReportItem(chosen, phrasings, kind, tuple(m.label for m in members), sites, gid))
    return ItemizedReport(tuple(items), templates.stamp, int(seed))


def phantom_report(phantom: Any, *, grouping: str = "auto", library: AnatomyLibrary | None = None) -> ItemizedReport:
    """The itemized report of a :class:`~training.phantom.generate.Phantom` (seeded by its own seed)."""
    return itemize(phantom.lesions, phantom.seed, grouping=grouping, library=library)


def sample_items(report: ItemizedReport, k: int, rng: np.random.Generator, *, placeholder: str = "Placeholder",
                 reword: bool = True) -> tuple[list[str], list[int], list[int]]:
    """Upstream's per-study item sampling (ItemizedCLIP, arXiv 2512.11141, training objectives, chest recipe): shuffle the
    items, truncate to ``k``, lower-case, pad with ``placeholder`` (mask 0).

    With ``reword`` each item's phrasing is re-drawn from its variants (phantom augmentation).
    Returns ``(texts[k], mask[k], item index into report.items or -1 for padding)``.
    """
    order = rng.permutation(len(report.items))[:k]
    texts, mask, index = [], [], []
    for i in order:
        item = report.items[int(i)]
        text = item.phrasings[int(rng.integers(len(item.phrasings)))] if reword else item.text
        texts.append(text.lower())
        mask.append(1)
        index.append(int(i))
    while len(texts) < k:
        texts.append(placeholder)
        mask.append(0)
        index.append(-1)
    return texts, mask, index
