"""CLEAR's lesion-location labels from the anatomy library, as versioned data (``data/clear_locations.yaml``).

CLEAR's lesion-location task is 8-way multi-label in this order: bone, abdomen, mediastinum,
liver, lung, kidney, soft tissue, pelvis (CLEAR, Ligero et al., MICCAI 2025).  Locus derives a study's labels
from the coded sites of its lesions: a rule maps a library node (region, coarse location or
site) to one label or to ``null`` (explicitly unmapped); the most specific rule on the
site's path wins.  :func:`load_location_map` refuses a mapping that names unknown nodes or
labels, or that leaves any library site neither mapped nor explicitly unmapped — so a new
site added to the library cannot silently drop out of training labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from library.anatomy import DATA_DIR, AnatomyLibrary, load_library
from library.errors import LibraryError

MAP_FILE = DATA_DIR / "clear_locations.yaml"
CLEAR_LABELS = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis")


@dataclass(frozen=True)
class LocationMap:
    """A validated label mapping; ``content_hash`` identifies it in trained heads."""

    name: str
    version: str
    labels: tuple[str, ...]
    rules: dict[str, str | None]
    content_hash: str
    library: AnatomyLibrary

    def _rule_for(self, site_id: str) -> tuple[bool, str | None]:
        node = self.library.site(site_id)
        for n in (node, *self.library.parents(site_id)):
            if n.id in self.rules:
                return True, self.rules[n.id]
        return False, None

    def label_of(self, site_id: str) -> str | None:
        """The label of a site (or any node), ``None`` when explicitly unmapped."""
        found, label = self._rule_for(site_id)
        if not found:
            raise LibraryError(f"site {site_id!r} has no CLEAR location rule", code="clear_location_unmapped")
        return label

    def multi_hot(self, site_ids: Iterable[str]) -> list[int]:
        """A study's label vector (``labels`` order) from the sites of its lesions."""
        out = [0] * len(self.labels)
        for s in site_ids:
            label = self.label_of(s)
            if label is not None:
                out[self.labels.index(label)] = 1
        return out

    def stamp(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "content_hash": self.content_hash,
                "anatomy_library": self.library.content_hash}  # fmt: skip


def check_map(doc: object, library: AnatomyLibrary) -> list[str]:
    """Problems of a parsed mapping document against ``library`` (empty list: valid)."""
    if not isinstance(doc, dict):
        return ["mapping file is not a YAML mapping"]
    problems = []
    labels = doc.get("labels")
    if not isinstance(labels, list) or tuple(labels) != CLEAR_LABELS:
        problems.append(f"labels must be CLEAR's {list(CLEAR_LABELS)} in that order, got {labels!r}")
    rules = doc.get("rules")
    if not isinstance(rules, dict):
        return [*problems, "'rules' must map node ids to a label or null"]
    for node_id, label in rules.items():
        if node_id not in library.nodes:
            problems.append(f"rule for unknown anatomy node {node_id!r}")
        if label is not None and label not in CLEAR_LABELS:
            problems.append(f"rule {node_id!r} → unknown label {label!r}")
    for site in library.sites:
        if not any(n.id in rules for n in (site, *library.parents(site.id))):
            problems.append(f"site {site.id!r} is neither mapped nor explicitly unmapped")
    if not isinstance(doc.get("version"), str):
        problems.append("'version' must be a string")
    return problems


def load_location_map(path: str | Path | None = None, library: AnatomyLibrary | None = None) -> LocationMap:
    """Read and validate the mapping (default: the shipped file against the shipped library)."""
    p = Path(path) if path is not None else MAP_FILE
    try:
        raw = p.read_bytes()
        doc = yaml.safe_load(raw)
    except FileNotFoundError as exc:
        raise LibraryError(f"CLEAR location map missing: {p.name}", code="library_file_missing") from exc
    except yaml.YAMLError as exc:
        raise LibraryError(f"{p.name}: not valid YAML: {exc}", code="library_format") from exc
    lib = library if library is not None else load_library()
    problems = check_map(doc, lib)
    if problems:
        raise LibraryError(f"{p.name}: " + "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)"
                           if len(problems) > 10 else ""), code="clear_location_map_invalid")  # fmt: skip
    assert isinstance(doc, dict)
    return LocationMap(name=str(doc.get("name", "clear-lesion-locations")), version=str(doc["version"]),
                       labels=CLEAR_LABELS, rules=dict(doc["rules"]), content_hash=hashlib.sha256(raw).hexdigest(),
                       library=lib)  # fmt: skip
