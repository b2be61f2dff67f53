"""The user-supplied HCL-AL vocabulary and description JSON pair (HCL-AL, Gao et al. 2025).

* ``anatomy_vocabulary_library.json``: ``{region: {coarse_key: {fine_word: final_string}}}``;
  file order matters (it is the order of the coarse candidates and of each coarse key's
  fine words).
* ``augmented_location_descriptions.json``: ``{word: sentence}`` for every coarse key and
  fine word (plus unused "orphan" entries).

The upstream repository has no licence, so Locus does not ship these files: the user puts
them beside the checkpoints and Locus records their SHA-256 in every result.  Loading here
checks structure only; the counts of the published pair are in :data:`PUBLISHED_COUNTS`
so a deployment can tell whether it runs with the published vocabulary.

This module maps strings to strings; turning a final string into a coded site is the
anatomy library's job (``library/``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError

#: Counts of the published pair (HCL-AL commit 886f71d; Gao et al. 2025).
PUBLISHED_COUNTS = {
    "regions": 8,
    "coarse": 124,
    "pairs": 387,
    "fine_words": 203,
    "descriptions": 323,
    "orphans": 14,
}


@dataclass(frozen=True)
class Vocabulary:
    """Parsed HCL-AL vocabulary with the lookups the hierarchical decision needs."""

    regions: tuple[str, ...]
    coarse_keys: tuple[str, ...]  # file order, deduplicated
    region_of: Mapping[str, str]  # coarse key -> region
    children: Mapping[str, tuple[str, ...]]  # coarse key -> fine words (file order)
    finals: Mapping[tuple[str, str], str]  # (coarse, fine) -> final location string
    fine_words: tuple[str, ...]  # first-appearance order over the whole file
    parents: Mapping[str, tuple[str, ...]]  # fine word -> coarse keys in file order
    descriptions: Mapping[str, str]  # word -> sentence (all entries, orphans included)
    vocabulary_sha256: str
    descriptions_sha256: str

    # -- lookups --------------------------------------------------------------------
    def text(self, word: str) -> str:
        """The description the text tower encodes for a word."""
        return self.descriptions[word]

    def final(self, coarse: str, fine: str) -> str:
        """The final location string of a (coarse, fine) pair."""
        return self.finals[(coarse, fine)]

    @property
    def orphans(self) -> tuple[str, ...]:
        """Described words no vocabulary entry uses (reported by the library check)."""
        used = set(self.coarse_keys) | set(self.fine_words)
        return tuple(w for w in self.descriptions if w not in used)

    def counts(self) -> dict[str, int]:
        """Sizes of each level, compared against the published vocabulary."""
        return {
            "regions": len(self.regions),
            "coarse": len(self.coarse_keys),
            "pairs": len(self.finals),
            "fine_words": len(self.fine_words),
            "descriptions": len(self.descriptions),
            "orphans": len(self.orphans),
        }

    def matches_published_counts(self) -> bool:
        """Whether the sizes equal the published HCL-AL vocabulary's."""
        return self.counts() == PUBLISHED_COUNTS

    @property
    def library_hash(self) -> str:
        """One digest over both files (recorded as ``ModelInfo.library_hash``)."""
        return hashlib.sha256(f"{self.vocabulary_sha256}\n{self.descriptions_sha256}\n".encode()).hexdigest()

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_objects(
        cls, vocabulary: Mapping[str, Any], descriptions: Mapping[str, Any], *, vocabulary_sha256: str = "",
        descriptions_sha256: str = "",
    ) -> Vocabulary:  # fmt: skip
        """A vocabulary from the two parsed JSON files, validated; bad input raises a model error."""
        if not isinstance(vocabulary, Mapping) or not vocabulary:
            raise ModelError("vocabulary JSON must be a non-empty object {region: {...}}", code="vocabulary_invalid")
        if not isinstance(descriptions, Mapping) or not all(isinstance(v, str) for v in descriptions.values()):
            raise ModelError("descriptions JSON must be an object {word: sentence}", code="vocabulary_invalid")
        coarse_keys: list[str] = []
        region_of: dict[str, str] = {}
        children: dict[str, tuple[str, ...]] = {}
        finals: dict[tuple[str, str], str] = {}
        fine_words: list[str] = []
        parents: dict[str, list[str]] = {}
        for region, coarse_map in vocabulary.items():
            if not isinstance(coarse_map, Mapping):
                raise ModelError(f"region {region!r} is not an object", code="vocabulary_invalid")
            for coarse, fine_map in coarse_map.items():
                if coarse in region_of:
                    # The reference would merge such keys across regions; the published file has none.
                    raise ModelError(f"coarse key {coarse!r} appears in two regions", code="vocabulary_invalid")
                if not isinstance(fine_map, Mapping) or not fine_map:
                    raise ModelError(f"coarse key {coarse!r} has no fine words", code="vocabulary_invalid")
                region_of[coarse] = region
                coarse_keys.append(coarse)
                kids = []
                for fine, final in fine_map.items():
                    if not isinstance(final, str):
                        raise ModelError(f"final location for {coarse!r}/{fine!r} is not a string", code="vocabulary_invalid")
                    kids.append(fine)
                    finals[(coarse, fine)] = final
                    if fine not in parents:
                        parents[fine] = []
                        fine_words.append(fine)
                    parents[fine].append(coarse)
                children[coarse] = tuple(kids)
        missing = [w for w in (*coarse_keys, *fine_words) if w not in descriptions]
        if missing:
            raise ModelError(f"descriptions JSON lacks {len(missing)} words, e.g. {missing[:3]}", code="vocabulary_invalid")
        used_texts = [descriptions[w] for w in dict.fromkeys((*coarse_keys, *fine_words))]
        if len(set(used_texts)) != len(used_texts):
            # HCL-AL maps model outputs back through a text -> word dict, which needs unique texts.
            raise ModelError("two vocabulary words share one description sentence", code="vocabulary_invalid")
        return cls(
            regions=tuple(vocabulary),
            coarse_keys=tuple(coarse_keys),
            region_of=region_of,
            children=children,
            finals=finals,
            fine_words=tuple(fine_words),
            parents={k: tuple(v) for k, v in parents.items()},
            descriptions=dict(descriptions),
            vocabulary_sha256=vocabulary_sha256,
            descriptions_sha256=descriptions_sha256,
        )

    @classmethod
    def load(cls, vocabulary_json: str | Path, descriptions_json: str | Path) -> Vocabulary:
        """Read the JSON pair (UTF-8, key order preserved) and hash the exact bytes."""
        objs = []
        digests = []
        for path in (vocabulary_json, descriptions_json):
            p = Path(path)
            if not p.is_file():
                raise ModelError(f"HCL-AL vocabulary file not found: {p}", code="vocabulary_missing")
            raw = p.read_bytes()
            digests.append(hashlib.sha256(raw).hexdigest())
            try:
                objs.append(json.loads(raw.decode("utf-8-sig")))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{p.name} is not valid UTF-8 JSON: {exc}", code="vocabulary_invalid") from exc
        return cls.from_objects(objs[0], objs[1], vocabulary_sha256=digests[0], descriptions_sha256=digests[1])
