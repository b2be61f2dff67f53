"""Crop augmentation: rotation about the crop centre (T1 fixed), and train == inference crops."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from pipelines.models.checkpoints import Normalizer, Preprocessing
from pipelines.models.localizer.crop import CropGeometry
from training.localizer.augment import Augmentation, AugmentationConfig, crop_grid, rotation_matrix, sample_augmentation
from training.localizer.samples import _augmented_mask, _resample, lesion_input

PRE = Preprocessing(spacing=(4.0, 4.0, 4.0), crop_size=(16, 16, 16),
                    normalizers=(Normalizer(40, 200, True), Normalizer(3, 3, False), Normalizer(0, 1, False)),
                    interpolation=("linear", "linear", "nn"), input_channel=3, lesion_idx=(2,), max_stride=16,
                    sample_method="fixed_length")
CENTRE = (10.0, -20.0, 30.0)


def _images() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A 2 mm grid with a Gaussian bump at CENTRE (CT and SUV) and a 6 mm ball lesion there."""
    n = 64
    img = sitk.Image([n, n, n], sitk.sitkFloat32)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin(tuple(c - n for c in CENTRE))
    z, y, x = np.mgrid[0:n, 0:n, 0:n].astype(np.float32)
    pts = [np.asarray(img.GetOrigin())[a] + 2.0 * v for a, v in enumerate((x, y, z))]
    r2 = sum((p - c) ** 2 for p, c in zip(pts, CENTRE))
    bump = np.exp(-r2 / (2 * 12.0**2)).astype(np.float32)
    ct = sitk.GetImageFromArray(1000 * bump)
    ct.CopyInformation(img)
    suv = sitk.GetImageFromArray(10 * bump)
    suv.CopyInformation(img)
    les = sitk.GetImageFromArray((r2 <= 36.0).astype(np.uint8))
    les.CopyInformation(img)
    return ct, suv, les


def test_rotated_grid_keeps_crop_centre_on_the_lesion() -> None:
    aug = Augmentation(rotation=rotation_matrix((1.0, 2.0, 3.0), math.radians(10)), ratio=1.1)
    origin, spacing, direction = crop_grid(CENTRE, PRE.spacing, PRE.crop_size, aug)
    d = np.asarray(direction).reshape(3, 3)
    centre_voxel = np.asarray(origin) + d @ (np.asarray(PRE.crop_size) / 2 * np.asarray(spacing))
    assert np.allclose(centre_voxel, CENTRE, atol=1e-9)
    # HCL-AL's T1 defect (rotate the direction, keep the unrotated origin) moves it by millimetres
    ref_origin = np.asarray(CENTRE) - np.asarray(PRE.crop_size) * np.asarray(spacing) / 2
    assert np.linalg.norm(ref_origin + d @ (np.asarray(PRE.crop_size) / 2 * np.asarray(spacing)) - CENTRE) > 3.0


def test_rotation_does_not_move_the_centre_sample() -> None:
    ct, suv, les = _images()
    plain = lesion_input(PRE, ct, suv, les, CENTRE)
    rotated = lesion_input(PRE, ct, suv, les, CENTRE, Augmentation(rotation=rotation_matrix((0, 1, 1), math.radians(10))))
    c = tuple(n // 2 for n in PRE.crop_size)
    assert abs(plain[(1, *c)] - rotated[(1, *c)]) < 1e-3  # SUV at the crop centre is the bump's peak in both
    assert rotated[2].sum() > 0 and plain[2][c] == 1.0


def test_identity_augmentation_path_equals_inference_crop() -> None:
    """The augmentation resampler, given no perturbation, reproduces the inference crop exactly."""
    ct, suv, les = _images()
    geom = CropGeometry(PRE.spacing, PRE.crop_size)
    origin, spacing, direction = crop_grid(CENTRE, PRE.spacing, PRE.crop_size, Augmentation())
    inference = lesion_input(PRE, ct, suv, les, CENTRE)
    ct_aug = _resample(ct, origin, spacing, direction, geom.size, "linear")
    assert np.allclose(np.clip((ct_aug - 40) / 200, -1, 1), inference[0], atol=1e-6)
    suv_aug = _resample(suv, origin, spacing, direction, geom.size, "linear")
    assert np.allclose((suv_aug - 3) / 3, inference[1], atol=1e-6)
    assert np.array_equal(_augmented_mask(les, CENTRE, geom, Augmentation(), "nn"), inference[2])


def test_sampled_augmentations_follow_the_recipe() -> None:
    rng = np.random.default_rng(0)
    augs = [sample_augmentation(rng, AugmentationConfig()) for _ in range(400)]
    shifts = np.array([a.shift_mm for a in augs])
    assert np.abs(shifts).max() <= 3.0
    rotated = [a for a in augs if not np.array_equal(a.rotation, np.eye(3))]
    assert 0.4 < len(rotated) / len(augs) < 0.6
    angles = [math.degrees(math.acos(np.clip((np.trace(a.rotation) - 1) / 2, -1, 1))) for a in rotated]
    assert max(angles) <= 10.0 + 1e-6
    ratios = [a.ratio for a in augs if a.ratio != 1.0]
    assert 0.4 < len(ratios) / len(augs) < 0.6 and min(ratios) >= 0.8 and max(ratios) <= 1.2
