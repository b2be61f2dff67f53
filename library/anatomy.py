"""Typed loader for the Locus anatomy knowledge base (``library/data``).

The knowledge base is a three-level hierarchy, region -> coarse location -> site, stored as
human-reviewable YAML (one file per region, one entry per node; see ``data/library.yaml``).
Every node carries a coded anatomic location taken from the DICOM context groups (PS3.16 CIDs
such as 4, 7151/7192, 7600, 7603, 7170) so that a localizer result can be written as a coded
Finding Site (TID 300 row "Finding Site", SCT 363698007, with laterality from CID 244 and
topographical modifiers from CID 2) in a TID 1500 SR.  Where no exact concept exists the node
uses the nearest parent concept plus modifiers and says so (``approximate``/``approximation``);
private ``99LOCUS`` codes are allowed only where the DICOM tables hold no concept at all.

Why a package of its own: ``library`` is pure data + thin loaders, imports nothing of Locus and
no DICOM I/O, so training code, pipelines and the node can all depend on it.  The coded values
are therefore plain frozen dataclasses (:class:`Code`, :class:`SiteCoding`) that ``pipelines``
converts to its own ``CodedValue``/``SiteAssignment``.

Loading parses YAML with libyaml when available and builds indexes once; the whole library
loads in a few tens of milliseconds.  Semantic validation against pydicom's code dictionaries
lives in :mod:`library.check` (``locus library check``) so that loading stays fast.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from library.errors import LibraryError

try:  # libyaml is ~10x faster than the pure-Python parser
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader

#: Directory holding the shipped library (``library.yaml`` + region files + crosswalk).
DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST_NAME = "library.yaml"

PRIVATE_SCHEME = "99LOCUS"
ID_PATTERN = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
LEVELS = ("region", "coarse", "site")


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Table 8.8-1 Code Sequence Macro) plus where it was taken from.

    ``cid`` is the DICOM context group the code was taken from (None for private codes);
    ``private`` marks a ``99LOCUS`` code used because no standard concept exists.
    """

    scheme: str
    value: str
    meaning: str
    cid: int | None = None
    private: bool = False

    def as_dict(self) -> dict[str, str]:
        """Value/scheme/meaning in the shape of ``pipelines.findings.CodedValue.to_json``."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


class Laterality(str, enum.Enum):
    """Laterality of a site; coded with CID 244 (Laterality) in the SR."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    NONE = "none"

    @property
    def code(self) -> Code | None:
        return LATERALITY_CODES.get(self)


#: CID 244 "Laterality" (SNOMED CT); ``none`` is not coded (the Finding Site omits laterality).
LATERALITY_CODES: dict[Laterality, Code] = {
    Laterality.LEFT: Code("SCT", "7771000", "Left", 244),
    Laterality.RIGHT: Code("SCT", "24028007", "Right", 244),
    Laterality.BILATERAL: Code("SCT", "51440002", "Bilateral", 244),
}


@dataclass(frozen=True)
class SiteCoding:
    """Coded anatomic site for an SR Finding Site, field-for-field like ``SiteAssignment``.

    ``pipelines`` builds its ``SiteAssignment`` from this (``library`` may not import pipelines):
    ``SiteAssignment(site_id, name, CodedValue(**code.as_dict()), laterality and CodedValue(...),
    tuple(CodedValue(**m.as_dict()) for m in modifiers), approximate)``.
    """

    site_id: str
    name: str
    code: Code
    laterality: Code | None
    modifiers: tuple[Code, ...]
    approximate: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain data in the JSON shape of ``pipelines.findings.SiteAssignment``."""
        return {
            "site_id": self.site_id,
            "name": self.name,
            "code": self.code.as_dict(),
            "laterality": self.laterality.as_dict() if self.laterality else None,
            "modifiers": [m.as_dict() for m in self.modifiers],
            "approximate": self.approximate,
        }


@dataclass(frozen=True)
class Site:
    """One node of the hierarchy: a region, a coarse location or a (final) site."""

    id: str
    name: str
    level: str  # "region" | "coarse" | "site"
    parent: str | None
    laterality: Laterality
    code: Code
    modifiers: tuple[Code, ...]
    descriptions: tuple[str, ...]
    approximate: bool = False
    approximation: str | None = None
    source: str = ""  # region file the entry came from, for messages

    @property
    def description(self) -> str:
        """The primary location description (used as the retrieval text)."""
        return self.descriptions[0]

    def to_assignment(self) -> SiteCoding:
        """Coded values for a Finding Site: location, laterality (CID 244), modifiers (CID 2 etc.)."""
        return SiteCoding(
            site_id=self.id,
            name=self.name,
            code=self.code,
            laterality=self.laterality.code,
            modifiers=self.modifiers,
            approximate=self.approximate,
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "level": self.level,
            "parent": self.parent,
            "laterality": self.laterality.value,
            "code": _code_json(self.code),
            "modifiers": [_code_json(m) for m in self.modifiers],
            "approximate": self.approximate,
            "approximation": self.approximation,
            "descriptions": list(self.descriptions),
        }
        return out


def _code_json(code: Code) -> dict[str, Any]:
    out: dict[str, Any] = {"scheme": code.scheme, "value": code.value, "meaning": code.meaning}
    if code.cid is not None:
        out["cid"] = code.cid
    if code.private:
        out["private"] = True
    return out


@dataclass(frozen=True)
class HclAlCrosswalkEntry:
    """One HCL-AL (region, coarse key, fine word) -> final string, and the Locus site it maps to."""

    region: str
    coarse_key: str
    fine_word: str
    final: str
    site_id: str


@dataclass(frozen=True)
class HclAlCrosswalk:
    """HCL-AL vocabulary tree (Gao et al. 2025) mapped onto Locus nodes."""

    entries: tuple[HclAlCrosswalkEntry, ...]
    coarse_nodes: Mapping[str, str]  # HCL-AL coarse key -> Locus node id (large-lesion rule)
    source: str = ""

    @property
    def finals(self) -> dict[str, str]:
        return {e.final: e.site_id for e in self.entries}

    def tree(self) -> dict[str, dict[str, dict[str, str]]]:
        """``{region: {coarse_key: {fine_word: final}}}`` in HCL-AL's file order."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        for e in self.entries:
            out.setdefault(e.region, {}).setdefault(e.coarse_key, {})[e.fine_word] = e.final
        return out


@dataclass
class RawLibrary:
    """The library files as parsed YAML, before typing; :mod:`library.check` works on this."""

    root: Path
    manifest: dict[str, Any]
    files: dict[str, Any]  # relative path -> parsed YAML document (region files and crosswalk)

    def canonical_json(self) -> str:
        """Canonical serialisation hashed into :attr:`AnatomyLibrary.content_hash`.

        Parsed content, not bytes: comments, key quoting and indentation do not change the hash;
        any change to a name, code, description, hierarchy link or crosswalk entry does.
        """
        doc = {"manifest": self.manifest, "files": self.files}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def content_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def entries(self) -> Iterator[tuple[str, str, int, Any]]:
        """Yield ``(file, level, index, entry)`` for every node entry of every region file."""
        for fn in self.manifest.get("region_files") or []:
            doc = self.files.get(fn)
            if not isinstance(doc, dict):
                continue
            yield fn, "region", 0, doc.get("region")
            for level, key in (("coarse", "coarse"), ("site", "sites")):
                items = doc.get(key)
                if isinstance(items, list):
                    for i, entry in enumerate(items):
                        yield fn, level, i, entry


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=_Loader)
    except FileNotFoundError as exc:
        raise LibraryError(f"anatomy library file missing: {path}", code="library_file_missing") from exc
    except yaml.YAMLError as exc:
        raise LibraryError(f"{path}: not valid YAML: {exc}", code="library_format") from exc


def resolve_root(path: str | Path | None) -> Path:
    """The library directory for ``path``: a directory holding ``library.yaml``, or that file."""
    if path is None:
        return DATA_DIR
    p = Path(path)
    return p.parent if p.is_file() or p.suffix in (".yaml", ".yml") else p


def read_raw(path: str | Path | None = None) -> RawLibrary:
    """Parse the manifest and every file it lists, without interpreting the entries."""
    root = resolve_root(path)
    manifest = _read_yaml(root / MANIFEST_NAME)
    if not isinstance(manifest, dict):
        raise LibraryError(f"{root / MANIFEST_NAME}: expected a mapping", code="library_format")
    region_files = manifest.get("region_files")
    if not isinstance(region_files, list) or not all(isinstance(x, str) for x in region_files):
        raise LibraryError(f"{root / MANIFEST_NAME}: 'region_files' must be a list of paths", code="library_format")
    files: dict[str, Any] = {}
    for fn in region_files:
        files[fn] = _read_yaml(root / fn)
    crosswalk = manifest.get("hclal_crosswalk")
    if crosswalk is not None:
        if not isinstance(crosswalk, str):
            raise LibraryError(f"{root / MANIFEST_NAME}: 'hclal_crosswalk' must be a path", code="library_format")
        files[crosswalk] = _read_yaml(root / crosswalk)
    return RawLibrary(root=root, manifest=manifest, files=files)


def _fail(where: str, message: str) -> LibraryError:
    return LibraryError(f"{where}: {message}", code="library_format")


def parse_code(obj: Any, where: str) -> Code:
    """Turn a YAML code mapping into a :class:`Code`, with a precise error on bad shape."""
    if not isinstance(obj, dict):
        raise _fail(where, "expected a mapping with scheme, value, meaning")
    for key in ("scheme", "value", "meaning"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise _fail(where, f"'{key}' must be a non-empty string")
    cid = obj.get("cid")
    if cid is not None and (not isinstance(cid, int) or isinstance(cid, bool)):
        raise _fail(where, "'cid' must be an integer context group number")
    private = obj.get("private", False)
    if not isinstance(private, bool):
        raise _fail(where, "'private' must be true or false")
    unknown = set(obj) - {"scheme", "value", "meaning", "cid", "private"}
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}")
    return Code(obj["scheme"], obj["value"], obj["meaning"], cid, private)


_NODE_KEYS = {"id", "name", "parent", "laterality", "code", "modifiers", "approximate", "approximation", "descriptions"}


def parse_node(entry: Any, level: str, where: str) -> Site:
    """Turn one YAML entry into a :class:`Site` (shape only; semantics are checked elsewhere)."""
    if not isinstance(entry, dict):
        raise _fail(where, "expected a mapping")
    unknown = set(entry) - _NODE_KEYS
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)}")
    sid = entry.get("id")
    if not isinstance(sid, str) or not ID_PATTERN.match(sid):
        raise _fail(where, f"'id' must be lower-case snake_case, got {sid!r}")
    where = f"{where} '{sid}'"
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, "'name' must be a non-empty string")
    parent = entry.get("parent")
    if level == "region":
        if parent is not None:
            raise _fail(where, "a region has no parent")
    elif not isinstance(parent, str):
        raise _fail(where, "'parent' must name the id of the enclosing node")
    try:
        lat = Laterality(entry.get("laterality"))
    except ValueError:
        raise _fail(where, f"'laterality' must be one of left/right/bilateral/none, got {entry.get('laterality')!r}") from None
    code = parse_code(entry.get("code"), f"{where}: code")
    mods_raw = entry.get("modifiers", [])
    if not isinstance(mods_raw, list):
        raise _fail(where, "'modifiers' must be a list")
    mods = tuple(parse_code(m, f"{where}: modifiers[{i}]") for i, m in enumerate(mods_raw))
    approximate = entry.get("approximate", False)
    if not isinstance(approximate, bool):
        raise _fail(where, "'approximate' must be true or false")
    approximation = entry.get("approximation")
    if approximation is not None and not isinstance(approximation, str):
        raise _fail(where, "'approximation' must be a string")
    descs = entry.get("descriptions")
    if not isinstance(descs, list) or not descs or not all(isinstance(d, str) and d.strip() for d in descs):
        raise _fail(where, "'descriptions' must be a non-empty list of non-empty strings")
    return Site(
        id=sid,
        name=name,
        level=level,
        parent=parent,
        laterality=lat,
        code=code,
        modifiers=mods,
        descriptions=tuple(descs),
        approximate=approximate,
        approximation=approximation,
        source=where.split(":")[0],
    )


def parse_crosswalk(doc: Any, where: str) -> HclAlCrosswalk:
    """Parse ``hclal_crosswalk.yaml`` (regions > coarse keys > fine entries, in HCL-AL order)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("regions"), list):
        raise _fail(where, "expected a mapping with a 'regions' list")
    entries: list[HclAlCrosswalkEntry] = []
    coarse_nodes: dict[str, str] = {}
    for ri, reg in enumerate(doc["regions"]):
        rw = f"{where}: regions[{ri}]"
        if not isinstance(reg, dict) or not isinstance(reg.get("name"), str) or not isinstance(reg.get("coarse"), list):
            raise _fail(rw, "expected {name, coarse: [...]}")
        for ci, co in enumerate(reg["coarse"]):
            cw = f"{rw}.coarse[{ci}]"
            if not isinstance(co, dict) or not isinstance(co.get("key"), str) or not isinstance(co.get("fine"), list):
                raise _fail(cw, "expected {key, node, fine: [...]}")
            node = co.get("node")
            if not isinstance(node, str):
                raise _fail(cw, f"coarse key {co['key']!r}: 'node' must name a Locus node id")
            if co["key"] in coarse_nodes:
                raise _fail(cw, f"coarse key {co['key']!r} appears twice")
            coarse_nodes[co["key"]] = node
            for fi, fe in enumerate(co["fine"]):
                fw = f"{cw}.fine[{fi}]"
                if not isinstance(fe, dict) or not all(isinstance(fe.get(k), str) for k in ("word", "final", "site")):
                    raise _fail(fw, "expected {word, final, site} strings")
                entries.append(HclAlCrosswalkEntry(reg["name"], co["key"], fe["word"], fe["final"], fe["site"]))
    return HclAlCrosswalk(entries=tuple(entries), coarse_nodes=coarse_nodes, source=str(doc.get("source", "")))


@dataclass
class AnatomyLibrary:
    """The loaded, indexed anatomy library.  Build it with :func:`load_library`."""

    name: str
    version: str
    content_hash: str
    root: Path
    nodes: dict[str, Site]
    hclal: HclAlCrosswalk | None
    _children: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _by_description: dict[str, str] = field(default_factory=dict, repr=False)

    # --- hierarchy ------------------------------------------------------------------
    @property
    def sites(self) -> tuple[Site, ...]:
        """Final (leaf) sites, in file order."""
        return tuple(n for n in self.nodes.values() if n.level == "site")

    @property
    def regions(self) -> tuple[Site, ...]:
        return tuple(n for n in self.nodes.values() if n.level == "region")

    @property
    def coarse(self) -> tuple[Site, ...]:
        return tuple(n for n in self.nodes.values() if n.level == "coarse")

    def site(self, site_id: str) -> Site:
        """Any node (region, coarse location or site) by identifier."""
        try:
            return self.nodes[site_id]
        except KeyError:
            raise LibraryError(f"unknown anatomical site id {site_id!r}", code="unknown_site") from None

    def children(self, node_id: str) -> tuple[Site, ...]:
        self.site(node_id)
        return tuple(self.nodes[c] for c in self._children.get(node_id, ()))

    def parents(self, node_id: str) -> tuple[Site, ...]:
        """Ancestors from the direct parent up to the region."""
        out: list[Site] = []
        node = self.site(node_id)
        while node.parent is not None:
            node = self.nodes[node.parent]
            out.append(node)
        return tuple(out)

    def region_of(self, node_id: str) -> Site:
        node = self.site(node_id)
        return node if node.level == "region" else self.parents(node_id)[-1]

    def sites_under(self, node_id: str) -> tuple[Site, ...]:
        """All final sites below ``node_id`` (itself if it is a site)."""
        node = self.site(node_id)
        if node.level == "site":
            return (node,)
        return tuple(s for c in self.children(node_id) for s in self.sites_under(c.id))

    def by_description(self, text: str) -> Site:
        """The node whose description is ``text`` (descriptions are unique, so retrieval can invert)."""
        try:
            return self.nodes[self._by_description[text]]
        except KeyError:
            raise LibraryError(f"no site has the description {text!r}", code="unknown_site") from None

    # --- HCL-AL crosswalk ----------------------------------------------------------------
    def _crosswalk(self) -> HclAlCrosswalk:
        if self.hclal is None:
            raise LibraryError("this anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
        return self.hclal

    def hclal_site(self, final_string: str) -> Site:
        """The Locus site an HCL-AL final location string maps to."""
        site_id = self._crosswalk().finals.get(final_string)
        if site_id is None:
            raise LibraryError(f"HCL-AL final location {final_string!r} is not in the crosswalk", code="hclal_unmapped")
        return self.site(site_id)

    def hclal_coarse_node(self, coarse_key: str) -> Site:
        """The Locus node an HCL-AL coarse key maps to (HCL-AL reports the coarse key for lesions > 100 mm)."""
        node_id = self._crosswalk().coarse_nodes.get(coarse_key)
        if node_id is None:
            raise LibraryError(f"HCL-AL coarse location {coarse_key!r} is not in the crosswalk", code="hclal_unmapped")
        return self.site(node_id)

    def stamp(self) -> dict[str, str]:
        """What a model checkpoint records about the library it was trained with."""
        return {"name": self.name, "version": self.version, "content_hash": self.content_hash}


def build_library(raw: RawLibrary) -> AnatomyLibrary:
    """Type and index a :class:`RawLibrary`; raises :class:`LibraryError` on structural defects."""
    nodes: dict[str, Site] = {}
    for fn, level, i, entry in raw.entries():
        where = fn if level == "region" else f"{fn}: {'coarse' if level == 'coarse' else 'sites'}[{i}]"
        node = parse_node(entry, level, where)
        if node.id in nodes:
            raise _fail(where, f"duplicate id {node.id!r} (also in {nodes[node.id].source})")
        nodes[node.id] = node
    children: dict[str, list[str]] = {}
    expected_parent = {"coarse": "region", "site": "coarse"}
    for node in nodes.values():
        if node.parent is None:
            continue
        parent = nodes.get(node.parent)
        if parent is None:
            raise _fail(node.source, f"'{node.id}': parent {node.parent!r} does not exist")
        if parent.level != expected_parent[node.level]:
            raise _fail(node.source, f"'{node.id}': a {node.level} must sit under a {expected_parent[node.level]}, "
                                     f"but {parent.id!r} is a {parent.level}")
        children.setdefault(parent.id, []).append(node.id)
    by_desc: dict[str, str] = {}
    for node in nodes.values():
        for d in node.descriptions:
            if d in by_desc:
                raise _fail(node.source, f"'{node.id}': description {d!r} is also used by {by_desc[d]!r}")
            by_desc[d] = node.id
    crosswalk = None
    cw_file = raw.manifest.get("hclal_crosswalk")
    if cw_file is not None:
        crosswalk = parse_crosswalk(raw.files[cw_file], cw_file)
        for e in crosswalk.entries:
            if nodes.get(e.site_id) is None or nodes[e.site_id].level != "site":
                raise _fail(cw_file, f"HCL-AL final {e.final!r} maps to {e.site_id!r}, which is not a site")
        for key, node_id in crosswalk.coarse_nodes.items():
            if node_id not in nodes:
                raise _fail(cw_file, f"HCL-AL coarse key {key!r} maps to unknown node {node_id!r}")
    version = raw.manifest.get("version")
    if not isinstance(version, str):
        raise _fail(MANIFEST_NAME, "'version' must be a string")
    return AnatomyLibrary(
        name=str(raw.manifest.get("name", "locus-anatomy")),
        version=version,
        content_hash=raw.content_hash(),
        root=raw.root,
        nodes=nodes,
        hclal=crosswalk,
        _children=children,
        _by_description=by_desc,
    )


def load_library(path: str | Path | None = None) -> AnatomyLibrary:
    """Load the anatomy library at ``path`` (directory or its ``library.yaml``); default: shipped one.

    The shipped library is cached (it is immutable data); pass a path to load another copy.
    """
    if path is None:
        return _load_default()
    return build_library(read_raw(path))


@lru_cache(maxsize=1)
def _load_default() -> AnatomyLibrary:
    return build_library(read_raw(DATA_DIR))
