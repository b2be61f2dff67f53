"""Import and export of HCL-AL's two-file anatomy knowledge format (Gao et al. 2025).

HCL-AL ships its vocabulary as two JSON files that a user puts beside the HCL-AL checkpoints
(Locus does not redistribute them: the upstream repository has no licence):

- ``anatomy_vocabulary_library.json``: ``{region: {coarse_key: {fine_word: final_location}}}``;
  file order matters (it is the order of the 124 coarse candidates), every value is a string.
- ``augmented_location_descriptions.json``: flat ``{word: sentence}`` for every coarse key and
  fine word (extra "orphan" keys are allowed); sentences must be unique because inference
  inverts text -> word.

Because HCL-AL's released weights were trained on exactly those strings, compat mode runs them
unchanged; :func:`map_to_library` then maps every final string (and every coarse key, which
HCL-AL reports for lesions over 100 mm) to a coded Locus site through the crosswalk in
``library/data/hclal_crosswalk.yaml``.  The sha256 of both files is recorded so that a
checkpoint can pin the exact vocabulary it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.anatomy import AnatomyLibrary, Site
from library.errors import LibraryError

VOCABULARY_FILENAME = "anatomy_vocabulary_library.json"
DESCRIPTIONS_FILENAME = "augmented_location_descriptions.json"

Tree = dict[str, dict[str, dict[str, str]]]


def _fail(message: str) -> LibraryError:
    return LibraryError(message, code="hclal_format")


@dataclass(frozen=True)
class HclAlVocabulary:
    """An HCL-AL vocabulary tree and description map, in file order."""

    tree: Tree
    descriptions: dict[str, str]
    vocabulary_sha256: str | None = None
    descriptions_sha256: str | None = None

    @property
    def regions(self) -> list[str]:
        return list(self.tree)

    @property
    def coarse_keys(self) -> list[str]:
        """Coarse candidates in the order HCL-AL scores them (region, then coarse key, file order)."""
        return [c for cs in self.tree.values() for c in cs]

    def fine_words(self, coarse_key: str) -> list[str]:
        for cs in self.tree.values():
            if coarse_key in cs:
                return list(cs[coarse_key])
        raise LibraryError(f"HCL-AL coarse key {coarse_key!r} is not in the vocabulary", code="hclal_unmapped")

    def final(self, coarse_key: str, fine_word: str) -> str:
        """``vocab[region][coarse][fine]``: the reported location for a fine prediction."""
        for cs in self.tree.values():
            if coarse_key in cs:
                try:
                    return cs[coarse_key][fine_word]
                except KeyError:
                    break
        raise LibraryError(f"HCL-AL has no fine word {fine_word!r} under {coarse_key!r}", code="hclal_unmapped")

    @property
    def finals(self) -> list[str]:
        return [f for cs in self.tree.values() for fines in cs.values() for f in fines.values()]

    @property
    def used_words(self) -> list[str]:
        """Coarse keys and fine words, deduplicated in first-seen order (the texts inference encodes)."""
        seen: dict[str, None] = {}
        for cs in self.tree.values():
            for ck, fines in cs.items():
                seen.setdefault(ck)
                for fw in fines:
                    seen.setdefault(fw)
        return list(seen)

    @property
    def orphan_descriptions(self) -> list[str]:
        used = set(self.used_words)
        return [k for k in self.descriptions if k not in used]

    def counts(self) -> dict[str, int]:
        pairs = sum(len(f) for cs in self.tree.values() for f in cs.values())
        return {
            "regions": len(self.tree),
            "coarse": len(self.coarse_keys),
            "pairs": pairs,
            "finals": len(set(self.finals)),
            "fine_words": len({fw for cs in self.tree.values() for f in cs.values() for fw in f}),
            "descriptions": len(self.descriptions),
            "orphans": len(self.orphan_descriptions),
        }


def validate_vocabulary(vocab: HclAlVocabulary) -> None:
    """Structural rules HCL-AL's inference relies on; raises :class:`LibraryError` (``hclal_format``)."""
    if not isinstance(vocab.tree, dict) or not vocab.tree:
        raise _fail("HCL-AL vocabulary: expected a non-empty {region: {coarse: {fine: final}}} object")
    coarse_seen: Counter[str] = Counter()
    for region, cs in vocab.tree.items():
        if not isinstance(cs, dict) or not cs:
            raise _fail(f"HCL-AL vocabulary: region {region!r} must map coarse keys to fine words")
        for ck, fines in cs.items():
            coarse_seen[ck] += 1
            if not isinstance(fines, dict) or not fines:
                raise _fail(f"HCL-AL vocabulary: coarse key {ck!r} must map fine words to final locations")
            for fw, final in fines.items():
                if not isinstance(final, str) or not final:
                    raise _fail(f"HCL-AL vocabulary: {region!r} > {ck!r} > {fw!r} must be a final location string")
    dup_coarse = [k for k, n in coarse_seen.items() if n > 1]
    if dup_coarse:
        raise _fail(f"HCL-AL vocabulary: coarse key(s) {dup_coarse} appear in more than one region")
    dup_final = [k for k, n in Counter(vocab.finals).items() if n > 1]
    if dup_final:
        raise _fail(f"HCL-AL vocabulary: final location string(s) {dup_final} appear more than once")
    if not isinstance(vocab.descriptions, dict):
        raise _fail("HCL-AL descriptions: expected a flat {word: sentence} object")
    bad = [k for k, v in vocab.descriptions.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise _fail(f"HCL-AL descriptions: entries {bad[:5]} are not non-empty strings")
    missing = [w for w in vocab.used_words if w not in vocab.descriptions]
    if missing:
        raise _fail(f"HCL-AL descriptions: no sentence for {len(missing)} vocabulary word(s), e.g. {missing[:5]}")
    dup_text = [t for t, n in Counter(vocab.descriptions.values()).items() if n > 1]
    if dup_text:
        raise _fail(f"HCL-AL descriptions: sentence(s) {dup_text[:3]} are used for several words; "
                    "inference maps text back to words, so sentences must be unique")


def _load_json(path: Path, what: str) -> tuple[Any, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise LibraryError(f"HCL-AL {what} file not found: {path}", code="hclal_format") from exc
    try:
        return json.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"HCL-AL {what} file {path} is not valid UTF-8 JSON: {exc}") from exc


def read_hclal(vocabulary_path: str | Path, descriptions_path: str | Path) -> HclAlVocabulary:
    """Read and validate HCL-AL's vocabulary tree and description map (order preserved)."""
    tree, vsha = _load_json(Path(vocabulary_path), "vocabulary")
    desc, dsha = _load_json(Path(descriptions_path), "descriptions")
    vocab = HclAlVocabulary(tree=tree, descriptions=desc, vocabulary_sha256=vsha, descriptions_sha256=dsha)
    validate_vocabulary(vocab)
    return vocab


def dumps_json(obj: Any) -> str:
    """The serialisation :func:`write_hclal` uses: UTF-8, 2-space indent, file order, final newline."""
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_hclal(vocab: HclAlVocabulary, vocabulary_path: str | Path, descriptions_path: str | Path) -> tuple[str, str]:
    """Write the two HCL-AL files; returns their sha256.

    Content and key order are preserved exactly (order is semantic for HCL-AL).  Whitespace is
    normalised to :func:`dumps_json`, so a file that was already in that form is reproduced
    byte for byte.
    """
    validate_vocabulary(vocab)
    out = []
    for obj, path in ((vocab.tree, vocabulary_path), (vocab.descriptions, descriptions_path)):
        data = dumps_json(obj).encode("utf-8")
        Path(path).write_bytes(data)
        out.append(hashlib.sha256(data).hexdigest())
    return out[0], out[1]


@dataclass(frozen=True)
class HclAlMapping:
    """An imported HCL-AL vocabulary bound to coded Locus sites."""

    vocabulary: HclAlVocabulary
    library_hash: str
    final_to_site: dict[str, Site]
    coarse_to_node: dict[str, Site]
    unmapped_finals: tuple[str, ...] = ()
    unmapped_coarse: tuple[str, ...] = ()
    placement_warnings: tuple[str, ...] = field(default=())

    def site_for_final(self, final: str) -> Site | None:
        """The coded site for HCL-AL's ``pred`` (fine rule); None if the string is unmapped."""
        return self.final_to_site.get(final)

    def site_for_prediction(self, pred: str) -> Site | None:
        """Map HCL-AL's ``pred`` (a final string, or a coarse key under the >100 mm rule)."""
        return self.final_to_site.get(pred) or self.coarse_to_node.get(pred)


def map_to_library(vocab: HclAlVocabulary, library: AnatomyLibrary, *, allow_unmapped: bool = False) -> HclAlMapping:
    """Map every final string and coarse key of an HCL-AL vocabulary to Locus nodes.

    A final string is mapped by the crosswalk; it is also checked to sit under the same coarse
    key as in the crosswalk (a vocabulary that moved a string is reported in
    ``placement_warnings``).  Unmapped strings raise unless ``allow_unmapped`` is set, in which
    case the localizer reports them with an uncoded site.
    """
    cw = library.hclal
    if cw is None:
        raise LibraryError("the anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
    by_final = {e.final: e for e in cw.entries}
    final_to_site: dict[str, Site] = {}
    unmapped: list[str] = []
    warnings: list[str] = []
    for region, cs in vocab.tree.items():
        for ck, fines in cs.items():
            for fw, final in fines.items():
                e = by_final.get(final)
                if e is None:
                    unmapped.append(final)
                    continue
                final_to_site[final] = library.site(e.site_id)
                if (e.region, e.coarse_key, e.fine_word) != (region, ck, fw):
                    warnings.append(f"{final!r} is under {region!r} > {ck!r} > {fw!r} here but under "
                                    f"{e.region!r} > {e.coarse_key!r} > {e.fine_word!r} in the crosswalk")
    coarse_to_node: dict[str, Site] = {}
    unmapped_coarse: list[str] = []
    for ck in vocab.coarse_keys:
        node_id = cw.coarse_nodes.get(ck)
        if node_id is None:
            unmapped_coarse.append(ck)
        else:
            coarse_to_node[ck] = library.site(node_id)
    if (unmapped or unmapped_coarse) and not allow_unmapped:
        raise LibraryError(
            f"HCL-AL vocabulary has {len(unmapped)} final string(s) and {len(unmapped_coarse)} coarse key(s) "
            f"with no Locus site, e.g. {(unmapped + unmapped_coarse)[:5]}; extend library/data/hclal_crosswalk.yaml "
            "or pass allow_unmapped=True",
            code="hclal_unmapped",
        )
    return HclAlMapping(
        vocabulary=vocab,
        library_hash=library.content_hash,
        final_to_site=final_to_site,
        coarse_to_node=coarse_to_node,
        unmapped_finals=tuple(unmapped),
        unmapped_coarse=tuple(unmapped_coarse),
        placement_warnings=tuple(warnings),
    )


def import_hclal(vocabulary_path: str | Path, descriptions_path: str | Path, library: AnatomyLibrary, *,
                 allow_unmapped: bool = False) -> HclAlMapping:
    """Read a user's HCL-AL JSON pair and map it onto ``library`` (see :func:`map_to_library`)."""
    return map_to_library(read_hclal(vocabulary_path, descriptions_path), library, allow_unmapped=allow_unmapped)


def crosswalk_tree(library: AnatomyLibrary) -> Tree:
    """HCL-AL's vocabulary tree as recorded in the crosswalk (names only, no descriptions)."""
    if library.hclal is None:
        raise LibraryError("the anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
    return library.hclal.tree()
