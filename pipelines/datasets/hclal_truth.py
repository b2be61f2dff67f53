"""Ground truth between coded Locus sites and HCL-AL's strings, through the library's crosswalk.

HCL-AL's evaluation ground truth is a list of acceptable *final location strings* (``anno.csv``
column ``GT``; Gao et al. 2025); its training files name a *coarse key* (``coarse_gt``) and
a *fine word* (``fine_gt``).  Locus reviews store a library site id.  Both directions go through
``library/data/hclal_crosswalk.yaml`` (one final string per site, each under one coarse key):

* a final site -> the final string(s) mapped to it, their coarse key and fine word;
* a coarse node -> every final string of the sites below it (any of them is acceptable), and
  the coarse key(s) HCL-AL maps to that node (its >100 mm rule); no single fine word;
* a final string -> the site it maps to; a string the crosswalk does not know is an error,
  never a silently dropped lesion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from library import AnatomyLibrary
from library.errors import LibraryError
from pipelines.datasets.hclal_layout import DatasetFormatError


@dataclass(frozen=True)
class HclAlTruth:
    """What one library site means in HCL-AL's training and evaluation files."""

    site_id: str
    finals: tuple[str, ...]  # acceptable final strings (anno.csv GT); empty: no HCL-AL equivalent
    coarse_keys: tuple[str, ...]  # candidate coarse_gt values, crosswalk order
    fine: tuple[str, str] | None  # (coarse_gt, fine_gt) when the site is exactly one HCL-AL final

    @property
    def coarse_key(self) -> str | None:
        """``coarse_gt`` when it is unambiguous (one coarse key)."""
        return self.coarse_keys[0] if len(self.coarse_keys) == 1 else None


def truth_for_site(library: AnatomyLibrary, site_id: str) -> HclAlTruth:
    """HCL-AL ground truth for a library node (raises ``LibraryError`` ``unknown_site``)."""
    node = library.site(site_id)
    cw = library.hclal
    if cw is None:
        raise LibraryError("the anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
    if node.level == "site":
        entries = [e for e in cw.entries if e.site_id == node.id]
        coarse = tuple(dict.fromkeys(e.coarse_key for e in entries))
        fine = (entries[0].coarse_key, entries[0].fine_word) if len(entries) == 1 else None
        return HclAlTruth(node.id, tuple(e.final for e in entries), coarse, fine)
    under = {s.id for s in library.sites_under(node.id)}
    finals = tuple(e.final for e in cw.entries if e.site_id in under)
    coarse = tuple(k for k, v in cw.coarse_nodes.items() if v == node.id)
    if not coarse:  # a region: the coarse keys of everything below it
        coarse = tuple(dict.fromkeys(e.coarse_key for e in cw.entries if e.site_id in under))
    return HclAlTruth(node.id, finals, coarse, None)


def sites_for_finals(library: AnatomyLibrary, finals: Sequence[str], *, where: str = "") -> tuple[str, ...]:
    """Library site ids for HCL-AL final strings, in order, deduplicated.

    Raises :class:`DatasetFormatError` naming the unknown string(s) and ``where`` they were read.
    """
    cw = library.hclal
    if cw is None:
        raise LibraryError("the anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
    by_final = cw.finals
    unknown = [f for f in finals if f not in by_final]
    if unknown:
        raise DatasetFormatError(
            f"{where or 'ground truth'}: HCL-AL location string(s) {unknown} are not in the anatomy library's "
            f"crosswalk ({library.name} {library.version}); fix the string or extend library/data/hclal_crosswalk.yaml",
            code="hclal_unmapped",
        )
    return tuple(dict.fromkeys(by_final[f] for f in finals))


def coarse_keys_for_finals(library: AnatomyLibrary, finals: Sequence[str]) -> tuple[str, ...]:
    """HCL-AL coarse keys of known final strings (the crosswalk places each final under one key)."""
    cw = library.hclal
    if cw is None:
        return ()
    by_final = {e.final: e.coarse_key for e in cw.entries}
    return tuple(dict.fromkeys(by_final[f] for f in finals if f in by_final))
