"""The one in-memory image type of the pipeline: voxels plus explicit LPS geometry.

Convention (the same as ITK/SimpleITK, so conversion is free):

* ``array`` is indexed ``[k, j, i]`` = ``[slice, row, column]`` (numpy z, y, x);
* ``affine`` is a 4x4 matrix mapping the homogeneous *index* ``(i, j, k, 1)``
  (column, row, slice) to patient LPS millimetres (DICOM PS3.3 C.7.6.2.1.1);
  column 0 = row direction cosine x column spacing (``PixelSpacing[1]``),
  column 1 = column direction cosine x row spacing (``PixelSpacing[0]``),
  column 2 = slice step vector, column 3 = position of voxel (0, 0, 0).

A volume whose slice step is not perpendicular to the image plane (gantry tilt) has a
sheared affine; :meth:`Volume.is_orthogonal` tells, and :meth:`to_sitk` refuses it
because ITK images cannot represent shear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from pipelines.errors import GeometryError


@dataclass
class Volume:
    """A 3-D image in patient LPS: voxel array (k, j, i) plus the index-to-LPS affine."""
    array: np.ndarray
    affine: np.ndarray
    frame_of_reference_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""
    # SOP Instance UID (and frame number, 1-based, for multi-frame objects) of each slice k
    slice_sources: tuple[tuple[str, int | None], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if self.array.ndim != 3:
            raise ValueError("array must be 3-D [k, j, i]")

    # -- geometry -----------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """The shape in ITK order (i, j, k)."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Length of the i, j, k step vectors in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position of the first voxel's centre."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit i, j, k step directions."""
        m = self.affine[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def is_orthogonal(self, tol: float = 1e-3) -> bool:
        """Whether the axes are orthogonal (no gantry tilt), as ITK images require."""
        d = self.direction
        return bool(np.allclose(d.T @ d, np.eye(3), atol=tol))

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) continuous indices (i, j, k) to (N, 3) LPS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices of LPS points."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    # -- conversion ---------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image; a sheared geometry raises (ITK cannot represent it)."""
        if not self.is_orthogonal():
            raise GeometryError(
                "volume has a sheared geometry (gantry tilt) and cannot be represented as an ITK image",
                code="sheared_geometry",
            )
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, **meta: object) -> Volume:
        """A volume from a SimpleITK image, with extra metadata fields."""
        arr = sitk.GetArrayFromImage(img)
        d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        aff = np.eye(4)
        aff[:3, :3] = d * np.asarray(img.GetSpacing())[None, :]
        aff[:3, 3] = img.GetOrigin()
        return cls(array=arr, affine=aff, **meta)  # type: ignore[arg-type]

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry and provenance, new voxel values."""
        if array.shape != self.array.shape:
            raise ValueError("shape mismatch")
        return Volume(
            array=array,
            affine=self.affine.copy(),
            frame_of_reference_uid=self.frame_of_reference_uid,
            series_instance_uid=self.series_instance_uid,
            modality=self.modality,
            slice_sources=self.slice_sources,
        )
