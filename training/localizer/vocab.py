"""The HCL-AL-format vocabulary a Locus-trained localizer uses, exported from the anatomy library.

The tree comes from the library's HCL-AL crosswalk (:func:`library.hclal_format.crosswalk_tree`,
HCL-AL's region > coarse key > fine word > final string), restricted to the (coarse, fine)
pairs that the training data contains: a model cannot be taught names it never sees, and a
candidate it was never trained on would only add noise to the fine softmax.  The sentences
are Locus's own (HCL-AL's description file is not redistributable): a fine word naming one
library site uses that site's description; other words get a plain "a lesion in the ..."
sentence.  Both files are written with :func:`library.hclal_format.write_hclal`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from library import AnatomyLibrary, load_library
from library.hclal_format import HclAlVocabulary, crosswalk_tree, validate_vocabulary, write_hclal
from pipelines.models.localizer.vocabulary import Vocabulary


def _sentences(words: Iterable[str], library: AnatomyLibrary) -> dict[str, str]:
    sites_of: dict[str, set[str]] = {}
    assert library.hclal is not None
    for e in library.hclal.entries:
        sites_of.setdefault(e.fine_word, set()).add(e.site_id)
    out: dict[str, str] = {}
    used: set[str] = set()
    for w in words:
        sites = sites_of.get(w, set())
        text = (f"a lesion {library.site(next(iter(sites))).description}" if len(sites) == 1
                else f"a lesion in the {w.lower()}")
        if text in used:  # sentences must be unique (inference inverts text -> word)
            text = f"{text}, {w.lower()}"
        used.add(text)
        out[w] = text
    return out


def training_vocabulary(finals: Iterable[str], library: AnatomyLibrary | None = None) -> HclAlVocabulary:
    """Crosswalk tree restricted to the pairs whose final string is in ``finals`` (file order kept)."""
    library = library or load_library()
    keep = set(finals)
    tree: dict[str, dict[str, dict[str, str]]] = {}
    for region, coarse_map in crosswalk_tree(library).items():
        for coarse, fine_map in coarse_map.items():
            kept = {w: f for w, f in fine_map.items() if f in keep}
            if kept:
                tree.setdefault(region, {})[coarse] = kept
    words = dict.fromkeys(w for cm in tree.values() for c, fm in cm.items() for w in (c, *fm))
    vocab = HclAlVocabulary(tree=tree, descriptions=_sentences(words, library))
    validate_vocabulary(vocab)
    return vocab


def write_vocabulary(vocab: HclAlVocabulary, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v, d = out / "anatomy_vocabulary_library.json", out / "augmented_location_descriptions.json"
    write_hclal(vocab, v, d)
    return v, d


def pairs_of(vocab: Vocabulary, finals: Iterable[str]) -> list[tuple[str, str]]:
    """(coarse key, fine word) pairs of the given final strings in ``vocab`` (unknown finals skipped)."""
    inverse = {f: pair for pair, f in vocab.finals.items()}
    return [inverse[f] for f in finals if f in inverse]
