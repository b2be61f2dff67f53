"""Assemble a phantom study in memory: CT, PET, label maps, lesions, UIDs (all from one seed).

Randomness comes from one :class:`numpy.random.SeedSequence` per phantom, split into
independent streams (anatomy, lesions, CT noise, PET noise) so that, for example,
changing the number of lesions does not change the anatomy.  UIDs are name-based
(UUID version 5 under the ``2.25`` root, PS3.5 B.2), derived from the seed and the grid
parameters: the same call always yields the same UIDs, and different phantoms never
share one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.dicom.volume import Volume
from training.phantom.anatomy import OUTSIDE_SITE, Anatomy, build_anatomy
from training.phantom.lesions import LesionTruth, place_lesions
from training.phantom.render import Grid, lesion_label_map, render_ct, render_pet

_UID_NAMESPACE = uuid.UUID("3f0d6a52-6c1e-5b7e-9a43-4c6f63757301")  # fixed namespace of Locus phantoms
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class Preset:
    """Grid sizes (nz, ny, nx), in-plane fields of view (mm), scan range in the body frame, lesions."""

    ct_shape: tuple[int, int, int]
    ct_fov_mm: float
    pet_shape: tuple[int, int, int]
    pet_fov_mm: float
    z_range_mm: tuple[float, float]  # reference-body heights; scaled with the seeded body height
    n_lesions: int
    radius_range_mm: tuple[float, float]


PRESETS: dict[str, Preset] = {
    # lower chest and upper abdomen, coarse: unit tests
    "tiny": Preset((60, 64, 64), 550.0, (30, 32, 32), 600.0, (1000.0, 1300.0), 3, (10.0, 20.0)),
    # neck to pelvis
    "small": Preset((100, 128, 128), 550.0, (50, 64, 64), 600.0, (840.0, 1480.0), 5, (8.0, 20.0)),
    # skull base to upper thigh: the node demo
    "demo": Preset((200, 192, 192), 576.0, (100, 96, 96), 600.0, (780.0, 1580.0), 8, (6.0, 22.0)),
    # vertex to soles at clinical resolution: analysis benchmark
    "full": Preset((600, 512, 512), 550.0, (600, 200, 200), 600.0, (-10.0, 1790.0), 50, (4.0, 25.0)),
}


@dataclass(frozen=True)
class PhantomUids:
    """Every UID of a phantom study, fixed at generation time."""

    study: str
    frame_of_reference: str
    ct_series: str
    pet_series: str
    seg_series: str
    seg_instance: str
    ct_instances: tuple[str, ...]
    pet_instances: tuple[str, ...]
    scout_series: str
    scout_instance: str
    scout_frame_of_reference: str


@dataclass
class Phantom:
    """A synthetic PET/CT study in memory.

    ``ct`` holds HU (int16), ``pet`` SUVbw (float32, g/mL), ``*_labels`` structure label
    values (see :meth:`structure_table`), ``*_lesions`` lesion label values (= SEG segment
    numbers, 0 = none).  All volumes share ``uids.frame_of_reference``.
    """

    seed: int
    preset: str
    anatomy: Anatomy
    ct: Volume
    pet: Volume
    ct_labels: Volume
    pet_labels: Volume
    ct_lesions: Volume
    pet_lesions: Volume
    lesions: tuple[LesionTruth, ...]
    uids: PhantomUids
    patient_weight_kg: float
    identity: str = field(repr=False, default="")

    def site_of_label(self, label: int) -> str | None:
        """Library site id of a structure label value (label 0: outside the body)."""
        if label == 0:
            return OUTSIDE_SITE
        return self.anatomy.structures[label - 1].site_id

    def structure_table(self) -> list[dict[str, object]]:
        """One row per label value: name, library site, group, nominal HU and SUV."""
        return [{"label": n + 1, "name": s.name, "site_id": s.site_id, "group": s.group, "hu": s.hu, "suv": s.suv}
                for n, s in enumerate(self.anatomy.structures)]


def phantom_uid(identity: str, what: str) -> str:
    """Name-based UID (2.25 + UUIDv5 integer) for ``what`` within a phantom ``identity``."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, f"{identity}/{what}").int)


def _grid(shape: tuple[int, int, int], fov_mm: float, z0: float, z1: float) -> Grid:
    """Centred in-plane, slices filling [z0, z1]; spacing and origin rounded so DICOM DS strings are exact."""
    nk, nj, ni = shape
    dxy = round(fov_mm / max(ni, nj), 4)
    dz = round((z1 - z0) / nk, 4)
    ox = round(-(ni - 1) / 2 * dxy, 4)
    oy = round(-(nj - 1) / 2 * dxy, 4)
    oz = round(z0 + dz / 2, 4)
    return Grid((nk, nj, ni), (dxy, dxy, dz), (ox, oy, oz))


def _dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """A grid shape as a 3-tuple of ints (a list from JSON gives the same identity string)."""
    return int(shape[0]), int(shape[1]), int(shape[2])


def make_phantom(seed: int, size: str = "tiny", *, ct_shape: tuple[int, int, int] | None = None,
                 pet_shape: tuple[int, int, int] | None = None, z_range_mm: tuple[float, float] | None = None,
                 n_lesions: int | None = None, lesion_sites: Sequence[str] | None = None,
                 radius_range_mm: tuple[float, float] | None = None) -> Phantom:
    """Generate a phantom deterministically from ``seed``.

    ``size`` names a preset (``tiny``, ``small``, ``demo``, ``full``); the keyword
    arguments override its fields.  ``z_range_mm`` is in reference-body heights above the
    soles (0-1780 mm) and follows the seeded body height.  ``lesion_sites`` places lesion
    i in ``lesion_sites[i % len]`` (structure names or library site ids).
    """
    if size not in PRESETS:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[size]
    ct_dims, pet_dims = _dims(ct_shape or p.ct_shape), _dims(pet_shape or p.pet_shape)
    z_range = tuple(z_range_mm or p.z_range_mm)
    n = p.n_lesions if n_lesions is None else int(n_lesions)
    radius_range = tuple(radius_range_mm or p.radius_range_mm)
    identity = (f"locus-phantom/v{GENERATOR_VERSION}/seed={int(seed)}/size={size}/ct={ct_dims}/pet={pet_dims}"
                f"/z={z_range}/n={n}/r={radius_range}/sites={tuple(lesion_sites) if lesion_sites else None}")

    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x10C05])
    rng_anat, rng_les, rng_ct, rng_pet = (np.random.default_rng(s) for s in ss.spawn(4))
    anatomy = build_anatomy(rng_anat)
    sz = anatomy.scale[2]
    z0, z1 = z_range[0] * sz, z_range[1] * sz
    ct_grid = _grid(ct_dims, p.ct_fov_mm, z0, z1)
    pet_grid = _grid(pet_dims, p.pet_fov_mm, z0, z1)
    uid = lambda what: phantom_uid(identity, what)  # noqa: E731
    lesions = place_lesions(anatomy, n, rng_les, [ct_grid, pet_grid],
                            radius_range_mm=radius_range,  # type: ignore[arg-type]
                            uid=uid, sites=lesion_sites)
    shapes = [les.shape() for les in lesions]
    hu, ct_lab = render_ct(anatomy, ct_grid, shapes, rng_ct)
    suv, pet_lab = render_pet(anatomy, pet_grid, shapes, rng_pet)

    uids = PhantomUids(
        study=uid("study"), frame_of_reference=uid("for"), ct_series=uid("ct"), pet_series=uid("pet"),
        seg_series=uid("seg"), seg_instance=uid("seg/1"),
        ct_instances=tuple(uid(f"ct/{k}") for k in range(ct_dims[0])),
        pet_instances=tuple(uid(f"pet/{k}") for k in range(pet_dims[0])),
        scout_series=uid("scout"), scout_instance=uid("scout/1"), scout_frame_of_reference=uid("scout/for"),
    )

    def vol(arr: np.ndarray, grid: Grid, series: str, modality: str, sops: Sequence[str] = ()) -> Volume:
        return Volume(array=arr, affine=grid.affine, frame_of_reference_uid=uids.frame_of_reference,
                      series_instance_uid=series, modality=modality,
                      slice_sources=tuple((s, None) for s in sops))

    return Phantom(
        seed=int(seed), preset=size, anatomy=anatomy,
        ct=vol(hu, ct_grid, uids.ct_series, "CT", uids.ct_instances),
        pet=vol(suv, pet_grid, uids.pet_series, "PT", uids.pet_instances),
        ct_labels=vol(ct_lab, ct_grid, uids.ct_series, ""),
        pet_labels=vol(pet_lab, pet_grid, uids.pet_series, ""),
        ct_lesions=vol(lesion_label_map(ct_grid, shapes), ct_grid, uids.seg_series, "SEG"),
        pet_lesions=vol(lesion_label_map(pet_grid, shapes), pet_grid, uids.seg_series, "SEG"),
        lesions=lesions, uids=uids, patient_weight_kg=anatomy.patient_weight_kg, identity=identity,
    )


def grid_of(volume: Volume) -> Grid:
    """The axis-aligned :class:`Grid` of a phantom volume."""
    a = volume.affine
    return Grid(tuple(volume.array.shape), (float(a[0, 0]), float(a[1, 1]), float(a[2, 2])),
                (float(a[0, 3]), float(a[1, 3]), float(a[2, 3])))
