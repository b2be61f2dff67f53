"""The phantom's body model: analytic solids with CT numbers, FDG uptake and library sites.

A reference adult (1.78 m, supine, head first, arms at the sides) is described in a body
frame that is patient LPS millimetres (PS3.3 C.7.6.2.1.1) with z = height above the soles:
+x patient left, +y posterior, +z superior; the mid-sagittal plane is x = 0.  A seed
scales the frame per axis (body habitus and height) and jitters tissue uptake, so the
world coordinates of structure ``s`` are ``scale * body`` coordinates.

Structures are *painted* in list order, later ones overriding earlier ones, which is how
the model expresses "the liver dome pushes into the lung base" or "the spinal cord runs
in the vertebral canal" without boolean geometry.  Each structure carries a CT number
(HU), an FDG SUVbw level, an optional *core* (same label, different tissue: marrow in
bone, blood in the heart, urine in the renal pelvis) and a Locus anatomy-library site id
(``STRUCTURE_SITES``), so the rasterised label map doubles as ground truth for site
localisation.  Tissue values follow typical adult FDG PET/CT (liver SUV ~2, blood pool
~1.7, brain ~8, fat -100 HU, lung -850 HU); they are plausible levels, not a reference.

Lung segments and Couinaud liver segments are cut with planes, vertebrae are short
elliptic cylinders with posterior elements, ribs are tubes along tilted ellipses: this is
a test and demonstration instrument, not anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np

from training.phantom.shapes import (
    Box,
    Capsule,
    Ellipsoid,
    HalfSpace,
    Intersection,
    Shape,
    Union,
    ZSweep,
    frame_from_axis,
    polytube,
    rotation_z,
)

#: Reference height of the body frame (mm); world height = REFERENCE_HEIGHT_MM * scale_z.
REFERENCE_HEIGHT_MM = 1780.0


@dataclass(frozen=True)
class Structure:
    """One labelled solid of the body model.

    ``group`` is one of ``background``, ``organ``, ``bone``, ``lymph_node``, ``vessel``,
    ``airway``.  ``lesion_weight`` > 0 makes the structure a candidate lesion host
    (relative draw weight); ``lesion_rmax_mm`` caps the radius of lesions placed in it.
    """

    name: str
    shape: Shape
    hu: float
    suv: float
    group: str
    core: Shape | None = None
    core_hu: float = 0.0
    core_suv: float = 0.0
    lesion_weight: float = 0.0
    lesion_rmax_mm: float = 25.0

    @property
    def site_id(self) -> str | None:
        return STRUCTURE_SITES[self.name]


@dataclass
class Anatomy:
    """A seeded instance of the body model.

    ``structures[n]`` has label value ``n + 1`` in every label map; label 0 is outside the
    body (library site ``outside_body``).
    """

    structures: tuple[Structure, ...]
    scale: tuple[float, float, float]
    patient_weight_kg: float
    height_mm: float
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _bounds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._index = {s.name: n for n, s in enumerate(self.structures)}
        self._bounds = [s.shape.bounds() for s in self.structures]
        if len(self._index) != len(self.structures):
            raise ValueError("structure names must be unique")

    def label_of(self, name: str) -> int:
        """Label value of a structure in the label maps."""
        try:
            return self._index[name] + 1
        except KeyError:
            raise KeyError(f"no structure named {name!r} in the phantom anatomy") from None

    def structure(self, name: str) -> Structure:
        return self.structures[self.label_of(name) - 1]

    def world_bounds(self, s: Structure) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = s.shape.bounds()
        sc = np.asarray(self.scale)
        return lo * sc, hi * sc

    def to_body(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World LPS mm (N, 3) float64 to body-frame float32 x, y, z arrays."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        b = (xyz / np.asarray(self.scale)).astype(np.float32)
        return b[:, 0], b[:, 1], b[:, 2]

    def owner(self, xyz: np.ndarray) -> np.ndarray:
        """Label value (0 = outside) at world points (N, 3): the last structure containing each."""
        x, y, z = self.to_body(xyz)
        out = np.zeros(x.shape, dtype=np.int32)
        for n, s in enumerate(self.structures):
            lo, hi = self._bounds[n]
            near = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
            if near.any():
                hit = np.zeros_like(near)
                hit[near] = s.shape.contains(x[near], y[near], z[near])
                out[hit] = n + 1
        return out


# ---------------------------------------------------------------------------------------
# Site table: structure name -> Locus anatomy library site id (library/data/sites/*.yaml).
# Background tissues that have no single library site map to None; lesions are never
# placed in them.  Filled by ``_build_structures``; checked against the library in tests.
STRUCTURE_SITES: dict[str, str | None] = {}
#: Site of label 0 (air around the patient).
OUTSIDE_SITE = "outside_body"

# Tissue levels (HU, SUVbw) for FDG PET/CT of an adult at ~60 min uptake.
FAT = (-100.0, 0.35)
MUSCLE = (45.0, 0.7)
VISCERAL_FAT = (-90.0, 0.4)
LUNG = (-850.0, 0.45)
BLOOD = (40.0, 1.7)
AIR = (-1000.0, 0.0)
NODE_REGION = (-40.0, 0.8)
RED_MARROW = (230.0, 1.6)
YELLOW_MARROW = (20.0, 0.6)

_SIDES = (("right", -1.0), ("left", 1.0))


class _LesionHost(TypedDict):
    """The lesion-host fields of :class:`Structure` shared by a group of structures."""

    lesion_weight: float
    lesion_rmax_mm: float


def _add(out: list[Structure], name: str, shape: Shape, tissue: tuple[float, float], group: str,
         site: str | None = "", **kw: object) -> None:
    """Append a structure; ``site=""`` means the structure name is itself the library site id."""
    STRUCTURE_SITES[name] = name if site == "" else site
    out.append(Structure(name, shape, tissue[0], tissue[1], group, **kw))  # type: ignore[arg-type]


def _lerp(z: float, knots: Sequence[tuple[float, float]]) -> float:
    zs, vs = zip(*knots, strict=True)
    return float(np.interp(z, zs, vs))


# ---------------------------------------------------------------------------------------
# Body outline
_TRUNK_HEAD = (  # z, cx, cy, rx, ry
    (820, 0, 10, 165, 100), (880, 0, 10, 175, 110), (960, 0, 10, 168, 115), (1050, 0, 5, 150, 115),
    (1150, 0, 5, 155, 120), (1300, 0, 10, 170, 125), (1400, 0, 15, 180, 115), (1435, 0, 20, 160, 90),
    (1460, 0, 20, 62, 62), (1550, 0, 15, 60, 65), (1575, 0, 0, 64, 88), (1620, 0, 5, 72, 98),
    (1690, 0, 10, 80, 102), (1740, 0, 12, 72, 90), (1770, 0, 12, 45, 55), (1780, 0, 12, 15, 18),
)


def _leg(side: float) -> ZSweep:
    x = 90.0 * side
    return ZSweep(((0, x, 10, 32, 40), (60, x, 5, 35, 45), (120, x, 15, 32, 35), (400, x, 20, 55, 60),
                   (520, x, 10, 55, 55), (650, x, 5, 72, 78), (830, x, 5, 85, 90)))


def _arm(side: float) -> ZSweep:
    x = 215.0 * side
    return ZSweep(((720, x, 0, 22, 45), (870, x, 5, 30, 35), (1000, x, 8, 37, 40), (1150, x, 10, 42, 45),
                   (1300, x, 10, 45, 48), (1400, x * 0.95, 12, 45, 50), (1435, x * 0.9, 15, 30, 40)))


def _body(out: list[Structure]) -> None:
    trunk = ZSweep(_TRUNK_HEAD)
    outer: list[Shape] = [trunk]
    inner: list[Shape] = [trunk.shrunk(12.0, dz=6.0)]
    for _, side in _SIDES:
        leg, arm = _leg(side), _arm(side)
        foot = Box((90.0 * side, -60.0, 30.0), (40.0, 105.0, 30.0))
        outer += [leg, arm, foot]
        inner += [leg.shrunk(8.0, dz=6.0), arm.shrunk(6.0, dz=6.0), Box((90.0 * side, -60.0, 32.0), (34, 99, 24))]
    _add(out, "subcutaneous_fat", Union(tuple(outer)), FAT, "background", site=None)
    _add(out, "muscle_and_soft_tissue", Union(tuple(inner)), MUSCLE, "background", site=None)
    thorax = ZSweep(((1125, 0, 10, 130, 100), (1300, 0, 10, 145, 105), (1400, 0, 15, 105, 85),
                     (1440, 0, 20, 45, 45)))
    abdomen = ZSweep(((850, 0, 0, 80, 60), (880, 0, 0, 120, 85), (960, 0, 0, 140, 95), (1050, 0, 0, 125, 95),
                      (1125, 0, 0, 135, 95)))
    _add(out, "mediastinum", thorax, VISCERAL_FAT, "background")
    _add(out, "abdominal_cavity", Intersection((abdomen, HalfSpace((0, 0, 930), (0, 0, 1)))), VISCERAL_FAT,
         "background")
    _add(out, "pelvic_cavity", Intersection((abdomen, HalfSpace((0, 0, 930), (0, 0, -1)))), VISCERAL_FAT,
         "background")


# ---------------------------------------------------------------------------------------
# Lungs, cut into segments by planes (the library's finest lung sites are segments).
def _lung(side: float) -> ZSweep:
    dz = 0.0 if side < 0 else -15.0  # left base lower (no liver under it)
    x = 1.0 * side
    return ZSweep(((1100 + dz, 85 * x, 55, 30, 35), (1130 + dz, 85 * x, 35, 55, 75), (1200, 80 * x, 15, 62, 95),
                   (1300, 75 * x, 10, 60, 92), (1370, 65 * x, 20, 45, 70), (1410, 50 * x, 30, 25, 40),
                   (1425, 45 * x, 30, 10, 12)))


def _plane_yz(y0: float, z0: float, y1: float, z1: float) -> HalfSpace:
    """Half-space containing the x axis direction through (y0, z0)-(y1, z1); positive side posterior-inferior."""
    dy, dz = y1 - y0, z1 - z0
    n = (0.0, -dz, dy)  # perpendicular to (0, dy, dz) within the y-z plane
    if n[1] < 0:
        n = (0.0, dz, -dy)
    return HalfSpace((0.0, y0, z0), n)


def _lungs(out: list[Structure]) -> None:
    hz = lambda z: HalfSpace((0, 0, z), (0, 0, 1))  # noqa: E731  above z
    lz = lambda z: HalfSpace((0, 0, z), (0, 0, -1))  # noqa: E731  below z
    ay = lambda y: HalfSpace((0, y, 0), (0, -1, 0))  # noqa: E731  anterior of y
    py = lambda y: HalfSpace((0, y, 0), (0, 1, 0))  # noqa: E731  posterior of y

    def med(side: float, x: float) -> HalfSpace:  # medial of |x|
        return HalfSpace((x * side, 0, 0), (-side, 0, 0))

    def lat(side: float, x: float) -> HalfSpace:
        return HalfSpace((x * side, 0, 0), (side, 0, 0))

    w: _LesionHost = {"lesion_weight": 3.0 / 18, "lesion_rmax_mm": 22.0}
    # right lung: oblique fissure (lower lobe behind/below it), horizontal fissure at 1250
    lung = _lung(-1.0)
    obl = _plane_yz(60, 1345, -70, 1150)
    upper, lower = obl.flipped(), obl
    segs = {
        "lung_right_upper_apical": (upper, hz(1250), hz(1365)),
        "lung_right_upper_posterior": (upper, hz(1250), lz(1365), py(20)),
        "lung_right_upper_anterior": (upper, hz(1250), lz(1365), ay(20)),
        "lung_right_middle_lateral": (upper, lz(1250), lat(-1, 78)),
        "lung_right_middle_medial": (upper, lz(1250), med(-1, 78)),
        "lung_right_lower_superior": (lower, hz(1265)),
        "lung_right_lower_medial_basal": (lower, lz(1265), med(-1, 58)),
        "lung_right_lower_anterior_basal": (lower, lz(1265), lat(-1, 58), ay(15)),
        "lung_right_lower_lateral_basal": (lower, lz(1265), lat(-1, 58), py(15), ay(55)),
        "lung_right_lower_posterior_basal": (lower, lz(1265), lat(-1, 58), py(55)),
    }
    for name, cuts in segs.items():
        _add(out, name, Intersection((lung, *cuts)), LUNG, "organ", **w)
    lung = _lung(1.0)
    obl = _plane_yz(55, 1335, -70, 1135)
    upper, lower = obl.flipped(), obl
    segs = {
        "lung_left_upper_apicoposterior": (upper, hz(1330)),
        "lung_left_upper_anterior": (upper, lz(1330), hz(1262)),
        "lung_left_superior_lingular": (upper, lz(1262), hz(1212)),
        "lung_left_inferior_lingular": (upper, lz(1212)),
        "lung_left_lower_superior": (lower, hz(1260)),
        "lung_left_lower_anteromedial_basal": (lower, lz(1260), ay(25)),
        "lung_left_lower_lateral_basal": (lower, lz(1260), py(25), ay(60)),
        "lung_left_lower_posterior_basal": (lower, lz(1260), py(60)),
    }
    for name, cuts in segs.items():
        _add(out, name, Intersection((lung, *cuts)), LUNG, "organ", **w)


# ---------------------------------------------------------------------------------------
def _head_neck(out: list[Structure], suv: dict[str, float]) -> None:
    # calvarium ~8 mm thick: outer table, diploe (core), inner table, brain inside
    _add(out, "skull", Ellipsoid((0, 15, 1690), (74, 92, 78)), (1100.0, 0.6), "bone",
         core=Ellipsoid((0, 15, 1691), (70, 88, 73)), core_hu=400.0, core_suv=1.0,
         lesion_weight=0.3, lesion_rmax_mm=10.0)
    brain = Ellipsoid((0, 15, 1692), (66, 84, 68))
    for side_name, side in _SIDES:
        _add(out, f"cerebral_hemisphere_{side_name}", Intersection((brain, HalfSpace((0, 0, 0), (side, 0, 0)))),
             (35.0, suv["brain"]), "organ", lesion_weight=0.1, lesion_rmax_mm=18.0)
    _add(out, "cerebellum", Ellipsoid((0, 52, 1636), (48, 30, 24)), (35.0, suv["brain"] * 0.75), "organ",
         lesion_weight=0.05, lesion_rmax_mm=12.0)
    _add(out, "brainstem", Capsule((0, 30, 1655), (0, 35, 1600), 11), (30.0, suv["brain"] * 0.5), "organ")
    for side_name, side in _SIDES:
        _add(out, f"eye_{side_name}", Ellipsoid((32 * side, -70, 1650), (12, 12, 12)), (10.0, 0.4), "organ")
        _add(out, f"parotid_gland_{side_name}", Ellipsoid((52 * side, 15, 1610), (13, 20, 25)), (10.0, 1.9),
             "organ", lesion_weight=0.05, lesion_rmax_mm=10.0)
        _add(out, f"submandibular_gland_{side_name}", Ellipsoid((35 * side, -25, 1562), (10, 12, 10)),
             (35.0, 1.8), "organ")
        _add(out, f"maxillary_sinus_{side_name}", Ellipsoid((28 * side, -55, 1612), (13, 16, 15)), AIR, "airway")
    _add(out, "mandible", polytube([(-50, 15, 1610), (-46, -40, 1580), (0, -72, 1572), (46, -40, 1580),
                                    (50, 15, 1610)], 7.0), (1000.0, 0.6), "bone")
    _add(out, "nasopharynx", Capsule((0, 0, 1625), (0, 10, 1585), 10), AIR, "airway")
    _add(out, "oropharynx", Capsule((0, 10, 1585), (0, 12, 1545), 9), AIR, "airway")
    _add(out, "larynx", Capsule((0, 5, 1545), (0, 8, 1490), 11), (40.0, 1.3), "organ", core=Capsule(
        (0, 5, 1545), (0, 8, 1490), 7), core_hu=-1000.0, core_suv=0.0)
    for side_name, side in _SIDES:
        _add(out, f"thyroid_lobe_{side_name}", Ellipsoid((19 * side, -12, 1478), (8, 10, 22)), (95.0, 1.4),
             "organ", lesion_weight=0.05, lesion_rmax_mm=8.0)
    _add(out, "thyroid_isthmus", Box((0, -20, 1468), (10, 3, 6)), (95.0, 1.4), "organ")


def _nodes(out: list[Structure]) -> None:
    """Lymph-node stations as fat-density regions (normal nodes are below CT resolution here)."""
    def node(name: str, c: tuple[float, float, float], r: tuple[float, float, float], w: float = 1.0,
             rmax: float = 14.0) -> None:
        _add(out, name, Ellipsoid(c, r), NODE_REGION, "lymph_node", lesion_weight=0.25 * w, lesion_rmax_mm=rmax)

    for side_name, side in _SIDES:
        s = side_name[0]
        node(f"neck_level_ii_{side_name}", (34 * side, -5, 1540), (11, 14, 20))
        node(f"neck_level_iii_{side_name}", (36 * side, 0, 1505), (10, 13, 16))
        node(f"neck_level_iv_{side_name}", (38 * side, 5, 1470), (10, 12, 14))
        node(f"supraclavicular_{side_name}", (62 * side, 15, 1440), (20, 15, 12))
        node(f"axillary_lymph_nodes_{side_name}", (150 * side, 35, 1340), (18, 30, 40), w=2.0, rmax=16.0)
        node(f"internal_mammary_{side_name}", (30 * side, -96, 1300), (6, 6, 50), w=0.3, rmax=7.0)
        node(f"mediastinal_station_2{s}", (14 * side, 18, 1385), (9, 10, 22))
        node(f"mediastinal_station_4{s}", (17 * side, 22, 1298), (10, 10, 14))
        node(f"hilar_station_10{s}", (47 * side, 28, 1238), (10, 11, 14))
        node(f"common_iliac_lymph_nodes_{side_name}", (35 * side, 40, 930), (12, 12, 22))
        node(f"external_iliac_lymph_nodes_{side_name}", (72 * side, 15, 870), (12, 14, 25))
        node(f"internal_iliac_lymph_nodes_{side_name}", (55 * side, 55, 888), (11, 12, 22))
        node(f"obturator_lymph_nodes_{side_name}", (64 * side, 0, 848), (8, 12, 14), w=0.5, rmax=8.0)
        node(f"inguinal_lymph_nodes_{side_name}", (88 * side, -72, 805), (28, 14, 25), w=1.5)
        node(f"popliteal_fossa_{side_name}", (90 * side, 50, 510), (12, 15, 30), w=0.3, rmax=10.0)
    node("mediastinal_station_5", (30, 18, 1268), (9, 9, 10), rmax=9.0)
    node("mediastinal_station_6", (18, -30, 1300), (10, 9, 14), rmax=9.0)
    node("mediastinal_station_7", (0, 42, 1228), (14, 11, 14), w=2.0)
    node("mediastinal_station_8", (8, 58, 1172), (10, 10, 22))
    node("celiac_lymph_nodes", (0, 12, 1085), (14, 12, 12))
    node("para_aortic_lymph_nodes", (5, 40, 1000), (42, 20, 60), w=3.0, rmax=18.0)
    node("mesenteric_lymph_nodes", (10, -32, 990), (32, 20, 30), w=1.5, rmax=16.0)


def _liver(out: list[Structure], suv: dict[str, float]) -> None:
    liver = Union((Ellipsoid((-62, 15, 1092), (78, 85, 84)), Ellipsoid((5, -35, 1115), (65, 45, 45))))
    tissue = (58.0, suv["liver"])
    rhv = HalfSpace((-25, 35, 0), (-65, 115, 0))  # right hepatic vein: + side posterior sector
    mhv = HalfSpace((-25, 35, 0), (-105, 20, 0))  # Cantlie line: + side right liver
    umb = HalfSpace((-10, 30, 0), (110, 20, 0))  # umbilical fissure: + side left lateral
    sup, inf = HalfSpace((0, 0, 1095), (0, 0, 1)), HalfSpace((0, 0, 1095), (0, 0, -1))
    w: _LesionHost = {"lesion_weight": 4.0 / 8, "lesion_rmax_mm": 25.0}
    right_ant = (mhv, rhv.flipped())
    segs = {
        "liver_s7": (rhv, mhv, sup),
        "liver_s6": (rhv, mhv, inf),
        "liver_s8": (*right_ant, sup),
        "liver_s5": (*right_ant, inf),
        "liver_s4": (mhv.flipped(), umb.flipped()),
        "liver_s2": (mhv.flipped(), umb, sup),
        "liver_s3": (mhv.flipped(), umb, inf),
    }
    for name, cuts in segs.items():
        _add(out, name, Intersection((liver, *cuts)), tissue, "organ", **w)
    _add(out, "liver_s1", Intersection((liver, Ellipsoid((-15, 30, 1100), (18, 15, 30)))), tissue, "organ",
         lesion_weight=0.3, lesion_rmax_mm=10.0)
    _add(out, "gallbladder", Ellipsoid((-48, -50, 1040), (15, 15, 34), frame_from_axis((0, 0.3, 1))),
         (8.0, 0.6), "organ")


def _abdomen(out: list[Structure], suv: dict[str, float]) -> None:
    _add(out, "small_intestine", Ellipsoid((0, -38, 955), (95, 52, 62)), (25.0, 1.5), "organ",
         lesion_weight=0.1, lesion_rmax_mm=15.0)
    colon = [(-88, -15, 900), (-100, 10, 1030), (-85, -15, 1062), (0, -62, 1045), (92, 10, 1082),
             (102, 30, 1000), (98, 25, 920), (40, 15, 868), (0, 70, 845), (0, 65, 790)]
    parts = [("ascending_colon", "ascending_colon"), ("hepatic_flexure", "hepatic_flexure"),
             ("transverse_colon", "transverse_colon"), ("splenic_flexure", "splenic_flexure"),
             ("descending_colon", "descending_colon"), ("descending_colon_lower", "descending_colon"),
             ("sigmoid_colon", "sigmoid_colon"), ("sigmoid_colon_lower", "sigmoid_colon"), ("rectum", "rectum")]
    for n, (name, site) in enumerate(parts):
        r = 16.0 if name == "rectum" else 20.0
        _add(out, name, Capsule(colon[n], colon[n + 1], r), (35.0, 1.8), "organ", site=site,
             core=Capsule(colon[n], colon[n + 1], r - 6.0), core_hu=-700.0, core_suv=0.2)
    for side_name, side in _SIDES:
        _add(out, f"psoas_{side_name}", Capsule((32 * side, 58, 1120), (62 * side, 20, 880), 20), MUSCLE,
             "organ", site=f"lower_back_muscle_{side_name}")
    stomach = Ellipsoid((62, -22, 1100), (44, 40, 64), frame_from_axis((0.4, -0.2, 1)))
    _add(out, "stomach", stomach, (40.0, 2.0), "organ", core=Ellipsoid(
        (62, -22, 1100), (36, 32, 56), frame_from_axis((0.4, -0.2, 1))), core_hu=15.0, core_suv=0.7,
         lesion_weight=0.15, lesion_rmax_mm=15.0)
    _add(out, "spleen", Ellipsoid((95, 58, 1100), (28, 55, 55), frame_from_axis((0, 0.6, 1), (1, 0, 0))),
         (48.0, suv["spleen"]), "organ", lesion_weight=0.6, lesion_rmax_mm=20.0)
    _add(out, "pancreas", polytube([(-18, 0, 1040), (20, 12, 1055), (70, 42, 1075)], 13.0), (40.0, 1.5),
         "organ", lesion_weight=0.3, lesion_rmax_mm=12.0)
    for side_name, side in _SIDES:
        zc = 1000.0 if side < 0 else 1020.0
        axis = (-0.15 * side, 0.2, 1.0)  # upper poles medial and posterior
        _add(out, f"kidney_{side_name}", Ellipsoid((65 * side, 65, zc), (55, 28, 27), frame_from_axis(axis)),
             (32.0, suv["kidney"]), "organ", core=Ellipsoid((55 * side, 60, zc), (25, 10, 10), frame_from_axis(axis)),
             core_hu=10.0, core_suv=suv["urine"] * 0.5, lesion_weight=0.2, lesion_rmax_mm=18.0)
        _add(out, f"adrenal_gland_{side_name}", Ellipsoid((36 * side, 52, 1075), (7, 14, 18)), (30.0, 1.6),
             "organ", lesion_weight=0.3, lesion_rmax_mm=12.0)
    _add(out, "bladder", Ellipsoid((0, -28, 886), (42, 32, 32)), (5.0, suv["urine"]), "organ")


def _chest_organs(out: list[Structure], suv: dict[str, float]) -> None:
    heart_axes = frame_from_axis((0.55, -0.45, -0.7), (0, 0, 1))
    _add(out, "heart", Ellipsoid((22, -22, 1208), (68, 48, 52), heart_axes), (45.0, suv["myocardium"]), "organ",
         core=Ellipsoid((18, -18, 1212), (50, 34, 38), heart_axes), core_hu=BLOOD[0], core_suv=BLOOD[1])


def _vessels_airways(out: list[Structure]) -> None:
    aorta = [(8, -12, 1185), (2, -8, 1300), (10, 15, 1322), (24, 40, 1295), (22, 42, 1150), (10, 38, 1000),
             (5, 35, 950)]
    _add(out, "thoracic_aorta", polytube(aorta[:5], [15, 13, 12, 12]), BLOOD, "vessel")
    _add(out, "abdominal_aorta", polytube(aorta[4:], [11, 10]), BLOOD, "vessel")
    for side_name, side in _SIDES:
        _add(out, f"iliac_vessels_{side_name}", polytube([(5, 35, 950), (45 * side, 30, 900),
                                                          (72 * side, 12, 845)], 7.0), BLOOD, "vessel")
    _add(out, "inferior_vena_cava", Capsule((-24, 35, 1150), (-20, 35, 960), 11), BLOOD, "vessel")
    _add(out, "superior_vena_cava", Capsule((-22, -5, 1330), (-20, -5, 1240), 9), BLOOD, "vessel")
    _add(out, "trachea", Capsule((0, 8, 1488), (0, 25, 1262), 9), AIR, "airway")
    _add(out, "main_bronchus_right", Capsule((0, 25, 1262), (-42, 30, 1232), 7), AIR, "airway")
    _add(out, "main_bronchus_left", Capsule((0, 25, 1262), (45, 35, 1220), 6), AIR, "airway")
    _add(out, "esophagus", polytube([(0, 30, 1490), (3, 40, 1300), (10, 45, 1200), (35, 15, 1122)], 8.0),
         (40.0, 1.6), "organ", lesion_weight=0.1, lesion_rmax_mm=10.0)


# ---------------------------------------------------------------------------------------
# Skeleton
_SPINE_LEVELS = (
    [(f"c{n}", 15.0) for n in range(1, 8)] + [(f"t{n}", 25.0) for n in range(1, 13)]
    + [(f"l{n}", 35.0) for n in range(1, 6)]
)
_SPINE_TOP = 1550.0
_SPINE_Y = [(970, 50), (1050, 40), (1150, 60), (1300, 65), (1445, 35), (1550, 20)]


def _spine(out: list[Structure]) -> dict[str, float]:
    """Vertebrae C1-L5 (body + arch + processes), sacrum, spinal cord; returns level centre z."""
    z_top = _SPINE_TOP
    centres: dict[str, float] = {}
    for name, height in _SPINE_LEVELS:
        z_bot = z_top - height
        zc = 0.5 * (z_top + z_bot)
        centres[name] = zc
        kind = name[0]
        yb = _lerp(zc, _SPINE_Y)
        rx = {"c": 14.0, "t": _lerp(zc, [(1150, 25), (1445, 17)]), "l": 27.0}[kind]
        ry = {"c": 10.0, "t": _lerp(zc, [(1150, 17), (1445, 12)]), "l": 19.0}[kind]
        disc = 0.2 * height
        zb0, zb1 = z_bot + disc / 2, z_top - disc / 2
        body = ZSweep(((zb0, 0, yb, rx, ry), (zb1, 0, yb, rx, ry)))
        core = ZSweep(((zb0 + 1.5, 0, yb, rx - 3, ry - 3), (zb1 - 1.5, 0, yb, rx - 3, ry - 3)))
        canal_y = yb + ry + 8.0
        arch = ZSweep(((zb0, 0, canal_y, 16, 13), (zb1, 0, canal_y, 16, 13)))
        tp = {"c": 24.0, "t": 34.0, "l": 40.0}[kind]
        trans = Capsule((-tp, canal_y + 2, zc), (tp, canal_y + 2, zc), 4.0)
        sp_len = {"c": 18.0, "t": 22.0, "l": 24.0}[kind]
        sp_drop = {"c": 5.0, "t": 18.0, "l": 4.0}[kind]
        spinous = Capsule((0, canal_y + 12, zc), (0, canal_y + 12 + sp_len, zc - sp_drop), 4.5)
        _add(out, f"vertebra_{name}", Union((body, arch, trans)), (450.0, 0.9), "bone", core=core,
             core_hu=RED_MARROW[0], core_suv=RED_MARROW[1], lesion_weight=3.0 / 24, lesion_rmax_mm=rx * 0.7)
        _add(out, f"vertebra_{name}_spinous_process", spinous, (650.0, 0.9), "bone")
        z_top = z_bot
    # sacrum: a tilted wedge below L5
    tilt = _rx(-25)  # sacral promontory forward, tip backward
    _add(out, "sacrum", Ellipsoid((0, 75, 915), (48, 18, 58), tilt), (400.0, 1.0), "bone",
         core=Ellipsoid((0, 75, 915), (42, 13, 52), tilt), core_hu=RED_MARROW[0], core_suv=RED_MARROW[1],
         lesion_weight=0.4, lesion_rmax_mm=14.0)
    pts = [(0, _lerp(z, _SPINE_Y) + {True: 12.0, False: 20.0}[z > 1445] + 8.0, z)
           for z in (975.0, 1050.0, 1150.0, 1300.0, 1445.0, 1550.0)]
    _add(out, "spinal_cord", polytube(pts, 7.0), (30.0, 1.4), "organ")
    return centres


def _rx(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


_RIB_A = [65, 95, 115, 130, 140, 142, 142, 142, 140, 138, 135, 130]
_RIB_B = [50, 70, 85, 95, 98, 100, 100, 100, 100, 100, 98, 95]
_RIB_END = [2.75, 2.75, 2.75, 2.75, 2.75, 2.7, 2.7, 2.45, 2.35, 2.25, 1.9, 1.55]
_RIB_DROP = [30, 50, 80, 90, 95, 95, 95, 95, 90, 85, 60, 45]


def _ribs(out: list[Structure], centres: dict[str, float]) -> None:
    for k in range(12):
        z0 = centres[f"t{k + 1}"]
        yc = 10.0
        theta0 = 0.28
        thetas = np.linspace(theta0, _RIB_END[k], 12)
        for side_name, side in _SIDES:
            pts = [(side * _RIB_A[k] * math.sin(t), yc + _RIB_B[k] * math.cos(t),
                    z0 - _RIB_DROP[k] * (t - theta0) / (math.pi - theta0)) for t in thetas]
            _add(out, f"rib_{side_name}_{k + 1}", polytube(pts, 5.5), (700.0, 0.8), "bone",
                 lesion_weight=1.5 / 24, lesion_rmax_mm=9.0)
    _add(out, "manubrium", Box((0, -98, 1395), (24, 7, 22), _rx(15)), (450.0, 1.0), "bone",
         core=Box((0, -98, 1395), (20, 4, 19), _rx(15)), core_hu=RED_MARROW[0], core_suv=RED_MARROW[1],
         lesion_weight=0.15, lesion_rmax_mm=9.0)
    _add(out, "sternal_body", Box((0, -106, 1300), (15, 7, 70), _rx(8)), (450.0, 1.0), "bone",
         core=Box((0, -106, 1300), (12, 4, 67), _rx(8)), core_hu=RED_MARROW[0], core_suv=RED_MARROW[1],
         lesion_weight=0.2, lesion_rmax_mm=8.0)
    for side_name, side in _SIDES:
        _add(out, f"clavicle_{side_name}", polytube([(22 * side, -92, 1418), (90 * side, -70, 1440),
                                                     (160 * side, 10, 1445)], 7.0), (800.0, 0.8), "bone",
             lesion_weight=0.1, lesion_rmax_mm=8.0)
        rot = rotation_z(-28 * side)
        _add(out, f"scapula_{side_name}", Ellipsoid((112 * side, 100, 1335), (55, 7, 78), rot), (650.0, 0.9),
             "bone", lesion_weight=0.2, lesion_rmax_mm=10.0)


def _limb_bone(out: list[Structure], name: str, pts: list[tuple[float, float, float]], r: float,
               weight: float, extra: tuple[Shape, ...] = ()) -> None:
    shaft = polytube(pts, r)
    _add(out, name, Union((shaft, *extra)) if extra else shaft, (1200.0, 0.6), "bone", core=polytube(pts, r * 0.6),
         core_hu=YELLOW_MARROW[0], core_suv=YELLOW_MARROW[1], lesion_weight=weight, lesion_rmax_mm=r * 0.9)


def _pelvis_limbs(out: list[Structure]) -> None:
    for side_name, side in _SIDES:
        # iliac wing: a plate from the anterior superior spine (lateral) to the sacroiliac joint (medial)
        wing = frame_from_axis((-0.55 * side, 0.84, 0.0), (0, 0, 1))
        _add(out, f"ilium_{side_name}", Ellipsoid((92 * side, 28, 958), (72, 56, 11), wing), (500.0, 1.1), "bone",
             core=Ellipsoid((92 * side, 28, 958), (66, 50, 6), wing), core_hu=RED_MARROW[0], core_suv=RED_MARROW[1],
             lesion_weight=0.5, lesion_rmax_mm=12.0)
        _add(out, f"acetabulum_{side_name}", Ellipsoid((88 * side, 8, 880), (24, 26, 24)), (600.0, 1.0), "bone",
             lesion_weight=0.2, lesion_rmax_mm=10.0)
        _add(out, f"pubis_{side_name}", polytube([(80 * side, -5, 872), (40 * side, -40, 862),
                                                  (8 * side, -58, 855)], 10.0), (550.0, 1.0), "bone",
             lesion_weight=0.2, lesion_rmax_mm=9.0)
        _add(out, f"ischium_{side_name}", polytube([(88 * side, 20, 872), (78 * side, 35, 832),
                                                    (55 * side, 20, 815)], 11.0), (550.0, 1.0), "bone",
             lesion_weight=0.2, lesion_rmax_mm=9.0)
        _add(out, f"femoral_head_{side_name}", Ellipsoid((88 * side, 8, 880), (22, 22, 22)), (500.0, 1.0), "bone",
             core=Ellipsoid((88 * side, 8, 880), (17, 17, 17)), core_hu=RED_MARROW[0], core_suv=1.2)
        neck = Capsule((88 * side, 8, 880), (118 * side, 15, 850), 14.0)
        _limb_bone(out, f"femur_{side_name}", [(115 * side, 15, 840), (100 * side, 12, 650), (92 * side, 10, 520)],
                   14.0, 0.3, extra=(neck, Ellipsoid((92 * side, 12, 505), (38, 30, 24))))
        _add(out, f"patella_{side_name}", Ellipsoid((92 * side, -42, 510), (20, 9, 22)), (700.0, 0.7), "bone")
        _limb_bone(out, f"tibia_{side_name}", [(92 * side, 15, 478), (92 * side, 20, 300), (92 * side, 15, 85)],
                   15.0, 0.1, extra=(Ellipsoid((92 * side, 15, 468), (36, 28, 14)),))
        _limb_bone(out, f"fibula_{side_name}", [(122 * side, 25, 460), (122 * side, 28, 300), (118 * side, 22, 80)],
                   7.0, 0.02)
        _add(out, f"humeral_head_{side_name}", Ellipsoid((196 * side, 12, 1408), (22, 22, 22)), (500.0, 1.0),
             "bone", site=f"humerus_{side_name}")
        _limb_bone(out, f"humerus_{side_name}", [(200 * side, 12, 1390), (210 * side, 10, 1250),
                                                 (215 * side, 8, 1140)], 12.0, 0.2)
        _limb_bone(out, f"radius_{side_name}", [(202 * side, 5, 1130), (205 * side, -5, 1000), (210 * side, -10, 890)],
                   7.0, 0.02)
        _limb_bone(out, f"ulna_{side_name}", [(228 * side, 20, 1140), (228 * side, 15, 1000), (226 * side, 8, 890)],
                   7.0, 0.02)


# ---------------------------------------------------------------------------------------
def _uptake(rng: np.random.Generator) -> dict[str, float]:
    """Seeded organ SUVbw levels around typical FDG values (lognormal jitter ~10 %)."""
    j = lambda m, s=0.1: float(m * math.exp(rng.normal(0.0, s)))  # noqa: E731
    return {
        "brain": j(8.5, 0.12),
        "liver": j(2.2, 0.08),
        "spleen": j(1.9, 0.08),
        "kidney": j(2.8, 0.15),
        "urine": float(rng.uniform(8.0, 40.0)),
        "myocardium": float(math.exp(rng.uniform(math.log(1.5), math.log(8.0)))),
    }


def _build_structures(suv: dict[str, float]) -> tuple[Structure, ...]:
    out: list[Structure] = []
    _body(out)
    _lungs(out)
    _head_neck(out, suv)
    _abdomen(out, suv)
    _liver(out, suv)
    _chest_organs(out, suv)
    _nodes(out)
    _vessels_airways(out)
    centres = _spine(out)
    _ribs(out, centres)
    _pelvis_limbs(out)
    return tuple(out)


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """A seeded body: habitus scale per axis, tissue uptake jitter, derived weight and height."""
    sx, sy = (float(v) for v in rng.uniform(0.92, 1.06, size=2))
    sz = float(rng.uniform(0.94, 1.0))
    suv = _uptake(rng)
    structures = _build_structures(suv)
    weight = round(75.0 * sx * sy * sz * float(rng.uniform(0.92, 1.08)) * 2) / 2
    return Anatomy(structures=structures, scale=(sx, sy, sz), patient_weight_kg=weight,
                   height_mm=REFERENCE_HEIGHT_MM * sz)


def _init_sites() -> None:
    """Populate STRUCTURE_SITES at import so the table is inspectable without building a body."""
    _build_structures({"brain": 8.5, "liver": 2.2, "spleen": 1.9, "kidney": 2.8, "urine": 20.0, "myocardium": 3.0})


_init_sites()
