"""Phantom seeds -> :class:`StudyRecord`: synthetic localizer training and evaluation data.

Ground truth comes from the phantom's own lesion truth (:class:`LesionTruth.site_id`, the
host structure's library site).  HCL-AL final strings and coarse keys are added through
the library's HCL-AL crosswalk (final string -> site).  A few phantom hosts are finer
than anything HCL-AL names (lymph-node levels, cerebral hemispheres, sternal parts); for
them :data:`NEAREST_HCLAL` lists the HCL-AL final string(s) a reader of HCL-AL's
vocabulary would accept, following HCL-AL's own habit of naming nodes by their region
("Right axilla", "Near left iliac vessel").  That table is a judgement, kept short and
explicit; every entry is checked against the crosswalk by the tests.

Two placements:

* ``natural`` – the phantom's own lesion-host weights (the held-out evaluation
  distribution, and what ``locus demo``'s study uses);
* ``balanced`` – lesion sites drawn uniformly over the HCL-AL final strings the phantom can
  host (training data: ribs, vertebrae and lung segments are otherwise rare, and each needs
  its own examples).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from library import AnatomyLibrary, load_library
from pipelines.errors import InputError
from training.data.records import LesionRecord, StudyRecord
from training.phantom import make_phantom
from training.phantom.anatomy import Anatomy, Structure
from training.phantom.generate import PRESETS
from training.phantom.reports import itemize

log = logging.getLogger(__name__)

#: Phantom host sites that no HCL-AL final string names exactly -> acceptable HCL-AL finals.
NEAREST_HCLAL: dict[str, tuple[str, ...]] = {
    "cerebral_hemisphere_left": ("Brain",),
    "cerebral_hemisphere_right": ("Brain",),
    "cerebellum": ("Brain",),
    "neck_level_ii_left": ("Left neck",),
    "neck_level_iii_left": ("Left neck",),
    "neck_level_iv_left": ("Left neck",),
    "neck_level_ii_right": ("Right neck",),
    "neck_level_iii_right": ("Right neck",),
    "neck_level_iv_right": ("Right neck",),
    "axillary_lymph_nodes_left": ("Left axilla",),
    "axillary_lymph_nodes_right": ("Right axilla",),
    "hilar_station_10l": ("Left pulmonary hilum",),
    "hilar_station_10r": ("Right pulmonary hilum",),
    "common_iliac_lymph_nodes_left": ("Near left iliac vessel",),
    "external_iliac_lymph_nodes_left": ("Near left iliac vessel",),
    "internal_iliac_lymph_nodes_left": ("Near left iliac vessel",),
    "obturator_lymph_nodes_left": ("Near left iliac vessel",),
    "common_iliac_lymph_nodes_right": ("Near right iliac vessel",),
    "external_iliac_lymph_nodes_right": ("Near right iliac vessel",),
    "internal_iliac_lymph_nodes_right": ("Near right iliac vessel",),
    "obturator_lymph_nodes_right": ("Near right iliac vessel",),
    "inguinal_lymph_nodes_left": ("Left inguinal region",),
    "inguinal_lymph_nodes_right": ("Right inguinal region",),
    "celiac_lymph_nodes": ("Retroperitoneum",),
    "para_aortic_lymph_nodes": ("Retroperitoneum",),
    "mesenteric_lymph_nodes": ("Mesentery",),
    "manubrium": ("Sternum",),
    "sternal_body": ("Sternum",),
    "acetabulum_left": ("Left hip joint",),
    "acetabulum_right": ("Right hip joint",),
}


@dataclass(frozen=True)
class HclalTruth:
    """Acceptable HCL-AL answers for one library site: finals and their (coarse, fine) pairs."""

    finals: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]  # (coarse key, fine word) per final, crosswalk order

    @property
    def coarse_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c, _ in self.pairs))


class HclalTruthTable:
    """Library site id -> :class:`HclalTruth`, through the crosswalk and :data:`NEAREST_HCLAL`."""

    def __init__(self, library: AnatomyLibrary | None = None) -> None:
        self.library = library or load_library()
        cw = self.library.hclal
        if cw is None:
            raise InputError("the anatomy library has no HCL-AL crosswalk", code="hclal_unmapped")
        self._by_final = {e.final: e for e in cw.entries}
        self._by_site: dict[str, list[str]] = {}
        for e in cw.entries:
            self._by_site.setdefault(e.site_id, []).append(e.final)

    def truth(self, site_id: str) -> HclalTruth | None:
        finals = tuple(self._by_site.get(site_id, ())) or NEAREST_HCLAL.get(site_id, ())
        if not finals:
            return None
        pairs = tuple((self._by_final[f].coarse_key, self._by_final[f].fine_word) for f in finals)
        return HclalTruth(finals, pairs)


@lru_cache(maxsize=4)
def eligible_sites(size: str) -> tuple[str, ...]:
    """Lesion-host sites of the phantom inside preset ``size``'s scan range (40 mm of it, or 90 % of a shorter one).

    The scan range scales with the seeded body height, so eligibility in the body frame
    does not depend on the seed; one reference body decides it.
    """
    ref = make_phantom(0, size, n_lesions=0)
    z0 = ref.ct.affine[2, 3]
    z1 = z0 + ref.ct.affine[2, 2] * (ref.ct.array.shape[0] - 1)
    table = HclalTruthTable()
    rng = np.random.default_rng(0)
    out = []
    for s in ref.anatomy.structures:
        if s.site_id is None or s.lesion_weight <= 0 or table.truth(s.site_id) is None:
            continue
        lo, hi = ref.anatomy.world_bounds(s)
        overlap = min(hi[2], z1) - max(lo[2], z0)  # mm of the structure inside the scan range
        if overlap >= min(40.0, 0.9 * (hi[2] - lo[2])) and _visible_fraction(ref.anatomy, s, lo, hi, rng) >= 0.3:
            out.append(s.site_id)
    return tuple(dict.fromkeys(out))


def _visible_fraction(anatomy: Anatomy, s: Structure, lo: np.ndarray, hi: np.ndarray,
                      rng: np.random.Generator, n: int = 4000) -> float:
    """Fraction of a structure's own solid that keeps its label after later structures are painted.

    Structures mostly painted over (the acetabulum by the femoral head, mediastinal station 8
    by the oesophagus and aorta) rarely host a lesion whose centre and half-axes lie in them,
    and each failed placement costs seconds; below 30 % visible they are not drawn (the
    held-out natural placement still puts the occasional lesion there).
    """
    pts = lo + rng.uniform(size=(n, 3)) * (hi - lo)
    x, y, z = anatomy.to_body(pts)
    inside = s.shape.contains(x, y, z)
    if not inside.any():
        return 0.0
    return float(np.mean(anatomy.owner(pts[inside]) == anatomy.label_of(s.name)))


def balanced_sites(size: str, n: int, rng: np.random.Generator, table: HclalTruthTable) -> list[str]:
    """``n`` sites drawn uniformly over the HCL-AL final strings the phantom can host, then over their sites.

    Uniform over finals (not coarse keys) so the fine stage sees every lung and liver
    segment and mediastinal station, while each rib and vertebra still gets its share.
    """
    by_final: dict[str, list[str]] = {}
    for site in eligible_sites(size):
        truth = table.truth(site)
        assert truth is not None
        by_final.setdefault(truth.finals[0], []).append(site)
    keys = sorted(by_final)
    picks = rng.choice(len(keys), size=n, replace=len(keys) < n)
    return [by_final[keys[int(k)]][int(rng.integers(len(by_final[keys[int(k)]])))] for k in picks]


def phantom_study_id(seed: int, size: str, placement: str) -> str:
    """The study id of a phantom record (known without generating it: evaluations resume by it)."""
    return f"phantom-{size}-{placement}-{seed}"


def phantom_record(seed: int, size: str = "small", *, placement: str = "natural", n_lesions: int | None = None,
                   table: HclalTruthTable | None = None, grouping: str = "auto") -> StudyRecord:
    """One phantom study as a :class:`StudyRecord` (SUV, CT, PET-grid lesion labels, GT).

    ``n_lesions=0`` gives a lesion-free study; the record's ``report`` is the study's itemized
    report (:func:`training.phantom.reports.itemize`, ``grouping`` as there), whose single
    normal item then says so.
    """
    table = table or HclalTruthTable()
    n = PRESETS[size].n_lesions if n_lesions is None else n_lesions
    if placement == "natural":
        ph = make_phantom(seed, size, n_lesions=n)
    elif placement == "balanced":
        rng = np.random.default_rng([seed, 0xBA1])
        for _attempt in range(8):  # a drawn site can fail to fit (small structure, crowded): redraw
            try:
                ph = make_phantom(seed, size, n_lesions=n, lesion_sites=balanced_sites(size, n, rng, table))
                break
            except InputError as exc:
                log.debug("phantom seed %s: redrawing lesion sites (%s)", seed, exc)
        else:
            raise InputError(f"phantom seed {seed}: no balanced lesion placement fitted", code="phantom_lesion_placement")
    else:
        raise ValueError(f"placement must be 'natural' or 'balanced', not {placement!r}")
    lesions = []
    for les in ph.lesions:
        truth = table.truth(les.site_id)
        lesions.append(LesionRecord(
            lesion_id=f"{seed}:{les.label}", label=les.label, sites=(les.site_id,),
            hclal_locations=truth.finals if truth else (), coarse_keys=truth.coarse_keys if truth else (),
        ))  # fmt: skip
    return StudyRecord(study_id=phantom_study_id(seed, size, placement), suv=ph.pet, ct=ph.ct, labels=ph.pet_lesions,
                       lesions=lesions, source=f"phantom:seed={seed},size={size},placement={placement},n={n}",
                       report=itemize(ph.lesions, seed, grouping=grouping, library=table.library))


def lesion_free(seed: int, fraction: float) -> bool:
    """Whether phantom ``seed`` is drawn lesion-free, with probability ``fraction`` (deterministic per seed)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"lesion-free fraction must lie in [0, 1], not {fraction}")
    return bool(np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x40F]).random() < fraction)


def phantom_records(seeds: Sequence[int], size: str = "small", *, placement: str = "natural",
                    n_lesions: int | None = None, lesion_free_fraction: float = 0.0,
                    grouping: str = "auto") -> Iterator[StudyRecord]:
    """Records for ``seeds``; a seed drawn by :func:`lesion_free` (``lesion_free_fraction``) has no lesion."""
    table = HclalTruthTable()
    for seed in seeds:
        n = 0 if lesion_free(seed, lesion_free_fraction) else n_lesions
        yield phantom_record(int(seed), size, placement=placement, n_lesions=n, table=table, grouping=grouping)
